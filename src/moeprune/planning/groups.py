"""Grouped routing (DeepSeek-V3 style ``n_group`` > 1): pruning that keeps the router's groups intact.

The router first picks ``topk_group`` of ``n_group`` equal groups of consecutive experts, then the top-k
experts inside them. After pruning, every group must still have the same size, so the kept count K
splits evenly: each group keeps K / n_group. Other constraints:

- DeepSeek-V3 scores a group by the sum of its top-2 expert scores, so each group keeps >= 2
  (DeepSeek-V2's ``deepseek_v2`` uses the group max, so >= 1 is enough there);
- the chosen groups must hold top-k experts: topk_group * (K / n_group) >= top_k.

Planning then runs the method independently inside each group (experts g*N/G .. (g+1)*N/G - 1) with
K/G kept and the protect budget split over groups (B // G each, the remainder one each to the lowest
groups), and maps the ids back. With n_group None or 1 the layer is one group.
"""

from __future__ import annotations

import math
from typing import Any

from moeprune.errors import MoePruneError


def expert_groups(meta: dict[str, Any], num_experts: int, kept: int) -> list[list[int]]:
    """Expert ids of each routing group, after checking that ``kept`` experts per layer fit the groups."""
    n_group = int(meta.get("n_group") or 1)
    if n_group == 1:
        return [list(range(num_experts))]
    if num_experts % n_group:
        raise MoePruneError(f"The profile has {num_experts} experts, not divisible by n_group={n_group}.")
    problem = _group_problem(meta, num_experts, kept)
    if problem:
        raise MoePruneError(f"{problem} {_suggest(meta, num_experts, kept)}")
    size = num_experts // n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(n_group)]


def split_budget(budget: int, n_groups: int) -> list[int]:
    """B // G protected experts per group, the remainder one each to the lowest groups."""
    share, rest = divmod(budget, n_groups)
    return [share + (g < rest) for g in range(n_groups)]


def _group_problem(meta: dict[str, Any], num_experts: int, kept: int) -> str | None:
    """Why ``kept`` experts per layer cannot be split over the routing groups, or None if they can."""
    n_group = int(meta["n_group"])
    topk_group = int(meta.get("topk_group") or n_group)
    top_k = int(meta.get("top_k") or 1)
    per_group = kept // n_group
    if kept % n_group:
        return (
            f"K={kept} kept experts do not split evenly over the router's n_group={n_group} groups; "
            "every group must keep the same number."
        )
    if per_group < _min_per_group(meta):
        return (
            f"K={kept} keeps {per_group} experts per group, but {meta.get('model_type', 'this model')} scores"
            f" a group by the sum of its top-2 experts, so each of the {n_group} groups must keep at least 2."
        )
    if topk_group * per_group < top_k:
        return (
            f"K={kept} keeps {per_group} experts per group, so the router's topk_group={topk_group} groups "
            f"would hold {topk_group * per_group} experts, fewer than its top-k={top_k}."
        )
    return None


def _min_per_group(meta: dict[str, Any]) -> int:
    # DeepSeek-V2 scores a group by its best expert; V3 and its relatives by the sum of the top 2.
    return 1 if meta.get("model_type") == "deepseek_v2" else 2


def _suggest(meta: dict[str, Any], num_experts: int, kept: int) -> str:
    valid = [k for k in range(1, num_experts + 1) if _group_problem(meta, num_experts, k) is None]
    if not valid:
        return "No retain ratio fits this model's routing groups."
    below = [k for k in valid if k < kept][-1:]
    above = [k for k in valid if k > kept][:1]
    # Rounded up to 4 decimals so that floor(rho * N) still gives k.
    options = [f"{math.ceil(k / num_experts * 1e4) / 1e4:g} (K={k})" for k in below + above]
    return f"Nearest valid retain ratios: {' or '.join(options)}."
