"""apply holds one model at a time, in the checkpoint's dtype (the measured bound is benchmarks/apply_memory.py)."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.surgery import export
from moeprune.surgery.export import export_pruned
from tests.tiny_models import build_model, save_model

from . import make_mask


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory) -> Path:
    return save_model(build_model("qwen2_moe").to(torch.bfloat16), tmp_path_factory.mktemp("bf16") / "model")


def test_the_pruned_model_is_freed_before_the_reload_and_nothing_is_fp32(bf16_source, tmp_path, monkeypatch):
    loads, alive = [], []
    original = export.load_model

    def recording_load(path, **kwargs):
        loads.append((kwargs["dtype"], sum(ref() is not None for ref in alive)))
        model = original(path, **kwargs)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(export, "load_model", recording_load)
    export_pruned(bf16_source, make_mask(build_model("qwen2_moe")), tmp_path / "out", progress=False)
    # Loaded once to prune, once to verify; the second load finds the first model gone; both in bf16.
    assert loads == [(torch.bfloat16, 0), (torch.bfloat16, 0)]


@pytest.mark.parametrize("key", ["norm_topk_prob", "rope_theta"])
def test_bf16_verification_still_catches_a_wrong_config(key, bf16_source, tmp_path, monkeypatch):
    original = export.pruned_config_json

    def wrong_config(*args):
        config = original(*args)
        if key == "rope_theta":
            config["rope_parameters"]["rope_theta"] *= 100
        else:
            config[key] = not config[key]
        return config

    monkeypatch.setattr(export, "pruned_config_json", wrong_config)
    with pytest.raises(MoePruneError, match="logits differ"):
        export_pruned(bf16_source, make_mask(build_model("qwen2_moe")), tmp_path / "out", progress=False)
