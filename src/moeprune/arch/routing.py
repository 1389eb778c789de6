"""Each supported router, re-implemented on cached logits and restricted to a set of kept experts.

``route(spec, config, logits, kept)`` returns what the router of the *pruned* model returns: the
router applied to ``logits[:, kept]`` (and ``bias[kept]``), as if its weight rows had been sliced,
with indices mapped back to the original expert ids. Grouped routers (DeepSeek) then form
``n_group`` groups of ``K / n_group`` consecutive kept experts, exactly as the sliced model's
``view(-1, n_group, K // n_group)`` does. Reconstruction search evaluates thousands of masks this
way from one set of logits, without running the model again.

The rules (names in :class:`moeprune.arch.adapters.ArchSpec.routing`):

- ``softmax_topk``: softmax, top-k, renormalise if ``config.norm_topk_prob`` (Qwen, OLMoE);
- ``softmax_topk_renorm``: softmax, top-k, always renormalise (Mixtral);
- ``deepseek_v2``: softmax, top-k (``topk_method`` greedy) or group-limited greedy (groups scored
  by their best expert, others zeroed), times ``routed_scaling_factor``;
- ``deepseek_v3``: sigmoid; choice scores + ``e_score_correction_bias``; groups scored by the sum
  of their top-2 choice scores; top-k in the ``topk_group`` best groups; weights are the sigmoid
  scores, renormalised (+1e-20) if ``norm_topk_prob``, times ``routed_scaling_factor``;
- ``deepseek_moe``: softmax, top-k, renormalise (+1e-20) if top_k > 1 and ``norm_topk_prob``;
- ``sigmoid_topk_renorm``: ``deepseek_v3`` without groups, always renormalised (MiniMax-M2, HY-V3, AFMoE, Ergo).

The scale of the sigmoid rules is the first config value of :data:`SCALE_KEYS` (1 when none is set);
their choice bias is the router's, else that of the module holding the router linear (Ergo's ``gate``), else the
block's (:data:`CHOICE_BIASES`); a router bias
(GPT-OSS) is part of the logits.

Weights are returned in float32 (routers that cast them to the model dtype do so afterwards).
All functions accept leading batch dimensions (``[..., T, K]``), so many masks route at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

from moeprune.arch.adapters import TOP_K_KEYS, ArchSpec, config_value
from moeprune.errors import MoePruneError

RULES = ("softmax_topk", "softmax_topk_renorm", "deepseek_v2", "deepseek_v3", "deepseek_moe", "sigmoid_topk_renorm")
SCALE_KEYS = ("routed_scaling_factor", "router_scaling_factor", "route_scale", "moe_routed_scaling_factor")
CHOICE_BIASES = ("e_score_correction_bias", "expert_bias")  # per-expert choice bias of sigmoid routers
GROUPED_RULES = ("deepseek_v2", "deepseek_v3")
# Routers that compute logits in float32 whatever the model dtype (the others use the model dtype).
FP32_LOGIT_RULES = ("deepseek_v2", "deepseek_v3")


def route(
    layer_or_spec: Any,
    config: Any,
    logits: torch.Tensor,
    kept: torch.Tensor | Sequence[int] | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index ``[T, k]`` in original expert ids, weights ``[T, k]`` float32) of the router restricted to ``kept``.

    ``layer_or_spec`` is a :class:`~moeprune.arch.view.MoELayer` (its router's
    ``e_score_correction_bias`` is used when ``bias`` is None) or an :class:`ArchSpec`.
    ``logits`` are the full ``[T, N]`` router logits; ``kept`` the kept ids (None: all).
    """
    spec, bias = _spec_and_bias(layer_or_spec, bias)
    num_experts = logits.shape[-1]
    kept_ids = _kept_tensor(kept, num_experts, logits.device)
    sub_logits = logits if kept is None else logits[..., kept_ids]
    sub_bias = bias if bias is None or kept is None else bias[kept_ids]
    groups = positional_groups(spec, config, kept_ids.numel())
    local_index, weights = route_local(spec.routing, config, sub_logits, sub_bias, groups)
    return kept_ids[local_index], weights


