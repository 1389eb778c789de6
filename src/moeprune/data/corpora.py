"""Corpus specs: where calibration text comes from.

A spec is a string:

- ``wikitext2``  Salesforce/wikitext, wikitext-2-raw-v1, train split (through ``datasets``); its rows are
  single lines (headings, paragraphs, blank lines), so they are joined back into the raw text and cut
  into whole **articles** at the level-1 headings (`` = Title = ``): a document is one article with its
  section headings and paragraphs in their original order
- ``c4``         allenai/c4, ``en/c4-train.00000-of-01024.json.gz`` (through ``datasets``)
- ``wiki``, ``web``  the bundled testbed corpora (train split; ``wiki:test`` picks a split)
- ``evol-codealpaca``  theblackcat102/evol-codealpaca-v1, train split, instruction and output joined
  (REAP's own calibration corpus)
- a local file: ``.txt`` (documents separated by blank lines; a WikiText raw file such as
  ``wiki.train.raw`` is cut into articles as above), ``.jsonl`` (a ``text`` field, or
  ``file.jsonl:FIELD``), ``.parquet`` (a ``text`` column, or ``file.parquet:FIELD``)
- ``hf:ID[:CONFIG][:SPLIT][:FIELD]`` any hub dataset (defaults: no config, ``train``, ``text``)

A field may join several with ``+`` (``file.jsonl:instruction+output``): the fields are joined with a
blank line. ``NAME=SPEC`` gives the corpus another name (the profile file is ``NAME.safetensors``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.bundled import BUNDLED_CORPORA, SPLITS, read_bundled_corpus
from moeprune.errors import MoePruneError
from moeprune.io import check_regular_file, open_regular_file, parse_json, read_text, terminal_safe


@dataclass(frozen=True)
class CorpusSpec:
    name: str  # file-safe name used in profile file names
    kind: str  # "hub" | "bundled" | "txt" | "jsonl" | "parquet"
    source: str  # hub id, bundled name or file path
    config: str | None = None
    split: str = "train"
    field: str = "text"
    data_files: str | None = None
    # "articles": rows are lines of one text to be cut into articles (WikiText). Recorded in profiles, so a
    # profile sampled the older way (one row per document) is not silently reused.
    documents: str | None = None

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# The paper's generic corpora, as hub datasets.
KNOWN_HUB = {
    "wikitext2": dict(source="Salesforce/wikitext", config="wikitext-2-raw-v1", documents="articles"),
    "c4": dict(source="allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz"),
    # REAP's calibration corpus (Lasby et al.), which the TB-Coverage paper runs its "original REAP" on.
    "evol-codealpaca": dict(source="theblackcat102/evol-codealpaca-v1", field="instruction+output"),
}
WIKITEXT_SOURCE = "Salesforce/wikitext"
# A WikiText level-1 heading line, " = Title = " (sections are " = = Title = = ").
_ARTICLE_HEADING = re.compile(r"^ = [^=\n].* = $", re.MULTILINE)


def parse_corpus(spec: str) -> CorpusSpec:
    """Turn a ``--corpus`` argument into a :class:`CorpusSpec`."""
    name, _, body = spec.partition("=") if "=" in spec and not spec.startswith("hf:") else ("", "", spec)
    parsed = _parse_body(body)
    if name:
        parsed = CorpusSpec(**{**parsed.__dict__, "name": _safe_name(name)})
    check_corpus_name(parsed.name, spec, given=bool(name))
    return parsed


# Files moeprune (or a checkpoint) keeps beside a profile's <corpus>.safetensors/.json: a corpus of one of these
# names would replace them (profile --out MODEL: model.safetensors) or be mistaken for one (a mask, a checkpoint).
RESERVED_CORPUS_NAMES = frozenset({
    "model", "config", "generation_config", "tokenizer", "tokenizer_config", "special_tokens_map", "mask",
    "experiment", "results", "perplexity", "reconstruction", "profile", "profile-reap", "masks", "cells", "plots",
    "meta", "pending", "adapter_model", "adapter_config", "pytorch_model", "training_args",
})
_RESERVED_SUFFIXES = (".partial", ".tmp", ".old", ".lock", ".json", ".safetensors", ".index")
_CORPUS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_corpus_name(name: str, spec: str = "", given: bool = True) -> None:
    """A corpus name is the stem of its profile files, so it must be a plain name that cannot collide with
    moeprune's own files: no leading dot, no "..", no path separator, none of the reserved names (model,
    config, mask, ...), no reserved suffix (.partial, .tmp, .old, .lock, ...), not a mask file's name
    (``reap-0.50``) nor a checkpoint shard's (``model-00001-of-00002``)."""
    lower = name.lower()
    problem = None
    if not _CORPUS_NAME.fullmatch(name) or ".." in name or len(name) > 100:
        problem = "is not a plain name (letters, digits, _ . -, not starting with a dot, no '..', at most 100)"
    elif lower in RESERVED_CORPUS_NAMES or re.fullmatch(r"model-\d+-of-\d+", lower):
        problem = "is the name of a file moeprune or the checkpoint keeps beside profiles"
    elif any(part in lower for part in _RESERVED_SUFFIXES):
        problem = f"contains one of the reserved suffixes {', '.join(_RESERVED_SUFFIXES)}"
    elif re.fullmatch(r".*-\d+(\.\d+)?(e-?\d+)?(-seed\d+)?", lower):
        problem = "ends like a mask file name (METHOD-RATIO[-seedS]), which plan and prune write beside profiles"
    if problem:
        how = "choose another NAME in NAME=SPEC" if given else f"name it with NAME=SPEC, e.g. --corpus my{name}={spec}"
        raise MoePruneError(f"Corpus name {name!r} {problem}; {how}.")


