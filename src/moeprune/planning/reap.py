"""``reap``: keep the K experts with the highest pooled REAP score.

Pooled means the corpora are summed first, sum(reap_sum) / sum(count), as if they were one corpus;
so a corpus weighs in proportion to its routed tokens (unlike ``mean-score``, which averages ratios).
"""

from __future__ import annotations

from moeprune.planning.base import PlanContext, top
from moeprune.planning.mask import LayerMask


def select(ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    return LayerMask(top(ctx.pooled.reap_score()[row], experts, ctx.kept_per_layer))
