"""Exported checkpoints reload with the in-memory pruned model's logits; failures leave no output."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from moeprune.loading import ModelSource, load_model
from moeprune.planning.mask import ExpertMask
from moeprune.surgery import ExportOptions, apply_mask, export_pruned
from tests.tiny_models import ARCH_NAMES, build_model, save_model

from . import keep_all, logits, make_mask, max_diff


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each architecture's tiny model saved once, built on demand: arch -> checkpoint directory."""
    root, saved = tmp_path_factory.mktemp("sources"), {}

    def get(arch: str) -> Path:
        if arch not in saved:
            saved[arch] = save_model(build_model(arch), root / arch)
        return saved[arch]

    return get


def _export(arch: str, source: Path, mask: ExpertMask, out: Path, options: ExportOptions | None = None) -> Path:
    return export_pruned(ModelSource.of(source, trust_remote_code=arch == "deepseek"), mask, out, options,
                         progress=False)


def _reload(arch: str, path: Path):
    return load_model(path, dtype="float32", trust_remote_code=arch == "deepseek")


def _tensor_names(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_export_round_trip(arch: str, sources, tmp_path: Path) -> None:
    model = build_model(arch)
    mask = make_mask(model)
    expected = logits(apply_mask(copy.deepcopy(model), mask))
    out = _export(arch, sources(arch), mask, tmp_path / "pruned")
    reloaded = _reload(arch, out)
    assert max_diff(logits(reloaded), expected) <= 1e-5
    spec = moe_layers(reloaded)[0].spec
    assert getattr(reloaded.config, spec.num_experts_key) == 4
    for layer in moe_layers(reloaded):
        assert layer.router.weight.shape[0] == 4
        if spec.layout == "fused":
            assert layer.experts.gate_up_proj.shape[0] == layer.experts.down_proj.shape[0] == 4
        else:
            assert len(layer.experts) == 4
    names = _tensor_names(out)
    assert not any("gate_up_proj" in n for n in names), "expected hub-style per-expert keys"
    assert any(".experts.3." in n for n in names) and not any(".experts.4." in n for n in names)
    written = ExpertMask.load(out / "mask.json")
    export = written.extra.pop("export")  # what was written: format and tensor bytes before and after
    assert export["format"] == "float32 (unquantized)" and 0 < export["bytes_after"] < export["bytes_before"]
    assert written.to_json() == mask.to_json()
    card = (out / "README.md").read_text()
    assert "K=4 of N=8" in card and "moeprune apply" in card
    if arch == "deepseek":
        assert (out / "modeling_deepseek.py").exists()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_keep_all_export_equals_original(arch: str, sources, tmp_path: Path) -> None:
    model = build_model(arch)
    out = _export(arch, sources(arch), keep_all(model), tmp_path / "all")
    assert max_diff(logits(_reload(arch, out)), logits(model)) <= 1e-5


def test_exporting_a_loaded_model_leaves_it_unchanged(sources, tmp_path: Path) -> None:
    model = load_model(sources("deepseek"), dtype="float32", trust_remote_code=True)
    before = logits(model)
    out = export_pruned(model, make_mask(model), tmp_path / "pruned", progress=False)
    assert torch.equal(logits(model), before)
    assert (out / "modeling_deepseek.py").exists()  # remote code came along with the loaded model


def test_existing_output_needs_overwrite(sources, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("x")
    (out / "mask.json").write_text("{}")  # a previous moeprune output: --overwrite replaces only those
    mask = make_mask(build_model("qwen3_moe"))
    with pytest.raises(MoePruneError, match=r"already exists.*--overwrite"):
        _export("qwen3_moe", sources("qwen3_moe"), mask, out)
    _export("qwen3_moe", sources("qwen3_moe"), mask, out, ExportOptions(overwrite=True))
    assert not (out / "old.txt").exists() and (out / "config.json").exists()


def test_failed_verification_leaves_no_output(sources, tmp_path: Path) -> None:
    model = load_model(sources("mixtral"), dtype="float32")
    original_save = model.save_pretrained

    def corrupt_save(directory, **kwargs):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        key = next(k for k in state if k.endswith("experts.gate_up_proj"))
        state[key][1] += 0.5  # one kept expert's weights go wrong on the way to disk
        return original_save(directory, state_dict=state, **kwargs)

    model.save_pretrained = corrupt_save
    before = logits(model)
    with pytest.raises(MoePruneError, match=r"Verification failed.*weights differ.*experts.*nothing was written"):
        export_pruned(model, make_mask(model), tmp_path / "pruned", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory
    assert torch.equal(logits(model), before)


def test_tokenizer_is_copied_from_the_model_directory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = load_model(tiny_checkpoint, dtype="float32")
    out = export_pruned(tiny_checkpoint, make_mask(model), tmp_path / "pruned", progress=False)
    assert (out / "tokenizer.json").exists()


def test_bf16_checkpoint_exports_in_bf16_and_verifies(tmp_path: Path) -> None:
    source = save_model(build_model("deepseek_v3").to(torch.bfloat16), tmp_path / "bf16")
    mask = make_mask(build_model("deepseek_v3"))
    out = export_pruned(source, mask, tmp_path / "pruned", progress=False)  # dtype="auto" keeps bf16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor(_tensor_names(out)[0]).dtype == torch.bfloat16


def test_verification_compares_logits_not_only_weights(sources, tmp_path: Path, monkeypatch) -> None:
    from moeprune.surgery import export

    model = load_model(sources("qwen3_moe"), dtype="float32")
    original = export.pruned_config_json

    def wrong_config(*args):
        config = original(*args)
        config["norm_topk_prob"] = not config["norm_topk_prob"]  # same weights, different routing
        return config

    monkeypatch.setattr(export, "pruned_config_json", wrong_config)
    with pytest.raises(MoePruneError, match=r"Verification failed.*logits differ"):
        export_pruned(model, make_mask(model), tmp_path / "pruned", progress=False)
    assert list(tmp_path.iterdir()) == []
