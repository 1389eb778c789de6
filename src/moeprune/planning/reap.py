"""``reap``: keep the K experts with the highest pooled REAP score, or the score on one named corpus.

Pooled means the corpora are summed first, sum(reap_sum) / sum(count), as if they were one corpus;
so a corpus weighs in proportion to its routed tokens (unlike ``mean-score``, which averages ratios).
With ``ctx.score_corpus`` (``--reap-corpus``) only that corpus's statistics count: REAP calibrated on
one corpus, as its authors run it (e.g. on Evol-CodeAlpaca).
"""

from __future__ import annotations

from moeprune.planning.base import PlanContext, top
from moeprune.planning.mask import LayerMask


def select(ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    stats = ctx.profile.corpora[ctx.score_corpus] if ctx.score_corpus else ctx.pooled
    return LayerMask(top(stats.reap_score()[row], experts, ctx.kept_per_layer))
