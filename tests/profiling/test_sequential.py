"""Layer-sequential profiling gives the plain path's statistics."""

from __future__ import annotations

import pytest
import torch

from moeprune.options import Calibration
from moeprune.profiling.runner import profile_windows
from moeprune.profiling.sequential import profile_windows_sequential
from moeprune.profiling.stats import SUM_FIELDS
from tests.tiny_models import build_model


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "deepseek"])
def test_sequential_equals_plain(arch):
    model = build_model(arch)
    windows = torch.randint(3, 128, (5, 12), generator=torch.Generator().manual_seed(7))
    plain = profile_windows(model, windows, Calibration(batch_size=2, checkpoint_every=16), {}, progress=False)
    layered = profile_windows_sequential(model, windows, 2, {}, device="cpu", progress=False)
    assert torch.equal(layered.count, plain.count)
    for name in SUM_FIELDS:
        torch.testing.assert_close(getattr(layered, name), getattr(plain, name), rtol=1e-6, atol=1e-8, msg=name)
    assert layered.meta["sequential"] is True
    # The model is whole again afterwards: a normal forward still works and is unchanged.
    with torch.no_grad():
        assert torch.isfinite(model(windows[:1]).logits).all()


def test_sequential_keeps_dbrx_blocks_where_they_are():
    """DBRX names its decoder list ``blocks``: sequential profiling must not register it under a second name
    (``layers``), nor move the blocks with the rest of the model."""
    from moeprune.arch.view import decoder_layers
    from moeprune.streaming.layers import ResidentLayers
    from tests.arch_sweep import build_model as build_swept_model

    model = build_swept_model("dbrx")
    keys = list(model.state_dict())
    windows = torch.randint(3, 128, (3, 8), generator=torch.Generator().manual_seed(7))
    plain = profile_windows(model, windows, Calibration(batch_size=2, checkpoint_every=16), {}, progress=False)
    layered = profile_windows_sequential(model, windows, 2, {}, device="cpu", progress=False)
    assert torch.equal(layered.count, plain.count)
    assert list(model.state_dict()) == keys
    assert not hasattr(model.base_model, "layers")
    # "meta" stands in for the accelerator: everything else goes there, the blocks keep their CPU weights.
    blocks = decoder_layers(model)
    ResidentLayers(model, "meta").load_outside()
    assert {p.device.type for p in blocks.parameters()} == {"cpu"}
    assert {p.device.type for n, p in model.named_parameters() if ".blocks." not in f".{n}"} == {"meta"}
    assert list(model.state_dict()) == keys
