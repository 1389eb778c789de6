"""Exports keep the source's tokenizer files byte for byte, and write a class transformers 4.x also has."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from moeprune.bundled import bundled_model_path, read_bundled_corpus
from moeprune.loading import ModelSource, load_model
from moeprune.surgery import export_pruned
from moeprune.surgery import tokenizer_files as tf
from tests.tiny_models import build_model, save_model

from . import make_mask

BUNDLED_FILES = ("tokenizer.json", "tokenizer_config.json")


def _ids(folder: Path, texts: list[str]) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(text)["input_ids"] for text in texts]


def _texts() -> list[str]:
    return read_bundled_corpus("web", "test")[:20] + ["", " <|endoftext|> x", "Tab\tnew\nline ünïcödé 123"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny qwen2_moe with the bundled tokenizer files *copied* (not re-saved), a tokenizer_config.json in a
    layout transformers would rewrite (compact, an extra field) and a chat template beside it."""
    path = tmp_path_factory.mktemp("tok") / "source"
    save_model(build_model("qwen2_moe", vocab_size=4096), path)
    shutil.copyfile(bundled_model_path() / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((bundled_model_path() / "tokenizer_config.json").read_text())
    config["note"] = "kept as written"
    (path / "tokenizer_config.json").write_text(json.dumps(config, separators=(",", ":")))
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return path


def test_bundled_tokenizer_names_a_class_both_major_versions_have() -> None:
    config = json.loads((bundled_model_path() / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_the_portable_class_tokenizes_as_transformers_5_backend(tmp_path: Path) -> None:
    """The class change alone does not change one id (transformers 5 builds the same backend from tokenizer.json)."""
    backend = tmp_path / "backend"
    backend.mkdir()
    for name in BUNDLED_FILES:
        shutil.copyfile(bundled_model_path() / name, backend / name)
    config = json.loads((backend / "tokenizer_config.json").read_text())
    (backend / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    texts = _texts()
    assert _ids(bundled_model_path(), texts) == _ids(backend, texts)
    assert len(AutoTokenizer.from_pretrained(bundled_model_path())) == 4096


def test_export_copies_the_source_tokenizer_files_byte_for_byte(source: Path, tmp_path: Path) -> None:
    model = load_model(source, dtype="float32")
    out = export_pruned(source, make_mask(model), tmp_path / "pruned", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert _ids(out, _texts()) == _ids(source, _texts())


def test_export_with_a_tokenizer_path_copies_that_folder(source: Path, tmp_path: Path) -> None:
    model_only = tmp_path / "model-only"
    save_model(build_model("qwen2_moe", vocab_size=4096), model_only)
    mask = make_mask(load_model(model_only, dtype="float32"))
    out = export_pruned(ModelSource.of(model_only, tokenizer=source), mask, tmp_path / "pruned", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name


def test_a_tokenizer_object_is_saved_with_a_portable_class(source: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(source)
    model = load_model(source, dtype="float32")
    out = export_pruned(ModelSource.of(model, tokenizer=tok), make_mask(model), tmp_path / "pruned", progress=False)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 5 alone writes TokenizersBackend
    assert _ids(out, _texts()) == _ids(source, _texts())


def test_make_portable_replaces_only_transformers_5_only_classes(tmp_path: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "model_max_length": 7}))
    assert tf.make_portable(tmp_path)
    assert json.loads(config.read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 7}
    config.write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    before = config.read_bytes()
    assert not tf.make_portable(tmp_path) and config.read_bytes() == before
    assert not tf.make_portable(tmp_path / "missing")


def test_hub_sources_are_copied_from_the_local_cache(tmp_path: Path, monkeypatch) -> None:
    """A hub id's tokenizer files already in the Hugging Face cache are found without a download."""
    import huggingface_hub

    (tmp_path / "tokenizer.json").write_text("{}")
    cached = {"tokenizer.json": str(tmp_path / "tokenizer.json")}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: cached.get(name) if repo == "org/model" else None)
    assert tf.source_tokenizer_files("org/model", BUNDLED_FILES) == {"tokenizer.json": tmp_path / "tokenizer.json"}
    assert tf.source_tokenizer_files("other/model", BUNDLED_FILES) == {}


def test_the_prune_pipeline_copies_the_tokenizer_files_too(source: Path, tmp_path: Path) -> None:
    """``moeprune prune`` loads the tokenizer for calibration; the export still copies the files, not that object."""
    from moeprune.cli import main

    out = tmp_path / "pruned"
    argv = ["prune", source, "--corpus", "wiki", "--samples", "4", "--seq-len", "32", "--batch-size", "2",
            "--method", "frequency", "--retain", "0.5", "--out", out]
    assert main([str(a) for a in argv]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
