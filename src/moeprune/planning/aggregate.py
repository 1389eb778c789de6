"""``mean-score`` and ``max-score``: aggregate the per-corpus REAP scores, then keep the top K.

Each corpus gets one vote regardless of its size: mean rewards experts useful everywhere, max keeps an
expert that any single corpus relies on.
"""

from __future__ import annotations

from moeprune.planning.base import PlanContext, top
from moeprune.planning.mask import LayerMask


def mean_score(ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    return LayerMask(top(ctx.mean_scores[row], experts, ctx.kept_per_layer))


def max_score(ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    return LayerMask(top(ctx.corpus_scores[:, row].max(dim=0).values, experts, ctx.kept_per_layer))
