"""Shared fixtures: tiny checkpoints on disk with the bundled tokenizer, and a small local corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from moeprune.bundled import bundled_model_path, read_bundled_corpus
from tests.tiny_models import build_model, save_model


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_model_path())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny qwen2_moe (8 experts, top-2) saved with the bundled tokenizer, as a user's local checkpoint."""
    path = tmp_path_factory.mktemp("models") / "tiny-qwen2-moe"
    save_model(build_model("qwen2_moe", vocab_size=len(tokenizer)), path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A local .txt corpus (documents separated by blank lines) cut from the bundled web test split."""
    path = tmp_path_factory.mktemp("corpora") / "notes.txt"
    path.write_text("\n\n".join(read_bundled_corpus("web", "test")[:60]))
    return path
