"""``tb-coverage``: Generic TB-Coverage (arXiv 2607.01710).

Per MoE layer:

1. rank the experts of every corpus by that corpus's REAP score;
2. protect B experts by round-robin over the corpus rankings (profile order): each turn takes that
   corpus's best expert not yet protected, so every corpus gets its top experts covered;
3. start from the candidate mask (a method's K kept experts) and add every protected expert;
4. while more than K are kept, drop the unprotected kept expert with the lowest mean score (mean over
   corpora of the REAP scores).

With B = 0 the result is the candidate; with one corpus the protected set is its top B. With B >= K
(B is clamped to K) every kept expert is protected, so the result is the round-robin alone and the
candidate is never computed (a reconstruction candidate would cost minutes per layer for nothing).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moeprune.planning.base import PlanContext, layer_selection, ranked
from moeprune.planning.mask import LayerMask


def select(ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    rankings = [ranked(scores[row], experts) for scores in ctx.corpus_scores]
    protected = round_robin(rankings, min(ctx.protect_budget, ctx.kept_per_layer))
    if len(protected) == ctx.kept_per_layer:
        return LayerMask(protected, protected)
    candidate = candidate_selection(ctx, row, experts)
    kept, dropped = trim(candidate, protected, ctx.mean_scores[row], ctx.kept_per_layer)
    return LayerMask(kept, protected, {"candidate": sorted(candidate), "dropped": dropped})


def candidate_selection(ctx: PlanContext, row: int, experts: list[int]) -> list[int]:
    if ctx.candidate_masks is not None:
        k = ctx.kept_per_layer
        return layer_selection(ctx.candidate_masks, ctx.layer(row), experts, k, "candidate mask")
    # The candidate's select function comes in the context (planning.plan looks it up in the registry, which
    # imports this module), so a method never reaches back into the registry.
    assert ctx.candidate_select is not None and ctx.candidate is not None
    return ctx.candidate_select(replace(ctx, method=ctx.candidate), row, experts).kept


def round_robin(rankings: list[list[int]], budget: int) -> list[int]:
    """Protect ``budget`` experts, corpora taking turns; returns them in the order they were taken."""
    protected: list[int] = []
    taken: set[int] = set()
    position = [0] * len(rankings)
    while len(protected) < budget:
        for c, ranking in enumerate(rankings):
            if len(protected) == budget:
                break
            # budget <= len(ranking), so an untaken expert remains while we are short.
            while ranking[position[c]] in taken:
                position[c] += 1
            expert = ranking[position[c]]
            protected.append(expert)
            taken.add(expert)
    return protected


def trim(
    candidate: list[int], protected: list[int], mean: torch.Tensor, k: int
) -> tuple[list[int], list[int]]:
    """Candidate plus protected, cut to ``k`` by dropping the lowest-mean unprotected; (kept, dropped)."""
    kept = sorted(set(candidate) | set(protected))
    droppable = ranked(mean, [e for e in kept if e not in set(protected)])  # best first
    # |protected| = B <= k, so there are always enough unprotected experts to drop.
    excess = len(kept) - k
    dropped = droppable[::-1][:excess] if excess > 0 else []  # worst first: the order of dropping
    return [e for e in kept if e not in set(dropped)], dropped