def _parse_body(spec: str) -> CorpusSpec:
    if spec in KNOWN_HUB:
        return CorpusSpec(name=spec, kind="hub", **KNOWN_HUB[spec])
    head, _, split = spec.partition(":")
    if head in BUNDLED_CORPORA:
        if split and split not in SPLITS:
            raise MoePruneError(f"Corpus {spec!r}: the bundled corpora have splits {', '.join(SPLITS)}; not {split!r}.")
        return CorpusSpec(
            name=head if not split or split == "train" else f"{head}-{split}",
            kind="bundled",
            source=head,
            split=split or "train",
        )
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0]:
            raise MoePruneError(f"Corpus {spec!r}: write hf:ID[:CONFIG][:SPLIT][:FIELD], e.g. hf:allenai/c4:en.")
        config, split_, field = (parts[1:] + [None, None, None])[:3]
        return CorpusSpec(
            name=_safe_name(parts[0].split("/")[-1] + (f"-{config}" if config else "")),
            kind="hub",
            source=parts[0],
            config=config or None,
            split=split_ or "train",
            field=field or "text",
        )
    return _parse_file(spec)


def _parse_file(spec: str) -> CorpusSpec:
    path, field = spec, "text"
    for suffix in (".jsonl", ".parquet"):
        if suffix + ":" in spec:
            path, field = spec.split(suffix + ":", 1)
            path += suffix
    kind = Path(path).suffix.lstrip(".")
    if kind not in ("txt", "jsonl", "parquet"):
        raise MoePruneError(
            f"Unknown corpus {spec!r}. Use wikitext2, c4, a bundled corpus (wiki, web), a local .txt/.jsonl/.parquet "
            "file, or hf:ID[:CONFIG][:SPLIT][:FIELD]."
        )
    if not Path(path).exists():
        raise MoePruneError(f"Corpus file {path} not found. Check the path (relative paths are from {Path.cwd()}).")
    check_regular_file(path, "Corpus file")  # a folder, FIFO or device is named now (a FIFO must not hang)
    return CorpusSpec(name=_safe_name(Path(path).stem), kind=kind, source=str(Path(path).resolve()), field=field)


