"""Corpus specs: where calibration text comes from.

A spec is a string:

- ``wikitext2``  Salesforce/wikitext, wikitext-2-raw-v1, train split (through ``datasets``)
- ``c4``         allenai/c4, ``en/c4-train.00000-of-01024.json.gz`` (through ``datasets``)
- ``wiki``, ``web``  the bundled testbed corpora (train split; ``wiki:test`` picks a split)
- a local file: ``.txt`` (documents separated by blank lines), ``.jsonl`` (a ``text`` field, or
  ``file.jsonl:FIELD``), ``.parquet`` (a ``text`` column, or ``file.parquet:FIELD``)
- ``hf:ID[:CONFIG][:SPLIT][:FIELD]`` any hub dataset (defaults: no config, ``train``, ``text``)

``NAME=SPEC`` gives the corpus another name (the profile file is ``NAME.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError


@dataclass(frozen=True)
class CorpusSpec:
    name: str  # file-safe name used in profile file names
    kind: str  # "hub" | "bundled" | "txt" | "jsonl" | "parquet"
    source: str  # hub id, bundled name or file path
    config: str | None = None
    split: str = "train"
    field: str = "text"
    data_files: str | None = None

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# The paper's generic corpora, as hub datasets.
KNOWN_HUB = {
    "wikitext2": dict(source="Salesforce/wikitext", config="wikitext-2-raw-v1"),
    "c4": dict(source="allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz"),
}


def parse_corpus(spec: str) -> CorpusSpec:
    """Turn a ``--corpus`` argument into a :class:`CorpusSpec`."""
    name, _, body = spec.partition("=") if "=" in spec and not spec.startswith("hf:") else ("", "", spec)
    parsed = _parse_body(body)
    if name:
        parsed = CorpusSpec(**{**parsed.__dict__, "name": _safe_name(name)})
    return parsed


def _parse_body(spec: str) -> CorpusSpec:
    from moeprune.bundled import BUNDLED_CORPORA

    if spec in KNOWN_HUB:
        return CorpusSpec(name=spec, kind="hub", **KNOWN_HUB[spec])
    head, _, split = spec.partition(":")
    if head in BUNDLED_CORPORA:
        from moeprune.bundled import SPLITS

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
    return CorpusSpec(name=_safe_name(Path(path).stem), kind=kind, source=str(Path(path).resolve()), field=field)


def check_corpus_file(spec: CorpusSpec) -> None:
    """A local .txt or .jsonl corpus is readable text (checked before the model loads)."""
    if spec.kind == "txt":
        _read_text(Path(spec.source))
    elif spec.kind == "jsonl":
        _check_jsonl(Path(spec.source), spec.field)


def corpus_fingerprint(spec: CorpusSpec) -> str | None:
    """SHA-256 of a local corpus file (None for hub and bundled corpora): an edited file at the same path is
    a different corpus, and a profile of the old one must not be reused."""
    if spec.kind not in ("txt", "jsonl", "parquet"):
        return None
    digest = hashlib.sha256()
    with Path(spec.source).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_documents(spec: CorpusSpec, max_documents: int | None = None) -> list[str]:
    """The corpus's documents (non-empty strings), in their stored order."""
    if spec.kind == "bundled":
        from moeprune.bundled import read_bundled_corpus

        docs = read_bundled_corpus(spec.source, spec.split)
    elif spec.kind == "txt":
        docs = [d for d in re.split(r"\n\s*\n", _read_text(Path(spec.source))) if d.strip()]
    else:
        docs = _load_with_datasets(spec)
    return docs[:max_documents] if max_documents else docs


def _read_text(path: Path) -> str:
    """A .txt corpus as UTF-8 text; binary or other encodings fail with the fix."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise MoePruneError(f"Corpus file {path} looks binary (it holds NUL bytes), not text; pass a UTF-8 .txt file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MoePruneError(
            f"Corpus file {path} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); convert it, "
            f"e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt."
        ) from err


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
        raise MoePruneError(
            f"Corpus {spec.name!r} ({spec.source}) cannot be loaded: the Hugging Face hub is unreachable or the "
            f"dataset is not cached ({type(err).__name__}). Pass a local file instead, e.g. "
            f"--corpus {spec.name}=/path/to/{spec.name}.txt (or .jsonl with a 'text' field, or .parquet)."
        ) from err
    if spec.field not in table.column_names:
        raise MoePruneError(f"Corpus {spec.name!r} has no field {spec.field!r}; its fields are {table.column_names}.")
    values = table[spec.field]
    wrong = next((i for i, t in enumerate(values) if t is not None and not isinstance(t, str)), None)
    if wrong is not None:
        raise MoePruneError(
            f"Corpus {spec.name!r}: field {spec.field!r} of record {wrong + 1} is {values[wrong]!r}, not a string; "
            "every record's text field must be a string."
        )
    return [t for t in values if t and t.strip()]


def _check_jsonl(path: Path, field: str) -> None:
    """Every line of a .jsonl corpus is a JSON object whose ``field`` is a string (or null): one line names
    the first bad one, instead of a pyarrow traceback."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise MoePruneError(
                    f"Corpus file {path} line {number} is not valid JSON ({err}); fix or drop that line."
                ) from err
            if not isinstance(record, dict):
                raise MoePruneError(f"Corpus file {path} line {number} is not a JSON object; write one object a line.")
            value = record.get(field)
            if value is not None and not isinstance(value, str):
                raise MoePruneError(
                    f"Corpus file {path} line {number}: field {field!r} is {value!r}, not a string; every record's "
                    f"text must be a string (or name another field with {path.name}:FIELD)."
                )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "corpus"
