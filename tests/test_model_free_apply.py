"""Model-free apply on multi-shard checkpoints writes the same tensors as the in-memory export."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprune.arch import moe_layers
from moeprune.errors import MoePruneError
from moeprune.planning.mask import ExpertMask, LayerMask
from moeprune.surgery import ExportOptions, export_pruned
from moeprune.surgery.shards import prune_checkpoint_files
from tests.tiny_models import build_model


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _random_mask(model, kept: int, seed: int = 0) -> ExpertMask:
    """A random mask keeping ``kept`` experts per layer (K/G per routing group for grouped routers)."""
    rng = random.Random(seed)
    layers = moe_layers(model)
    n = layers[0].num_experts
    groups = getattr(model.config, "n_group", None) or 1
    size, per = n // groups, kept // groups

    def choose() -> list[int]:
        return sorted(e for g in range(groups) for e in rng.sample(range(g * size, (g + 1) * size), per))

    return ExpertMask("tiny", "random", kept / n, n, kept, {layer.index: LayerMask(choose()) for layer in layers})


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v3", "deepseek"])
def test_shard_by_shard_equals_in_memory_export(arch, tmp_path):
    model = build_model(arch)
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="40KB")
    assert len(list(source.glob("*.safetensors"))) > 3, "the test needs a multi-shard checkpoint"
    mask = _random_mask(model, 4)

    in_memory = export_pruned(source, mask, tmp_path / "in_memory", progress=False)
    model_free = prune_checkpoint_files(source, mask, tmp_path / "model_free", progress=False)

    expected, got = _tensors(in_memory), _tensors(model_free)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    index = json.loads((model_free / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert all((model_free / shard).exists() for shard in index["weight_map"].values())
    config = json.loads((model_free / "config.json").read_text())
    assert config == {
        **json.loads((source / "config.json").read_text()),
        **{k: config[k] for k in config if k in ("num_experts", "num_local_experts", "n_routed_experts")},
    }
    assert json.loads((in_memory / "config.json").read_text()).get("num_experts", 4) == 4
    assert ExpertMask.load(model_free / "mask.json").layers == mask.layers
    card = (model_free / "README.md").read_text()
    before = sum(t.numel() for t in _tensors(source).values())
    assert f"{before:,} -> {sum(t.numel() for t in got.values()):,}" in card and "--model-free" in card


def test_mask_for_another_model_is_refused(tmp_path):
    model = build_model("qwen2_moe")
    model.save_pretrained(tmp_path / "source")
    other = _random_mask(build_model("qwen2_moe", num_experts=16), 8)
    with pytest.raises(MoePruneError, match="16 experts per layer"):
        prune_checkpoint_files(tmp_path / "source", other, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_mask_of_another_config_is_refused_from_python_unless_forced(tmp_path):
    # The same check as the CLI's: a mask planned for a model of the same shape but another config hash.
    from moeprune.loading import config_hash

    model = build_model("qwen2_moe")
    model.save_pretrained(tmp_path / "source")
    mask = _random_mask(model, 4)
    other = build_model("qwen2_moe")
    other.config.rms_norm_eps = 1e-3
    mask.extra["config_hash"] = config_hash(other.config)
    with pytest.raises(MoePruneError, match="config hash .*--force"):
        prune_checkpoint_files(tmp_path / "source", mask, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    out = prune_checkpoint_files(tmp_path / "source", mask, tmp_path / "out", ExportOptions(force=True),
                                 progress=False)
    assert ExpertMask.load(out / "mask.json").extra["config_hash"] == mask.extra["config_hash"]
    mask.extra["config_hash"] = config_hash(model.config)  # planned for this model: accepted without force
    prune_checkpoint_files(tmp_path / "source", mask, tmp_path / "same", progress=False)


def test_a_config_transformers_cannot_build_is_checked_without_its_hash_and_says_so(tmp_path, caplog):
    model = build_model("qwen2_moe")
    model.save_pretrained(tmp_path / "source")
    config_file = tmp_path / "source" / "config.json"
    # A model type this transformers does not know (remote code not trusted): only config.json's dict is read.
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "not_in_transformers"}))
    mask = _random_mask(model, 4)
    mask.extra["config_hash"] = "0123456789abcdef"
    with caplog.at_level("WARNING", logger="moeprune.planning.fit"):
        prune_checkpoint_files(tmp_path / "source", mask, tmp_path / "out", progress=False)
    assert "config hash was not checked" in caplog.text


def test_dbrx_flat_layout_and_dotted_config_key(tmp_path):
    # DBRX: experts as blocks of I rows of [N * I, H] matrices, counts in the nested ffn_config.
    from moeprune.loading import load_model
    from moeprune.surgery import masked
    from tests.arch_sweep import build_model as build_swept_model
    from tests.surgery import logits, make_mask

    model = build_swept_model("dbrx")
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="20KB")
    assert len(list(source.glob("*.safetensors"))) > 3, "the test needs a multi-shard checkpoint"
    mask = make_mask(model)  # 4 of 8 experts, different ones per layer

    model_free = prune_checkpoint_files(source, mask, tmp_path / "model_free", progress=False)

    config, original = (json.loads((d / "config.json").read_text()) for d in (model_free, source))
    assert config["ffn_config"]["moe_num_experts"] == 4
    assert config == {**original, "ffn_config": {**original["ffn_config"], "moe_num_experts": 4}}
    with masked(model, mask):
        expected = logits(model)
    assert not torch.equal(expected, logits(model)), "pruning must change the model for the test to have teeth"
    assert torch.equal(logits(load_model(model_free, dtype="float32")), expected)
    # The in-memory export of the same folder (its config.json edited at the same dotted key) writes the same.
    in_memory = export_pruned(source, mask, tmp_path / "in_memory", progress=False)
    written, exported = _tensors(model_free), _tensors(in_memory)
    assert sorted(written) == sorted(exported)
    assert all(torch.equal(written[name], tensor) for name, tensor in exported.items())
    assert json.loads((in_memory / "config.json").read_text())["ffn_config"]["moe_num_experts"] == 4


def test_a_router_layout_the_name_rules_do_not_know_is_refused_with_the_fix(tmp_path):
    from tests.arch_sweep import build_model as build_swept_model
    from tests.surgery import make_mask

    model = build_swept_model("hunyuan_v1_moe")  # router weight at mlp.gate.wg.weight
    model.save_pretrained(tmp_path / "source")
    with pytest.raises(MoePruneError, match=r"no router weight .* Use plain `moeprune apply`"):
        prune_checkpoint_files(tmp_path / "source", make_mask(model), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
