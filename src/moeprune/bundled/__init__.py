"""The bundled testbed: small English corpora in several domains and a small trained Qwen1.5-MoE-shaped LM.

Domains: ``wiki`` and ``web`` are the generic calibration corpora (``BUNDLED_CORPORA``);
``bible``, ``man`` and ``glossary`` are held-out domains (``HELDOUT_DOMAINS``): the model was
trained on their train splits but calibration never uses them, so their test splits measure
whether pruning keeps behaviour the calibration never saw; ``devil`` (``UNSEEN_DOMAINS``) was
never trained on at all: text of a kind the model has not seen.

Layout (package data)::

    bundled/corpora/{wiki,web,bible,man,glossary,devil}/{train,validation,test}.txt.gz
    bundled/model/       config.json, model.safetensors, tokenizer files
    bundled/testbed.json measured numbers (perplexity, routing entropy, overlaps)
    bundled/SOURCES.md   every source and its licence

Corpus file format: UTF-8 text, gzip-compressed. Documents are separated by
``DOC_SEPARATOR`` (two blank lines, i.e. ``"\\n\\n\\n"``); inside a document paragraphs
are separated by at most one blank line, so the separator never occurs within a document.
See ``docs/testbed.md`` and ``scripts/testbed/`` for how everything is rebuilt.
"""

from __future__ import annotations

import gzip
from pathlib import Path

BUNDLED_CORPORA: tuple[str, ...] = ("wiki", "web")  # generic calibration corpora
HELDOUT_DOMAINS: tuple[str, ...] = ("bible", "man", "glossary")  # trained on, never calibrated on
UNSEEN_DOMAINS: tuple[str, ...] = ("devil",)  # neither trained nor calibrated on
BUNDLED_DOMAINS: tuple[str, ...] = BUNDLED_CORPORA + HELDOUT_DOMAINS + UNSEEN_DOMAINS
SPLITS: tuple[str, ...] = ("train", "validation", "test")
DOC_SEPARATOR = "\n\n\n"

_ROOT = Path(__file__).resolve().parent


def bundled_model_path() -> Path:
    """Directory loadable with ``AutoModelForCausalLM/AutoTokenizer.from_pretrained``."""
    return _ROOT / "model"


def bundled_corpus_path(name: str, split: str) -> Path:
    """Path of one gzip split file, e.g. ``bundled_corpus_path("wiki", "test")``."""
    if name not in BUNDLED_DOMAINS:
        raise ValueError(f"unknown bundled corpus {name!r}; choose from {BUNDLED_DOMAINS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return _ROOT / "corpora" / name / f"{split}.txt.gz"


def read_bundled_corpus(name: str, split: str) -> list[str]:
    """The documents of one split, in file order."""
    text = gzip.decompress(bundled_corpus_path(name, split).read_bytes()).decode("utf-8")
    return [doc for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def bundled_testbed_json() -> Path:
    """Path of the measured-numbers file written by ``scripts/testbed/report.py``."""
    return _ROOT / "testbed.json"


__all__ = [
    "BUNDLED_CORPORA",
    "BUNDLED_DOMAINS",
    "DOC_SEPARATOR",
    "HELDOUT_DOMAINS",
    "SPLITS",
    "bundled_corpus_path",
    "bundled_model_path",
    "bundled_testbed_json",
    "read_bundled_corpus",
    "UNSEEN_DOMAINS",
]
