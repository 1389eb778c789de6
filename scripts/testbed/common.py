"""Helpers shared by the testbed scripts (paths and corpus reading).

The scripts read the corpus files directly rather than importing ``moeprune`` so they
work from a bare checkout while the package itself is under development.
"""

from __future__ import annotations

import gzip
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "src" / "moeprune" / "bundled"
CORPORA_DIR = BUNDLED / "corpora"
MODEL_DIR = BUNDLED / "model"
CORPORA = ("wiki", "web")  # the generic calibration corpora (and the tokenizer's training text)
HELDOUT_DOMAINS = ("bible", "man", "glossary")  # trained on, never used for calibration
UNSEEN_DOMAINS = ("devil",)  # never trained on, never used for calibration
TRAIN_DOMAINS = CORPORA + HELDOUT_DOMAINS
DOC_SEPARATOR = "\n\n\n"  # must match moeprune.bundled.DOC_SEPARATOR
EOS_TOKEN = "<|endoftext|>"


def read_corpus(name: str, split: str, root: Path = CORPORA_DIR) -> list[str]:
    """Documents of one split (same format as ``moeprune.bundled.read_bundled_corpus``)."""
    text = gzip.decompress((root / name / f"{split}.txt.gz").read_bytes()).decode("utf-8")
    return [doc for doc in text.split(DOC_SEPARATOR) if doc.strip()]
