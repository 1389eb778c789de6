"""Physical slicing and in-memory masking, checked against an independent reference on the dense model."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from moeprune.arch.adapters import NUM_EXPERTS_KEYS
from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from moeprune.surgery import apply_mask, masked
from tests.tiny_models import ARCH_NAMES, build_model

from . import KEPT_SETS, logits, make_mask, max_diff

SOFTMAX_ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek"]


def _minus_inf_router_logits(router, removed: list[int]) -> list[int]:
    """Make ``router`` compute its logits with the removed experts' columns at -inf; returns a call counter."""
    calls = []
    forward, real_linear = router.forward, F.linear

    def linear(x, weight, bias=None):
        calls.append(1)
        out = real_linear(x, weight, bias)
        column_mask = torch.zeros(out.shape[-1], dtype=out.dtype)
        column_mask[removed] = float("-inf")
        return out + column_mask

    def masked_forward(*args, **kwargs):
        # The only F.linear inside a router's forward is the one producing its logits.
        with mock.patch.object(F, "linear", linear):
            return forward(*args, **kwargs)

    router.forward = masked_forward
    return calls


def _removed(mask, layer: int) -> list[int]:
    return sorted(set(range(mask.num_experts)) - set(mask.kept(layer)))


@pytest.mark.parametrize("arch", SOFTMAX_ARCHS)
def test_sliced_model_equals_dense_with_removed_router_logits_at_minus_inf(arch: str) -> None:
    dense = build_model(arch)
    mask = make_mask(dense)
    pruned = logits(apply_mask(copy.deepcopy(dense), mask))
    original = logits(dense)
    counters = [_minus_inf_router_logits(layer.router, _removed(mask, layer.index)) for layer in moe_layers(dense)]
    reference = logits(dense)
    assert all(counters), "the reference never masked a router"
    assert max_diff(pruned, reference) <= 1e-5
    assert max_diff(pruned, original) > 1e-3  # the pruning did change the model, so the check has teeth


def test_deepseek_v3_sliced_equals_removed_experts_never_chosen() -> None:
    # Sigmoid router: -inf logits would give score 0, still choosable through the correction bias, so the
    # reference masks scores_for_choice (= scores + bias) instead; the mask keeps 2 per group.
    dense = build_model("deepseek_v3")
    mask = make_mask(dense)
    pruned = logits(apply_mask(copy.deepcopy(dense), mask))
    original = logits(dense)
    for layer in moe_layers(dense):
        layer.router.e_score_correction_bias[_removed(mask, layer.index)] = float("-inf")
    assert max_diff(pruned, logits(dense)) <= 1e-5
    assert max_diff(pruned, original) > 1e-3


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_apply_mask_slices_rows_and_updates_counts(arch: str) -> None:
    dense = build_model(arch)
    before = {layer.index: (layer.router.weight.clone(), layer) for layer in moe_layers(dense)}
    originals = {i: copy.deepcopy(layer) for i, (_, layer) in before.items()}
    mask = make_mask(dense)
    apply_mask(dense, mask)
    for layer in moe_layers(dense):
        kept, old = mask.kept(layer.index), originals[layer.index]
        assert torch.equal(layer.router.weight, before[layer.index][0][kept])
        if layer.spec.layout == "fused":
            assert torch.equal(layer.experts.gate_up_proj, old.experts.gate_up_proj[kept])
            assert torch.equal(layer.experts.down_proj, old.experts.down_proj[kept])
            assert layer.experts.num_experts == 4
        else:
            assert len(layer.experts) == 4
            assert torch.equal(layer.experts[1].up_proj.weight, old.experts[kept[1]].up_proj.weight)
        assert getattr(layer.router, "num_experts", None) in (None, 4)
        assert getattr(layer.router, "n_routed_experts", None) in (None, 4)
        if hasattr(layer.router, "e_score_correction_bias"):
            assert torch.equal(layer.router.e_score_correction_bias, old.router.e_score_correction_bias[kept])
    config_counts = {k: getattr(dense.config, k) for k in NUM_EXPERTS_KEYS if hasattr(dense.config, k)}
    assert set(config_counts.values()) == {4}, config_counts


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_masked_applies_then_restores_exactly(arch: str) -> None:
    model = build_model(arch)
    mask = make_mask(model)
    expected_pruned = logits(apply_mask(copy.deepcopy(model), mask))
    original = logits(model)
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    config = model.config.to_dict()
    with masked(model, mask) as pruned:
        assert max_diff(logits(pruned), expected_pruned) <= 1e-6
    assert torch.equal(logits(model), original)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == tensors.keys() and all(after[k] is tensors[k] for k in tensors)
    assert model.config.to_dict() == config


def test_masked_restores_after_an_error_and_supports_many_masks() -> None:
    model = build_model("deepseek_v3")
    original = logits(model)
    with pytest.raises(RuntimeError, match="boom"), masked(model, make_mask(model)):
        raise RuntimeError("boom")
    outputs = []
    for kept_sets in (KEPT_SETS, KEPT_SETS[::-1]):
        with masked(model, make_mask(model, kept_sets)):
            outputs.append(logits(model))
    assert torch.equal(logits(model), original)
    assert max_diff(outputs[0], outputs[1]) > 1e-3


def test_mask_for_another_expert_count_is_refused() -> None:
    model = build_model("qwen3_moe")
    mask = make_mask(model, [[0, 1, 2, 3]], num_experts=16)
    with pytest.raises(MoePruneError, match=r"16 experts per layer.*has 8.*Plan a mask from a profile"):
        apply_mask(model, mask)
    assert moe_layers(model)[0].num_experts == 8  # refused before touching the model


def test_mask_for_other_layers_is_refused() -> None:
    model = build_model("deepseek_v2")  # MoE layers 1 and 2; layer 0 is dense
    with pytest.raises(MoePruneError, match=r"covers MoE layers \[0, 1, 2\].*has MoE layers \[1, 2\]"):
        apply_mask(model, make_mask(model, layers=[0, 1, 2]))


def test_fewer_kept_than_top_k_is_refused() -> None:
    model = build_model("mixtral")
    with pytest.raises(MoePruneError, match=r"K=1 .*top-k=2.*--retain >= 0.25"):
        apply_mask(model, make_mask(model, [[3]]))


def test_uneven_deepseek_groups_are_refused() -> None:
    model = build_model("deepseek_v3")  # n_group=2: experts 0-3 and 4-7
    with pytest.raises(MoePruneError, match=r"keeps \[3, 1\] experts.*n_group=2.*moeprune plan"):
        apply_mask(model, make_mask(model, [[0, 1, 2, 4]]))
    with pytest.raises(MoePruneError, match=r"K=5 .*split evenly over.*n_group=2.*retain ratios"):
        apply_mask(model, make_mask(model, [[0, 1, 2, 4, 5]]))
    assert moe_layers(model)[0].num_experts == 8
