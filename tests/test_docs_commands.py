"""Every ``moeprune ...`` command the docs show parses with the real CLI parser (nothing is run), so a renamed or
removed flag, a dropped verb or a changed nargs fails here instead of in a reader's shell; the same for the
``python benchmarks/...`` and ``python scripts/...`` commands, with their own parsers."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from moeprune.cli import EXAMPLES, build_parser

ROOT = Path(__file__).resolve().parents[1]
# support_matrix.md is generated and shows no commands; docs/results/ are generated reports.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SEPARATORS = {"&&", "||", "|", ";"}


def commands_in(text: str) -> list[str]:
    """Shell lines of the fenced code blocks (continuations joined, prompts and comments dropped) that run the
    ``moeprune`` console script or ``-m moeprune``."""
    found = []
    for block in FENCE.findall(text):
        # A backslash continues a line; so does an indented `[...` line (the next line of a synopsis).
        for line in re.sub(r"\\\n|\n(?=\s+\[)", " ", block).splitlines():
            line = line.strip().removeprefix("$ ")
            if not line or line.startswith("#") or "moeprune" not in line:
                continue
            found.extend(_moeprune_segments(shlex.split(line, comments=True)))
    return found


def _moeprune_segments(tokens: list[str]) -> list[str]:
    segments, current = [], []
    for token in [*tokens, ";"]:
        if token not in SEPARATORS:
            current.append(token)
            continue
        words = list(current)
        while words and re.fullmatch(r"[A-Z_]\w*=\S*", words[0]):  # OMP_NUM_THREADS=1 moeprune ...
            words.pop(0)
        for i, word in enumerate(words):
            # `moeprune VERB`, `.venv/bin/moeprune VERB`, `python -m moeprune VERB`, `torchrun ... -m moeprune VERB`
            if (word == "moeprune" or word.endswith("/moeprune")) and (i == 0 or words[i - 1] == "-m"):
                segments.append(shlex.join(words[i + 1 :]))
                break
        current = []
    return segments


def documented_commands() -> list[tuple[str, str]]:
    cases = [(f"{doc.relative_to(ROOT)}", argv) for doc in DOCS for argv in commands_in(doc.read_text())]
    cases += [(f"cli.EXAMPLES[{verb!r}]", argv) for verb, text in EXAMPLES.items() for argv in _examples(text)]
    return cases


def _examples(text: str) -> list[str]:
    return [seg for line in text.splitlines() for seg in _moeprune_segments(shlex.split(line, comments=True))]


def verb_parser(verb: str) -> argparse.ArgumentParser:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert verb in subparsers.choices, f"no verb {verb!r}; the CLI has {sorted(subparsers.choices)}"
    return subparsers.choices[verb]


CASES = documented_commands()


def test_the_docs_show_commands_of_every_verb():
    # The extractor must find what is there: an empty or partial list would make the test below vacuous.
    verbs = {argv.split()[0] for _, argv in CASES}
    assert verbs == {"prune", "profile", "plan", "apply", "eval", "experiment", "inspect"}
    assert len([1 for where, _ in CASES if where.startswith(("README", "docs"))]) >= 15


@pytest.mark.parametrize(("where", "argv"), CASES, ids=[f"{w}:{a[:60]}" for w, a in CASES])
def test_documented_command_parses(where: str, argv: str, capsys):
    args = shlex.split(argv)
    # Exact names: argparse would also accept an abbreviation, so a flag renamed to a longer one would pass.
    unknown = unknown_flags(args)
    assert not unknown, f"{where}: `moeprune {argv}` names flags the CLI lacks: {unknown}"
    if any(token.startswith("[") for token in args):
        return  # a synopsis (`moeprune eval MODEL [--mask MASK.json] ...`): its placeholders are not values
    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `moeprune {argv}` does not parse: {capsys.readouterr().err.strip()}")


def unknown_flags(args: list[str]) -> list[str]:
    known = verb_parser(args[0])._option_string_actions
    flags = [t.lstrip("[").rstrip("]") for t in args if re.match(r"\[?--?[A-Za-z]", t)]
    return [flag for flag in flags if flag not in known]


INLINE = re.compile(r"`(?:[^`]*\s)?moeprune ((?:profile|plan|apply|eval|experiment|prune|inspect)\b[^`]*)`")


def test_inline_commands_name_real_flags():
    # Commands in the prose (`moeprune profile --sequential`, `moeprune apply ... --model-free`) are often
    # fragments, so only their flags are checked.
    bad = []
    for doc in DOCS:
        prose = FENCE.sub("", doc.read_text())
        for match in INLINE.finditer(prose):
            args = match.group(1).replace("...", " ").split()
            bad += [f"{doc.name}: `{match.group(0)}`: {flag}" for flag in unknown_flags(args)]
    assert not bad, bad


def test_a_removed_flag_fails_the_check(capsys):
    # The check can fail: a flag the parser lacks is caught by parse_args (what the test above relies on).
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "prof/", "--retain", "0.5", "--out", "m/", "--no-such-flag"])
    assert "--no-such-flag" in capsys.readouterr().err
    assert commands_in("```bash\nA=1 .venv/bin/moeprune profile M --corpus c=wiki --out p/  # c\n```\n") == [
        "profile M --corpus c=wiki --out p/"
    ]


@pytest.mark.parametrize("verb", sorted(EXAMPLES))
def test_help_renders_with_its_example(verb):
    # README: "Every command has --help with an example". Formatting the help also catches a stray % in a
    # help string, which argparse only trips over when --help is asked for.
    text = verb_parser(verb).format_help()
    assert f"moeprune {verb} " in text.split("example:")[1]


SCRIPT = re.compile(r"^python3? ((?:benchmarks|scripts)/\S+\.py)(.*)$")


class _Parsed(BaseException):  # not an Exception: a script's `except Exception` must not swallow it and go on
    """Raised by the patched parse_args: the script's parser accepted its arguments; stop before any work."""