LOCAL_KINDS = ("txt", "jsonl", "parquet")


def corpus_spec_from_record(recorded: Any, where: str, fix: str) -> CorpusSpec:
    """A :class:`CorpusSpec` from a record (a profile's metadata): its schema checked (known fields, strings,
    a known kind, a plain name), so a record never builds a spec Python refuses or names a file oddly."""
    fields = {f.name for f in dataclasses.fields(CorpusSpec)}
    if (not isinstance(recorded, dict) or not {"name", "kind", "source"} <= set(recorded) <= fields
            or not all(isinstance(v, str) or v is None for v in recorded.values())
            or recorded["kind"] not in ("hub", "bundled", *LOCAL_KINDS)):
        raise MoePruneError(f"{where} records a corpus that is not a corpus spec ({terminal_safe(recorded)[:120]}); "
                            f"{fix}.")
    try:
        check_corpus_name(recorded["name"])
    except MoePruneError:
        raise MoePruneError(f"{where} records the corpus name {terminal_safe(recorded['name'])[:80]!r}, which is not a "
                            f"corpus name moeprune writes; {fix}.") from None
    return CorpusSpec(**recorded)


def is_builtin_corpus(spec: str) -> bool:
    """A corpus moeprune names itself (wikitext2, c4, ..., the bundled wiki/web and their splits), optionally
    NAME=: not a local file nor an arbitrary hub dataset, which only the user may name."""
    if not isinstance(spec, str):
        return False
    body = spec.partition("=")[2] if "=" in spec and not spec.startswith("hf:") else spec
    return body in KNOWN_HUB or body.partition(":")[0] in BUNDLED_CORPORA


def check_corpus_file(spec: CorpusSpec) -> None:
    """A local .txt or .jsonl corpus is readable text with some text in it (checked before the model loads)."""
    if spec.kind == "txt":
        text = _read_text(Path(spec.source))
        if not text.strip():
            raise MoePruneError(f"Corpus file {spec.source} holds no text (it is empty or only whitespace); "
                                "give a file with documents.")
    elif spec.kind == "jsonl":
        if not _check_jsonl(Path(spec.source), spec.field):
            raise MoePruneError(
                f"Corpus file {spec.source} holds no text: every record's {spec.field!r} is empty, whitespace or "
                "missing; give records with text (or name the text field with FILE.jsonl:FIELD)."
            )


def check_reachable(spec: CorpusSpec) -> None:
    """A hub corpus loads now (from the datasets cache or the hub), so an unreachable one is refused before the
    model loads, with the loader's own message (it names the fix: a local file)."""
    if spec.kind == "hub":
        _load_with_datasets(spec)


