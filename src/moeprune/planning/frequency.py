"""``frequency``: keep the K experts the router chose most often, counts summed over all corpora."""

from __future__ import annotations

from moeprune.planning.base import PlanContext, top
from moeprune.planning.mask import LayerMask


def select(ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    return LayerMask(top(ctx.pooled.count[row], experts, ctx.kept_per_layer))