def route_local(
    rule: str,
    config: Any,
    logits: torch.Tensor,
    bias: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule on already-restricted logits ``[..., T, K]``; indices are column positions in ``logits``.

    ``bias`` is ``[K]`` or broadcastable to ``[..., 1, K]``; ``groups`` gives each column's routing
    group (``[K]`` or ``[..., 1, K]``, ids 0..n_group-1), None for ungrouped routing.
    """
    top_k = _top_k(config)
    if logits.shape[-1] < top_k:
        raise MoePruneError(f"Routing needs at least top-k={top_k} kept experts, got {logits.shape[-1]}.")
    logits = logits.float()
    if rule in ("softmax_topk", "softmax_topk_renorm", "deepseek_moe"):
        return _softmax_rule(rule, config, logits, top_k)
    if rule == "deepseek_v2":
        return _deepseek_v2(config, logits, groups, top_k)
    if rule == "deepseek_v3":
        return _deepseek_v3(config, logits, bias, groups, top_k)
    if rule == "sigmoid_topk_renorm":
        return _deepseek_v3(config, logits, bias, None, top_k, renormalise=True)
    raise MoePruneError(f"Unknown routing rule {rule!r}; known rules: {', '.join(RULES)}.")


def router_logits(layer: Any, hidden: torch.Tensor) -> torch.Tensor:
    """``[T, N]`` float32 router logits of ``hidden [T, H]``, computed in the dtype the model uses."""
    weight = layer.router.weight
    bias = getattr(layer.router, "bias", None)  # GPT-OSS's router is a linear layer with a bias
    bias = bias if isinstance(bias, torch.Tensor) and bias.shape == weight.shape[:1] else None
    if layer.spec.round_router_weight:  # Ergo: float32 weight rounded to the model dtype, float32 product
        weight = weight.to(hidden.dtype)
    if layer.spec.routing in FP32_LOGIT_RULES or layer.spec.fp32_logits:
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(hidden.to(weight.dtype), weight, bias).float()


def router_bias(layer: Any) -> torch.Tensor | None:
    """The per-expert choice bias of a sigmoid router, float32, or None: the router's, else its owner's (Ergo's
    gate holds the linear and the bias), else the block's (MiniMax-M2, HY-V3, AFMoE and LFM2-MoE keep it there)."""
    for owner in (layer.router, getattr(layer, "router_owner", None), layer.block):
        if owner is None:
            continue
        for name in CHOICE_BIASES:
            bias = getattr(owner, name, None)
            if isinstance(bias, torch.Tensor) and bias.dim() == 1:
                return bias.detach().float()
    return None


def group_count(spec: ArchSpec, config: Any) -> int:
    """Routing groups the kept experts must split evenly over: config ``n_group`` for DeepSeek, else 1."""
    if spec.routing not in GROUPED_RULES or spec.group_key is None:
        return 1
    return int(getattr(config, spec.group_key, None) or 1)


def positional_groups(spec: ArchSpec, config: Any, kept_count: int) -> torch.Tensor | None:
    """Group of each kept column in the sliced model: ``position // (K / n_group)``; None if ungrouped."""
    n_group = group_count(spec, config)
    if not uses_groups(spec, config):
        return None
    if kept_count % n_group:
        raise MoePruneError(
            f"{kept_count} kept experts do not split evenly over n_group={n_group} routing groups; the pruned "
            "model could not route. Keep the same number of experts in every group."
        )
    return torch.arange(kept_count) // (kept_count // n_group)


def uses_groups(spec: ArchSpec, config: Any) -> bool:
    """Whether the router picks groups first (V3; V2 with group_limited_greedy) over n_group > 1 groups."""
    if group_count(spec, config) == 1:
        return False
    # DeepSeek-V2's greedy top-k ignores n_group; only group_limited_greedy and V3 use groups.
    if spec.routing == "deepseek_v3":
        return True
    return spec.routing == "deepseek_v2" and getattr(config, "topk_method", "greedy") == "group_limited_greedy"


def _softmax_rule(rule: str, config: Any, logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = logits.softmax(dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    norm = bool(getattr(config, "norm_topk_prob", False))
    if rule == "softmax_topk_renorm" or (rule == "softmax_topk" and norm):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    elif rule == "deepseek_moe" and top_k > 1 and norm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return index, weights


def _deepseek_v2(
    config: Any, logits: torch.Tensor, groups: torch.Tensor | None, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.softmax(dim=-1)
    if groups is not None and getattr(config, "topk_method", "greedy") == "group_limited_greedy":
        group_scores = _group_scores(scores, groups, int(config.n_group), top=1)
        allowed = _allowed(group_scores, groups, int(config.topk_group))
        scores = scores.masked_fill(~allowed, 0.0)  # V2 zeroes (not -inf) the experts of unchosen groups
    weights, index = torch.topk(scores, top_k, dim=-1)
    return index, weights * float(config.routed_scaling_factor)


def _deepseek_v3(
    config: Any,
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    groups: torch.Tensor | None,
    top_k: int,
    renormalise: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if groups is not None:
        group_scores = _group_scores(choice, groups, int(config.n_group), top=2)
        choice = choice.masked_fill(~_allowed(group_scores, groups, int(config.topk_group)), float("-inf"))
    index = torch.topk(choice, top_k, dim=-1)[1]
    weights = scores.gather(-1, index)
    if renormalise or getattr(config, "norm_topk_prob", False):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return index, weights * _scale(config)


def _scale(config: Any) -> float:
    value = next((getattr(config, k) for k in SCALE_KEYS if getattr(config, k, None) is not None), 1.0)
    return float(value)


def _group_scores(scores: torch.Tensor, groups: torch.Tensor, n_group: int, top: int) -> torch.Tensor:
    """``[..., T, n_group]``: each group's max (top=1) or sum of its top-2 (top=2) scores.

    Groups are given per column, so uneven groups (search intermediates) work too; for even
    consecutive groups this equals the model's ``view(-1, n_group, K // n_group)``.
    """
    columns = []
    for g in range(n_group):
        member = groups == g
        masked = scores.masked_fill(~member, float("-inf"))
        columns.append(masked.topk(top, dim=-1).values.sum(dim=-1))
    return torch.stack(columns, dim=-1)


def _allowed(group_scores: torch.Tensor, groups: torch.Tensor, topk_group: int) -> torch.Tensor:
    """Bool ``[..., T, K]``: the column's group is among the token's ``topk_group`` best groups."""
    chosen = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, chosen, True)
    index = groups.expand(*group_mask.shape[:-1], groups.shape[-1])
    return group_mask.gather(-1, index)


def _spec_and_bias(layer_or_spec: Any, bias: torch.Tensor | None) -> tuple[ArchSpec, torch.Tensor | None]:
    if isinstance(layer_or_spec, ArchSpec):
        return layer_or_spec, bias
    return layer_or_spec.spec, bias if bias is not None else router_bias(layer_or_spec)


def _kept_tensor(kept: torch.Tensor | Sequence[int] | None, num_experts: int, device) -> torch.Tensor:
    if kept is None:
        return torch.arange(num_experts, device=device)
    ids = torch.as_tensor(kept, dtype=torch.int64, device=device)
    if ids.dim() != 1 or ids.numel() == 0:
        raise MoePruneError(f"Kept experts must be a non-empty list of ids, got shape {tuple(ids.shape)}.")
    # The sliced model keeps experts in their original order, so positions follow sorted ids.
    ids = ids.sort().values
    if bool((ids[1:] == ids[:-1]).any()):
        raise MoePruneError(f"Kept expert ids must be distinct, got {ids.tolist()}.")
    if int(ids[0]) < 0 or int(ids[-1]) >= num_experts:
        raise MoePruneError(f"Kept expert ids {ids.tolist()} are outside 0..{num_experts - 1}.")
    return ids


def _top_k(config: Any) -> int:
    for key in (*TOP_K_KEYS, "ffn_config.moe_top_k"):  # DBRX nests its counts in ffn_config
        value = config_value(config, key)
        if isinstance(value, int):
            return value
    raise MoePruneError("Config has no integer num_experts_per_tok (experts per token).")
