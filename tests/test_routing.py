"""route() reproduces every real router, on all experts and on a physically sliced router."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moeprune.arch.routing import route, router_logits
from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from tests.tiny_models import ARCH_NAMES, build_model

TOKENS = 96


def _real_route(router: nn.Module, hidden: torch.Tensor, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    if arch == "deepseek":  # the remote gate takes [B, S, H] and returns (index, weights, aux)
        index, weights, _ = router(hidden[None])
    else:
        _, weights, index = router(hidden)
    return index, weights.float()


def _sorted(index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index, order = index.sort(dim=-1)
    return index, weights.gather(-1, order)


def _sliced_router(router: nn.Module, kept: list[int]) -> nn.Module:
    """The router of the physically pruned model: weight rows and the V3 bias sliced, count updated."""
    sliced = copy.deepcopy(router)
    ids = torch.tensor(kept)
    sliced.weight = nn.Parameter(router.weight.detach()[ids].clone())
    if hasattr(sliced, "e_score_correction_bias"):
        sliced.e_score_correction_bias = router.e_score_correction_bias[ids].clone()
    for name in ("num_experts", "n_routed_experts"):
        if hasattr(sliced, name):
            setattr(sliced, name, len(kept))
    return sliced


def _layers(arch: str, variant: str | None = None):
    model = build_model(arch, num_experts=8, top_k=2)
    if variant == "limited":  # one of two groups per token, so group selection matters
        model.config.topk_group = 1
        if arch == "deepseek_v2":
            model.config.topk_method = "group_limited_greedy"
            model.config.n_group = 2
        for layer in moe_layers(model):
            layer.router.topk_group = 1
            layer.router.num_group = 2
            if arch == "deepseek_v2":
                layer.router.topk_method = "group_limited_greedy"
    return model, moe_layers(model)


CASES = [(arch, None) for arch in ARCH_NAMES] + [("deepseek_v3", "limited"), ("deepseek_v2", "limited")]
KEPT = {None: [[0, 2, 3, 5, 6, 7], [1, 4, 6], [0, 1, 2, 3]], "limited": [[0, 2, 5, 7], [1, 2, 3, 4, 5, 6]]}


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_route_all_experts_matches_router(arch: str, variant: str | None) -> None:
    model, layers = _layers(arch, variant)
    torch.manual_seed(1)
    hidden = torch.randn(TOKENS, model.config.hidden_size)
    for layer in layers:
        with torch.no_grad():
            want = _sorted(*_real_route(layer.router, hidden, arch))
            got = _sorted(*route(layer, model.config, router_logits(layer, hidden)))
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_route_kept_matches_sliced_router(arch: str, variant: str | None) -> None:
    model, layers = _layers(arch, variant)
    torch.manual_seed(2)
    hidden = torch.randn(TOKENS, model.config.hidden_size)
    kept_sets = [k for k in KEPT[variant] if not (arch == "deepseek_v3" and variant is None and len(k) % 2)]
    for layer in layers:
        for kept in kept_sets:
            with torch.no_grad():
                local, weights = _real_route(_sliced_router(layer.router, kept), hidden, arch)
                want = _sorted(torch.tensor(kept)[local], weights)
                got = _sorted(*route(layer, model.config, router_logits(layer, hidden), kept))
            assert torch.equal(got[0], want[0]), (arch, kept)
            torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)


def test_route_differs_from_drop_after_softmax() -> None:
    """Pruning re-normalises over kept experts: Qwen1.5-MoE routes larger weights afterwards."""
    model, layers = _layers("qwen2_moe")
    logits = router_logits(layers[0], torch.randn(TOKENS, model.config.hidden_size))
    _, full = route(layers[0], model.config, logits)
    _, pruned = route(layers[0], model.config, logits, [0, 1, 2, 3])
    assert pruned.sum(-1).mean() > full.sum(-1).mean()


def test_route_rejects_uneven_groups_and_too_few() -> None:
    model, layers = _layers("deepseek_v3")
    logits = torch.randn(4, 8)
    with pytest.raises(MoePruneError, match="split evenly"):
        route(layers[0], model.config, logits, [0, 1, 2])
    model, layers = _layers("mixtral")
    with pytest.raises(MoePruneError, match="top-k"):
        route(layers[0], model.config, logits, [3])
