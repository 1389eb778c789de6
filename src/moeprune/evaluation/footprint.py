"""Model size: total parameters, routed-expert parameters and bytes, and dense-vs-pruned ratios."""

from __future__ import annotations

from typing import Any

import torch

from moeprune.arch import moe_layers


def footprint(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts and bytes of ``model`` as it is in memory (shared/tied tensors counted once).

    ``params_routed_experts`` counts the routed experts only (not routers, shared experts or
    dense layers): the part that expert pruning shrinks. An in-memory mask does not change these
    numbers; an exported pruned checkpoint does.
    """
    params = _unique_params(model)
    routed = {id(p): p for layer in moe_layers(model) for p in layer.experts.parameters()}
    return {
        "params_total": sum(p.numel() for p in params.values()),
        "params_routed_experts": sum(p.numel() for p in routed.values()),
        "bytes": sum(p.numel() * p.element_size() for p in params.values()),  # parameters, in their dtype
    }


def compare_footprints(dense: dict[str, int], pruned: dict[str, int]) -> dict[str, Any]:
    """Each footprint field of both models and ``pruned / dense`` for each (e.g. ``params_total_ratio``)."""
    out: dict[str, Any] = {"dense": dict(dense), "pruned": dict(pruned)}
    for key, value in dense.items():
        out[f"{key}_ratio"] = pruned[key] / value if value else None
    return out


def _unique_params(model: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    # Keyed by identity so tied embeddings count once.
    return {id(p): p for p in model.parameters()}
