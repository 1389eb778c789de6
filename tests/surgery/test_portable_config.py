"""The exported config.json is the source's, field for field, with only the expert count changed.

transformers 5 writes rope_parameters/dtype and drops rope_theta/rope_scaling/torch_dtype; a transformers
4.x reader of such a file silently uses rope_theta 10000. These tests write the source as 4.x does, prune it
(in memory and model-free), check what a 4.x reader would read, and reload in transformers 5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeprune.arch.adapters import NUM_EXPERTS_KEYS
from moeprune.loading import load_model
from moeprune.surgery import apply_mask, export_pruned
from moeprune.surgery.shards import prune_checkpoint_files
from tests.tiny_models import build_model

from . import logits, make_mask, max_diff

# DeepSeek-V2-Lite's rope_scaling, with original_max_position_embeddings scaled to the tiny model's 128.
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}


def _source_as_transformers4(arch: str, path: Path, rope_theta: float, **extra) -> dict:
    """Save a tiny model and rewrite its config.json the way transformers 4.x writes it."""
    build_model(arch).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters")
    config["torch_dtype"] = config.pop("dtype")
    config.update(rope_theta=rope_theta, custom_field_of_another_tool=[1, 2], **extra)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config


def _prune(how: str, source: Path, mask, out: Path) -> Path:
    if how == "model-free":
        return prune_checkpoint_files(source, mask, out, progress=False)
    return export_pruned(source, mask, out, progress=False)


@pytest.mark.parametrize("how", ["in-memory", "model-free"])
@pytest.mark.parametrize(
    ("arch", "extra"),
    [("qwen2_moe", {}), ("deepseek_v2", {"rope_scaling": YARN, "auto_map": AUTO_MAP})],
)
def test_export_keeps_every_source_field(arch: str, extra: dict, how: str, tmp_path: Path) -> None:
    source = _source_as_transformers4(arch, tmp_path / "source", rope_theta=123456.0, **extra)
    dense = load_model(tmp_path / "source", dtype="float32")
    mask = make_mask(dense)
    expected = logits(apply_mask(dense, mask))

    out = _prune(how, tmp_path / "source", mask, tmp_path / "pruned")
    written = json.loads((out / "config.json").read_text())
    counts = {k for k in NUM_EXPERTS_KEYS if source.get(k) == 8}
    assert counts and all(written[k] == 4 for k in counts)
    assert {k: v for k, v in written.items() if k in source and k not in counts} == \
        {k: v for k, v in source.items() if k not in counts}
    # What a transformers 4.x reader takes from the file: the source's rope and dtype, not its defaults.
    assert written["rope_theta"] == 123456.0 and written["torch_dtype"] == "float32"
    assert written.get("rope_scaling") == extra.get("rope_scaling")
    assert written.get("auto_map") == extra.get("auto_map")

    reloaded = load_model(out, dtype="float32")  # transformers 5 reads the same file
    assert reloaded.config.rope_parameters["rope_theta"] == 123456.0
    assert max_diff(logits(reloaded), expected) <= 1e-5


def test_model_without_source_file_gets_legacy_keys(tmp_path: Path) -> None:
    _source_as_transformers4("deepseek_v2", tmp_path / "source", rope_theta=50000.0, rope_scaling=YARN)
    model = load_model(tmp_path / "source", dtype="float32")
    model.name_or_path = model.config._name_or_path = ""  # as if built in memory: no config.json to copy
    out = export_pruned(model, make_mask(model), tmp_path / "pruned", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 50000.0
    assert written["rope_scaling"] == {**YARN, "rope_type": "yarn"}
    assert written["torch_dtype"] == "float32" and written["n_routed_experts"] == 4