def corpus_fingerprint(spec: CorpusSpec) -> str | None:
    """SHA-256 of a local corpus file (None for hub and bundled corpora): an edited file at the same path is
    a different corpus, and a profile of the old one must not be reused."""
    if spec.kind not in ("txt", "jsonl", "parquet"):
        return None
    digest = hashlib.sha256()
    with os.fdopen(open_regular_file(spec.source, "Corpus file"), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_documents(spec: CorpusSpec, max_documents: int | None = None) -> list[str]:
    """The corpus's documents (non-empty strings), in their stored order."""
    if spec.kind == "bundled":
        docs = read_bundled_corpus(spec.source, spec.split)
    elif spec.kind == "txt":
        text = _read_text(Path(spec.source))
        docs = wikitext_articles(text) if _ARTICLE_HEADING.search(text) else re.split(r"\n\s*\n", text)
    else:
        rows = _load_with_datasets(spec)
        # WikiText's rows are lines (each keeps its "\n"): join them back and cut whole articles.
        joined = spec.documents == "articles" or spec.source == WIKITEXT_SOURCE
        docs = wikitext_articles("".join(rows)) if joined else rows
    docs = [d for d in docs if d and d.strip()]
    return docs[:max_documents] if max_documents else docs


def wikitext_articles(text: str) -> list[str]:
    """WikiText raw text cut before every level-1 heading: one string per article (text before the first
    heading, if any, is its own piece)."""
    starts = [m.start() for m in _ARTICLE_HEADING.finditer(text)]
    bounds = [0, *starts, len(text)] if not starts or starts[0] else [*starts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if text[a:b].strip()]


def _read_text(path: Path) -> str:
    """A .txt corpus as UTF-8 text (io.read_text: a regular file; binary or other encodings fail with the fix)."""
    return read_text(path, "Corpus file")


def _load_with_datasets(spec: CorpusSpec) -> list[str]:
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if spec.kind == "jsonl":
        _check_jsonl(Path(spec.source), spec.field)
    try:
        if spec.kind in ("jsonl", "parquet"):
            builder = "json" if spec.kind == "jsonl" else "parquet"
            table = datasets.load_dataset(builder, data_files=spec.source, split="train")
        elif spec.data_files:
            table = datasets.load_dataset(spec.source, data_files={spec.split: spec.data_files}, split=spec.split)
        else:
            table = datasets.load_dataset(spec.source, spec.config, split=spec.split)
    except (ConnectionError, OSError, ValueError, DatasetGenerationError) as err:
        if spec.kind != "hub":
            raise MoePruneError(f"Cannot read corpus file {spec.source}: {err}") from err
        example = (
            f"{spec.name}=/path/to/{spec.name}.txt (or .jsonl with a 'text' field, or .parquet)"
            if spec.field == "text"
            else f"{spec.name}=/path/to/{spec.name}.jsonl:{spec.field} (a local copy of {spec.source})"
        )
        raise MoePruneError(
            f"Corpus {spec.name!r} ({spec.source}) cannot be loaded: the Hugging Face hub is unreachable or the "
            f"dataset is not cached ({type(err).__name__}). Pass a local file instead, e.g. {example}."
        ) from err
    fields = spec.field.split("+")
    missing = [f for f in fields if f not in table.column_names]
    if missing:
        raise MoePruneError(f"Corpus {spec.name!r} has no field {missing[0]!r}; its fields are {table.column_names}.")
    columns = [table[f] for f in fields]
    for name, values in zip(fields, columns, strict=True):
        wrong = next((i for i, t in enumerate(values) if t is not None and not isinstance(t, str)), None)
        if wrong is not None:
            raise MoePruneError(
                f"Corpus {spec.name!r}: field {name!r} of record {wrong + 1} is {values[wrong]!r}, not a string; "
                "every record's text field must be a string."
            )
    if len(fields) == 1:
        return [t or "" for t in columns[0]]
    return ["\n\n".join(v for v in values if v) for values in zip(*columns, strict=True)]


def _check_jsonl(path: Path, field: str) -> bool:
    """Every line of a .jsonl corpus is a JSON object whose ``field`` (each of ``a+b``) is a string (or null):
    one line names the first bad one, instead of a pyarrow traceback. True when some record holds text."""
    has_text = False
    with os.fdopen(open_regular_file(path, "Corpus file"), "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            record = parse_json(raw, f"Corpus file {path} line {number}", "fix or drop that line")
            if not isinstance(record, dict):
                raise MoePruneError(f"Corpus file {path} line {number} is not a JSON object; write one object a line.")
            for name in field.split("+"):  # "a+b" joins fields (see _load_with_datasets)
                value = record.get(name)
                if value is not None and not isinstance(value, str):
                    raise MoePruneError(
                        f"Corpus file {path} line {number}: field {name!r} is {value!r}, not a string; every "
                        f"record's text must be a string (or name another field with {path.name}:FIELD)."
                    )
                has_text = has_text or bool(value and value.strip())
    return has_text


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "corpus"
