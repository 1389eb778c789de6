"""Profiling: the instrumented forward is the model's forward, and its sums match a per-token reference."""

from __future__ import annotations

import pytest
import torch

from moeprune.arch import moe_layers
from moeprune.options import Calibration
from moeprune.profiling.instrument import StatsRecorder
from moeprune.profiling.runner import profile_windows
from moeprune.profiling.stats import ExpertStats, Profile
from tests.tiny_models import ARCH_NAMES, build_model


def _tokens(seed: int = 0, batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_instrumented_forward_equals_model_forward(arch):
    model = build_model(arch)
    ids = _tokens()
    with torch.no_grad():
        reference = model(ids).logits
        recorder = StatsRecorder(moe_layers(model))
        with recorder.installed():
            observed = model(ids).logits
        restored = model(ids).logits
    torch.testing.assert_close(observed, reference, rtol=0, atol=1e-5)
    assert torch.equal(restored, reference), "the model is not restored after profiling"
    assert recorder.take().count.sum() > 0


def _reference_sums(model, ids: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per token, per selected expert: run the expert on that one token and accumulate, in float64."""
    layers = moe_layers(model)
    routes: dict[int, tuple] = {}
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in layers:

        def router_hook(module, args, output, _i=layer.index, _layout=layer.spec.layout):
            if _layout == "modulelist":  # DeepSeek-MoE gate: (topk_idx, topk_weight, aux)
                routes[_i] = (output[0], output[1])
            else:  # transformers routers: (logits, weights, indices)
                routes[_i] = (output[2], output[1])

        def block_hook(module, args, _i=layer.index):
            inputs[_i] = args[0].reshape(-1, args[0].shape[-1])

        hooks.append(layer.router.register_forward_hook(router_hook))
        hooks.append(layer.block.register_forward_pre_hook(block_hook))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    shape = (len(layers), layers[0].num_experts)
    sums = {name: torch.zeros(shape, dtype=torch.float64) for name in ("count", "gate_sum", "reap_sum", "norm_sum")}
    valid = torch.ones(ids.numel(), dtype=torch.bool) if valid is None else valid.reshape(-1).bool()
    with torch.no_grad():
        for row, layer in enumerate(layers):
            index, weights = routes[layer.index]
            for token in range(index.shape[0]):
                if not valid[token]:
                    continue
                for slot in range(index.shape[1]):
                    expert = int(index[token, slot])
                    g = float(weights[token, slot])
                    norm = float(layer.expert_forward(expert, inputs[layer.index][token : token + 1]).norm())
                    sums["count"][row, expert] += 1
                    sums["gate_sum"][row, expert] += g
                    sums["reap_sum"][row, expert] += g * norm
                    sums["norm_sum"][row, expert] += norm
    return sums


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_profile_sums_equal_per_token_reference(arch):
    model = build_model(arch)
    ids = _tokens(1)
    stats = profile_windows(model, ids, Calibration(batch_size=2, checkpoint_every=16), {}, progress=False)
    reference = _reference_sums(model, ids)
    for name, expected in reference.items():
        torch.testing.assert_close(getattr(stats, name), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert stats.count.sum(dim=1).tolist() == [ids.numel() * 2.0] * len(stats.layers)  # top-2


def test_padding_is_excluded():
    model = build_model("qwen2_moe")
    ids = _tokens(2, batch=2, length=10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    layers = moe_layers(model)
    recorder = StatsRecorder(layers)
    recorder.valid_tokens = mask.reshape(-1).bool()
    with torch.no_grad(), recorder.installed():
        model(ids, attention_mask=mask)
    stats = recorder.take()
    assert stats.count.sum(dim=1).tolist() == [int(mask.sum()) * 2.0] * len(layers)
    # The real tokens are scored exactly as without the padding rows in the reference computation.
    reference = _reference_sums(model, ids, valid=mask)
    torch.testing.assert_close(stats.reap_sum, reference["reap_sum"], rtol=1e-5, atol=1e-6)


def test_profiles_of_two_halves_merge_to_the_whole():
    model = build_model("mixtral")
    ids = _tokens(3, batch=4)
    settings = Calibration(batch_size=2, checkpoint_every=16)
    whole = profile_windows(model, ids, settings, {}, progress=False)
    first = profile_windows(model, ids[:2], settings, {}, progress=False)
    second = profile_windows(model, ids[2:], settings, {}, progress=False)
    merged = first.merge(second)
    for name in ("count", "gate_sum", "reap_sum", "norm_sum"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-9)


def test_profile_round_trips_through_disk(tmp_path):
    model = build_model("olmoe")
    settings = Calibration(batch_size=3, checkpoint_every=16)
    stats = profile_windows(model, _tokens(4), settings, {"model": "tiny", "tokens": 36}, progress=False)
    Profile({"a": stats}).save(tmp_path)
    loaded = ExpertStats.load(tmp_path / "a.safetensors")
    assert torch.equal(loaded.reap_sum, stats.reap_sum) and torch.equal(loaded.layers, stats.layers)
    assert loaded.meta["model"] == "tiny"
    assert Profile.load(tmp_path).names == ["a"]
