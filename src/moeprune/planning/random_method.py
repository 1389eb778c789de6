"""``random``: keep K experts drawn uniformly without replacement, a floor every method should beat."""

from __future__ import annotations

import numpy as np

from moeprune.planning.base import PlanContext
from moeprune.planning.mask import LayerMask


def select(ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    # Seeded by (seed, decoder layer, first expert id): each layer's (and routing group's) draw is
    # reproducible on its own, whatever other layers are planned alongside.
    rng = np.random.default_rng([ctx.seed, ctx.layer(row), experts[0]])
    picks = rng.choice(len(experts), size=ctx.kept_per_layer, replace=False)
    return LayerMask(sorted(experts[int(i)] for i in picks))
