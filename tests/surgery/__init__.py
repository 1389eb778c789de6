"""Helpers for the apply-stage tests: masks for the tiny models and logits on fixed random tokens."""

from __future__ import annotations

import torch
from torch import nn

from moeprune.arch.view import moe_layers
from moeprune.planning.mask import ExpertMask, LayerMask

# Different kept sets per layer catch layer mix-ups; each keeps 2 of every 4 consecutive experts, so the
# sets also fit DeepSeek-V3's n_group=2 groups of the tiny models.
KEPT_SETS = ([0, 2, 5, 7], [1, 3, 4, 6], [0, 3, 4, 7])


def make_mask(model: nn.Module, kept_sets=KEPT_SETS, num_experts: int = 8, layers: list[int] | None = None,
              kept_per_layer: int | None = None) -> ExpertMask:
    layers = [layer.index for layer in moe_layers(model)] if layers is None else layers
    kept = {index: LayerMask(list(kept_sets[i % len(kept_sets)])) for i, index in enumerate(layers)}
    k = len(kept_sets[0]) if kept_per_layer is None else kept_per_layer
    return ExpertMask("tiny", "test", k / num_experts, num_experts, k, kept)


def keep_all(model: nn.Module) -> ExpertMask:
    return make_mask(model, [list(range(8))])


TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
