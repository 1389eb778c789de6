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


def load_documents(spec: CorpusSpec, max_documents: int | None = None) -> list[str]:
    """The corpus's documents (non-empty strings), in their stored order."""
    if spec.kind == "bundled":
        from moeprune.bundled import read_bundled_corpus

        docs = read_bundled_corpus(spec.source, spec.split)
    elif spec.kind == "txt":
        text = Path(spec.source).read_text(encoding="utf-8")
        docs = [d for d in re.split(r"\n\s*\n", text) if d.strip()]
    else:
        docs = _load_with_datasets(spec)
    return docs[:max_documents] if max_documents else docs


def _load_with_datasets(spec: CorpusSpec) -> list[str]:
    import datasets

    try:
        if spec.kind in ("jsonl", "parquet"):
            builder = "json" if spec.kind == "jsonl" else "parquet"
            table = datasets.load_dataset(builder, data_files=spec.source, split="train")
        elif spec.data_files:
            table = datasets.load_dataset(spec.source, data_files={spec.split: spec.data_files}, split=spec.split)
        else:
            table = datasets.load_dataset(spec.source, spec.config, split=spec.split)
    except (ConnectionError, OSError, ValueError) as err:
        if spec.kind != "hub":
            raise MoePruneError(f"Cannot read corpus file {spec.source}: {err}") from err
        raise MoePruneError(
            f"Corpus {spec.name!r} ({spec.source}) cannot be loaded: the Hugging Face hub is unreachable or the "
            f"dataset is not cached ({type(err).__name__}). Pass a local file instead, e.g. "
            f"--corpus {spec.name}=/path/to/{spec.name}.txt (or .jsonl with a 'text' field, or .parquet)."
        ) from err
    if spec.field not in table.column_names:
        raise MoePruneError(f"Corpus {spec.name!r} has no field {spec.field!r}; its fields are {table.column_names}.")
    return [t for t in table[spec.field] if t and t.strip()]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "corpus"