def documented_script_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text()):
            for line in re.sub(r"\\\n", " ", block).splitlines():
                if match := SCRIPT.match(line.strip()):
                    found.append((doc.name, match.group(1), shlex.split(match.group(2), comments=True)))
    return found


SCRIPT_CASES = documented_script_commands()


def test_the_docs_show_script_commands():
    assert {script.split("/")[0] for _, script, _ in SCRIPT_CASES} == {"benchmarks", "scripts"}
    assert len(SCRIPT_CASES) >= 10


@pytest.mark.parametrize(("where", "script", "args"), SCRIPT_CASES, ids=[f"{w}:{s}" for w, s, _ in SCRIPT_CASES])
def test_documented_script_command_parses(where, script, args, monkeypatch, capsys):
    # benchmarks/ and scripts/ build their parsers inside main(): run main() with parse_args patched to stop
    # right after parsing, so nothing is built, trained or measured.
    import importlib.util
    import sys

    path = ROOT / script
    assert path.is_file(), f"{where}: {script} does not exist"
    monkeypatch.syspath_prepend(str(path.parent))  # scripts/testbed/* import their siblings
    spec = importlib.util.spec_from_file_location(f"_doc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        assert not args, f"{where}: {script} takes no arguments"
        return
    parsers = []
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        parsers.append(self)
        argv = sys.argv[1:] if argv is None else argv
        if any("..." in a for a in argv):  # "...same flags...": check the flag names only
            raise _Parsed
        parse(self, argv, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    try:
        module.main()
    except SystemExit:
        pytest.fail(f"{where}: `python {script} {shlex.join(args)}` does not parse: {capsys.readouterr().err}")
    except _Parsed:
        pass
    assert parsers, f"{where}: {script}'s main() parsed no arguments"
    known = parsers[0]._option_string_actions
    unknown = [a for a in args if a.startswith("--") and a not in known]
    assert not unknown, f"{where}: `python {script}` has no {unknown}"
