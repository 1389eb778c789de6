# ruff: noqa: F811 - the fixtures of tests/test_contract.py are imported and used as arguments
"""Issue 18: security, data safety and stale state, tried through the CLI as a new user would.

Numbered as docs/errors.md's second table: S = security, D = data loss, W = exit 0 with a wrong result,
T = traceback, L = weak or late. Each case is one of a family (a reader, a loader, a name rule); the tests
try several members of each family.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune.cli import main
from moeprune.io import markdown_safe, parse_json, sealed, terminal_safe
from tests.test_contract import (  # noqa: F401 (fixtures)
    CALIBRATION,
    copy_model,
    mask_file,
    mask_json,
    model,
    ok,
    profiled,
    refused,
    snapshot,
    write_mask,
)
from tests.tiny_models import build_model, save_model

NO_TASKS = ["--tasks", "none"]


# ------------------------------------------------------------------------------------ S: security
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_s1_a_planted_lock_file_is_never_written_through(kind, model, mask_file, mask_json, tmp_path, capsys):
    victim = tmp_path / "bashrc"
    victim.write_text("export KEEP=1\n")
    out = tmp_path / "dir"
    out.mkdir()
    lock = out / ".pruned.lock"
    os.symlink(victim, lock) if kind == "symlink" else os.link(victim, lock)
    refused(capsys, ["apply", model, mask_file, "--model-free", "--out", out / "pruned"], "lock file",
            untouched=(victim,))
    # Also when the command would be refused anyway (a bad mask): the up-front lock check comes first.
    mask_json["retain"] = 5
    bad = write_mask(tmp_path / "bad.json", mask_json)
    refused(capsys, ["apply", model, bad, "--model-free", "--out", out / "pruned"], "lock file", untouched=(victim,))
    assert victim.read_text() == "export KEEP=1\n"


def test_s1_an_output_file_that_is_a_link_is_refused_not_followed(profiled, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    masks = tmp_path / "masks"
    masks.mkdir()
    os.symlink(victim, masks / "reap-0.50.json")
    refused(capsys, ["plan", profiled, "--method", "reap", "--retain", "0.5", "--out", masks], "symbolic link",
            untouched=(victim,))
    assert not list(masks.glob(".*.tmp"))  # the temporary file was removed


def test_s1_temporary_files_are_created_exclusively(tmp_path):
    from moeprune.io import atomic_file

    target = tmp_path / "out.json"
    with atomic_file(target, text=True) as handle:
        tmp = Path(os.readlink(f"/proc/self/fd/{handle.fileno()}"))
        assert tmp.name.startswith(f".out.json.{os.getpid()}-") and tmp.suffix == ".tmp"
        handle.write("{}")
    assert target.read_text() == "{}" and not tmp.exists()


HOSTILE = "<img src=x onerror=alert(1)>\n# owned | x |\n[link](http://evil)"


def test_s2_mask_text_is_escaped_in_the_model_card(model, mask_json, tmp_path):
    # (a method is a file name, refused unless a plain name since issue 27: tests/test_classes.py)
    mask_json.update(candidate=HOSTILE + "`code` <b>")
    mask = write_mask(tmp_path / "hostile.json", mask_json)
    out = tmp_path / "-my out"
    ok(["apply", model, mask, "--model-free", "--out", out])
    card = (out / "README.md").read_text()
    assert "<img" not in card and "<b>" not in card and "\n# owned" not in card and "](http" not in card
    assert "&lt;img" in card
    # The Reproduce line is shell-quoted; the leading dash is made a path, not a flag.
    assert f"--out './{out}'" in card or f"--out '{out}'" in card.replace("./", "", 0)
    line = next(line for line in card.splitlines() if line.startswith("moeprune apply"))
    import shlex

    assert shlex.split(line)[-1] in (str(out), f"./{out}")


def test_s2_terminal_output_has_no_escape_sequences(model, mask_json, tmp_path, capsys):
    mask_json.update(model="\x1b[2J\x1b[1;1Hall checks passed\x07", candidate="reap\x1b]0;title\x07")
    mask = write_mask(tmp_path / "ansi.json", mask_json)
    capsys.readouterr()
    ok(["inspect", mask])
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\x07" not in shown
    # Error lines too (the mask's model name is quoted in the expert-count error).
    mask_json["num_experts"], mask_json["kept_per_layer"] = 16, 8
    for entry in mask_json["layers"].values():
        entry["kept"] = list(range(8))
    mismatched = write_mask(tmp_path / "ansi16.json", mask_json)
    line = refused(capsys, ["apply", model, mismatched, "--out", tmp_path / "o"], "experts per layer")
    assert "\x1b" not in line


def test_s2_escaping_helpers():
    assert terminal_safe("a\x1b[31mb\x1b]0;t\x07c\rd\x9be") == "abcde"
    assert "\n" not in markdown_safe("a\nb") and "<" not in markdown_safe("<script>")
    assert markdown_safe("# | [x](y)").startswith("\\#")


# ----------------------------------------------------------------------------------- D: data loss
def test_d4_profile_out_over_the_model_is_refused(model, tmp_path, capsys):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("some text\n\n" * 200)
    refused(capsys, ["profile", model, "--corpus", f"notes={corpus}", "--samples", "2", "--seq-len", "16",
                     "--out", model], "is the source", untouched=(model,))
    refused(capsys, ["profile", model, *CALIBRATION, "--out", model / "prof"], "lies inside", untouched=(model,))
    refused(capsys, ["prune", model, *CALIBRATION, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "o",
                     "--workdir", model], "--workdir", untouched=(model,))


@pytest.mark.parametrize("name", ["model", "wiki.partial", "..", ".hidden", "reap-0.50", "tb-coverage-0.25-seed1",
                                  "config", "x.tmp", "model-00001-of-00002", "mask"])
def test_d5_corpus_names_that_collide_with_moeprunes_files_are_refused(name, tiny_checkpoint, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("text\n\n" * 100)
    refused(capsys, ["profile", tiny_checkpoint, "--corpus", f"{name}={corpus}", "--samples", "2", "--seq-len", "16",
                     "--out", tmp_path / "p"], "Corpus name", untouched=(tmp_path,))


def test_d5_a_file_named_like_a_reserved_name_needs_a_name(tiny_checkpoint, tmp_path, capsys):
    corpus = tmp_path / "model.txt"
    corpus.write_text("text\n\n" * 100)
    refused(capsys, ["profile", tiny_checkpoint, "--corpus", corpus, "--out", tmp_path / "p"], "NAME=SPEC")


def test_d6_eval_out_is_checked_against_its_inputs(tiny_checkpoint, mask_file, model, tmp_path, capsys):
    base = ["eval", model, "--ppl", "wiki", "--ppl-seq-len", "32", *NO_TASKS]
    refused(capsys, [*base, "--mask", mask_file, "--out", mask_file], "is the input", untouched=(mask_file,))
    refused(capsys, [*base, "--out", model / "config.json", "--overwrite"], "a file of the input",
            untouched=(model,))


def test_l_eval_out_can_replace_its_own_earlier_results(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "r.json"
    text = tmp_path / "small.txt"
    text.write_text("a short text to score, " * 20)  # a few windows: fast
    base = ["eval", tiny_checkpoint, "--ppl", text, "--ppl-seq-len", "32", *NO_TASKS, "--out", out]
    ok(base)
    refused(capsys, base, "already exists", "--overwrite", untouched=(tmp_path,))
    out.write_text("{}")
    ok([*base, "--overwrite"])
    assert "summary" in json.loads(out.read_text())


# ------------------------------------------------------------------------ W: exit 0, wrong result
def test_w9_retain_ratios_never_share_a_mask_file(profiled, tmp_path, capsys):
    ok(["plan", profiled, "--method", "reap", "--retain", "0.62", "0.625", "0.5", "--out", tmp_path])
    names = sorted(p.name for p in tmp_path.glob("reap-*.json"))
    assert names == ["reap-0.50.json", "reap-0.62.json", "reap-0.625.json"]
    kept = {json.loads((tmp_path / n).read_text())["kept_per_layer"] for n in names}
    assert kept == {4, 5}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("retain", "does not give its kept_per_layer"),
        ("keys", "canonical form"),
        ("duplicate", "appears twice"),
        ("nan", "not a JSON number"),
        ("deep", "nested too deeply"),
        ("empty", "is empty"),
        ("truncated", "not valid JSON"),
        ("seed", "not a whole number"),
    ],
)
def test_w10_mask_contents_are_schema_checked(text, expected, model, mask_json, mask_file, tmp_path, capsys):
    path = tmp_path / "m.json"
    raw = mask_file.read_text()
    if text == "retain":
        mask_json["retain"] = 5
    elif text == "keys":
        first = next(iter(mask_json["layers"]))
        mask_json["layers"]["0" + first] = mask_json["layers"].pop(first)
    elif text == "seed":
        mask_json["seed"] = "<b>1</b>"
    if text in ("retain", "keys", "seed"):
        raw = json.dumps(mask_json)
    raw = {
        "duplicate": raw.replace('"layers": {', '"layers": {"0": {"kept": [0]}, ', 1),
        "nan": raw.replace('"retain": 0.5', '"retain": NaN'),
        "deep": "[" * 100000 + "]" * 100000,
        "empty": "",
        "truncated": raw[: len(raw) // 2],
    }.get(text, raw)
    path.write_text(raw)
    refused(capsys, ["apply", model, path, "--out", tmp_path / "out"], expected, untouched=(tmp_path,))


def test_w10_duplicate_keys_hide_nowhere():
    with pytest.raises(Exception, match="appears twice"):
        parse_json('{"a": {"0": 1, "0": 2}}', "x", "fix")


@pytest.mark.parametrize("fault", ["counts vs tokens", "counts between layers", "sums without counts", "type"])
def test_w11_a_profile_contradicting_itself_is_refused(fault, profiled, tmp_path, capsys):
    prof = shutil.copytree(profiled, tmp_path / "prof")
    tensors = load_file(prof / "wiki.safetensors")
    meta = json.loads((prof / "wiki.json").read_text())
    if fault == "counts vs tokens":
        meta["tokens"] *= 2
    elif fault == "counts between layers":
        tensors["count"][0, 0] += 1
    elif fault == "sums without counts":
        row = tensors["count"][0]
        col = int(torch.argmin(row))
        tensors["count"][0, int(torch.argmax(row))] += row[col]
        tensors["count"][0, col] = 0
    else:
        meta["tokens"] = "many"
    save_file(tensors, prof / "wiki.safetensors", metadata={"format": "moeprune.profile/1"})
    (prof / "wiki.json").write_text(json.dumps(meta))
    refused(capsys, ["plan", prof, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "m"], "wiki",
            untouched=(tmp_path,))


def test_w12_reconstruction_windows_beyond_the_models_positions(profiled, tiny_checkpoint, tmp_path, capsys):
    refused(capsys, ["plan", profiled, "--method", "expert-sparsity", "--retain", "0.5", "--out", tmp_path / "m"],
            "--recon-seq-len 2048", "max_position_embeddings=128")
    refused(capsys, ["experiment", tiny_checkpoint, "--preset", "paper", "--methods", "expert-sparsity",
                     "--corpus", "wiki", "--seq-len", "32", "--ppl-seq-len", "32", *NO_TASKS, "--out", tmp_path / "x"],
            "--recon-seq-len", untouched=(tmp_path,))


def test_w13_changed_weights_are_never_already_profiled(model, tmp_path, capsys):
    prof = tmp_path / "prof"
    ok(["profile", model, *CALIBRATION, "--out", prof])
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if "embed" in n)
    tensors[name] = tensors[name] * 1.5  # same shapes and header, other weights
    save_file(tensors, weights, metadata={"format": "pt"})
    refused(capsys, ["profile", model, *CALIBRATION, "--out", prof], "other weights", untouched=(prof,))
    # Another checkpoint of the same architecture into the same folder is refused the same way.
    other = copy_model(model, tmp_path / "other")
    os.utime(other / "model.safetensors", ns=(1, 1))
    refused(capsys, ["profile", other, *CALIBRATION, "--out", prof], "other weights", untouched=(prof,))


def test_w14_prune_overwrite_plans_on_this_runs_corpora_only(tiny_checkpoint, tmp_path):
    out = tmp_path / "o"
    base = ["prune", tiny_checkpoint, "--samples", "4", "--seq-len", "32", "--method", "reap", "--retain", "0.5"]
    ok([*base, "--corpus", "wiki", "--out", out])
    ok([*base, "--corpus", "web", "--out", out, "--overwrite"])
    mask = json.loads((out / "mask.json").read_text())
    assert mask["extra"]["corpora"] == ["web"]


def test_w15_grid_masks_and_cells_follow_their_profile(tmp_path, profiled):
    """Unit level: a saved mask is reused only for its exact ratio and profile; a cell only for its inputs."""
    from moeprune.experiment import _reusable_masks, read_cell
    from moeprune.planning import plan
    from moeprune.profiling.stats import Profile

    prof = Profile.load(profiled)
    mask = plan(prof, "reap", 0.625)
    assert mask.extra["profile_sha256"] == prof.fingerprint()
    path = tmp_path / "reap-0.625.json"
    mask.save(path)
    assert _reusable_masks([path], [0.625], prof.fingerprint()) is not None
    assert _reusable_masks([path], [0.62], prof.fingerprint()) is None  # another ratio
    assert _reusable_masks([path], [0.625], "0" * 64) is None  # another profile (corpus, tokenizer, weights)
    cell = {"cell": "dense", "method": "dense", "variant": "dense", "retain": 1.0, "summary": {},
            "inputs": {"weights_sha256": "a", "tokenizer_sha256": "b", "mask_sha256": None}}
    file = tmp_path / "dense.json"
    file.write_text(json.dumps(cell))
    assert read_cell(file, "dense", cell["inputs"]) is None  # unsealed: not moeprune's (issue 27)
    file.write_text(json.dumps(sealed(cell)))
    assert read_cell(file, "dense", cell["inputs"]) == cell
    file.write_text(json.dumps(sealed({**cell, "inputs": cell["inputs"]})))
    assert read_cell(file, "dense", {**cell["inputs"], "tokenizer_sha256": "c"}) is None
    for garbage in ("", "[1]", '{"cell": 3}', "{" * 5):
        file.write_text(garbage)
        assert read_cell(file, "dense", cell["inputs"]) is None  # recomputed, not a traceback


# ----------------------------------------------------------------------------------- T: tracebacks
@pytest.mark.parametrize(("raised", "code"), [(KeyboardInterrupt, 130), ("SIGTERM", 143)])
def test_t13_signals_end_every_verb_with_one_line(raised, code, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from moeprune.profiling import runner

    def stop(*args, **kwargs):
        if raised == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "calibration_windows", stop)
    capsys.readouterr()
    assert main(["profile", str(tiny_checkpoint), *CALIBRATION, "--out", str(tmp_path / "p")]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "rerun to resume" in err.strip().splitlines()[-1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert not list((tmp_path).rglob("*.tmp"))


def test_t14_pickle_only_checkpoints_are_refused(model, tmp_path, capsys):
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(weights, model / "pytorch_model.bin")
    refused(capsys, ["profile", model, *CALIBRATION, "--out", tmp_path / "p"], "pickle weights only")


def test_t15_config_and_tensors_disagree(model, tmp_path, capsys):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_experts": 12}))
    refused(capsys, ["profile", model, *CALIBRATION, "--out", tmp_path / "p"], "shapes its config.json describes")


def test_t16_a_tokenizer_larger_than_the_vocabulary(tokenizer, tmp_path, capsys):
    small = save_model(build_model("qwen2_moe", vocab_size=64), tmp_path / "small")
    tokenizer.save_pretrained(small)
    refused(capsys, ["profile", small, *CALIBRATION, "--out", tmp_path / "p"], "embedding rows")


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "latin1"])
def test_t17_text_inputs_that_are_not_text_files(kind, tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "c.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # must not hang: opened non-blocking, refused as a FIFO
    elif kind == "device":
        os.symlink("/dev/zero", path)
    else:
        path.write_bytes("caf\xe9".encode("latin-1"))
    expected = {"directory": "directory", "fifo": "FIFO", "device": "character device", "latin1": "not UTF-8"}[kind]
    refused(capsys, ["profile", tiny_checkpoint, "--corpus", path, "--out", tmp_path / "p"], expected)
    refused(capsys, ["eval", tiny_checkpoint, "--ppl", path, *NO_TASKS], expected)
    refused(capsys, ["eval", tiny_checkpoint, "--ppl", "wikitext2", "--ppl-data", f"wikitext2={path}", *NO_TASKS],
            expected)


@pytest.mark.parametrize("what", ["profile json", "experiment json", "index"])
def test_t18_malformed_json_of_every_kind(what, profiled, model, tiny_checkpoint, mask_file, tmp_path, capsys):
    if what == "profile json":
        prof = shutil.copytree(profiled, tmp_path / "prof")
        (prof / "wiki.json").write_text('{"tokens": 1, "tokens": 2}')
        refused(capsys, ["plan", prof, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "m"], "twice")
    elif what == "experiment json":
        out = tmp_path / "x"
        out.mkdir()
        (out / "experiment.json").write_text("[1, 2]")
        refused(capsys, ["experiment", tiny_checkpoint, "--methods", "reap", "--reap-corpus", "none", "--corpus",
                         "wiki", "--samples", "2", "--seq-len", "16", "--ppl", "wiki", "--ppl-seq-len", "16",
                         *NO_TASKS, "--out", out],
                "not a JSON object")
    else:
        (model / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "../../outside.safetensors"}}))
        refused(capsys, ["apply", model, mask_file, "--model-free", "--out", tmp_path / "o"], "not a *.safetensors")


@pytest.mark.parametrize("missing", ["lm_eval", "matplotlib"])
def test_t19_the_eval_extra_is_checked_before_the_work(missing, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    if missing == "lm_eval":
        refused(capsys, ["eval", tiny_checkpoint, "--ppl", "wiki", "--tasks", "heldout"], "moeprune[eval]")
    refused(capsys, ["experiment", tiny_checkpoint, "--methods", "reap", "--reap-corpus", "none", "--corpus", "wiki",
                     "--seq-len", "16", "--out", tmp_path / "x"], "pip install 'moeprune[eval]'", untouched=(tmp_path,))


# ---------------------------------------------------------------------------------------- L: weak
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.txt", "", "holds no text"),
        ("blank.txt", " \n\n\t\n", "holds no text"),
        ("empty.jsonl", '{"text": ""}\n{"text": "  "}\n', "holds no text"),
        ("short.txt", "a few words", "less than one window"),
    ],
)
def test_l10_corpus_problems_before_the_model_loads(name, content, expected, tiny_checkpoint, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setattr("moeprune.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    corpus = tmp_path / name
    corpus.write_text(content)
    refused(capsys, ["profile", tiny_checkpoint, "--corpus", corpus, "--seq-len", "64", "--out", tmp_path / "p"],
            expected, untouched=(tmp_path,))


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_l11_mask_layers_checked_before_loading(change, model, mask_json, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("moeprune.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    layers = mask_json["layers"]
    if change == "missing":
        layers.pop(next(iter(layers)))
    else:
        layers["7"] = next(iter(layers.values()))
    mask = write_mask(tmp_path / "m.json", mask_json)
    refused(capsys, ["apply", model, mask, "--out", tmp_path / "o"], "covers MoE layers")
    refused(capsys, ["eval", model, "--mask", mask, *NO_TASKS], "covers MoE layers")


def test_l12_ppl_seq_len_1_names_the_flag(tiny_checkpoint, capsys):
    refused(capsys, ["eval", tiny_checkpoint, "--ppl-seq-len", "1", *NO_TASKS], "--ppl-seq-len must be at least 2")


def test_l13_a_full_disk_does_not_claim_nothing_changed():
    import errno

    from moeprune.io import environment_error

    message = str(environment_error(OSError(errno.ENOSPC, "No space left on device", "x")))
    assert "Nothing was changed" not in message and "rerun to resume" in message


@pytest.mark.parametrize("verb", ["apply", "profile", "eval"])
def test_l14_a_dangling_symlink_out_is_named_up_front(verb, model, mask_file, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "link"
    os.symlink(tmp_path / "nowhere", out)
    argv = {
        "apply": ["apply", model, mask_file, "--model-free"],
        "profile": ["profile", tiny_checkpoint, *CALIBRATION],
        "eval": ["eval", tiny_checkpoint, "--ppl", "wiki", "--ppl-seq-len", "32", *NO_TASKS],
    }[verb]
    line = refused(capsys, [*argv, "--out", out], "symbolic link", untouched=(tmp_path,))
    assert str(out) in line and ".tmp" not in line
