"""The planning interface: what a method reads (:class:`PlanContext`), what it returns, and the ranking
helper every method shares.

A method is a function ``(ctx, row, experts) -> LayerMask`` that keeps ``ctx.kept_per_layer`` of
``experts`` in MoE layer ``row`` (a row of the profile). ``experts`` is the whole layer, or one routing
group of it for grouped routing (see :mod:`moeprune.planning.groups`); ``kept_per_layer`` and
``protect_budget`` are then that group's share, so a method never needs to know about groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moeprune.errors import MoePruneError
from moeprune.planning.mask import LayerMask
from moeprune.profiling.stats import ExpertStats, Profile

Selections = dict[int, list[int]]  # decoder-layer index -> kept expert ids


class Method(Protocol):
    def __call__(self, ctx: PlanContext, row: int, experts: list[int]) -> LayerMask: ...


@dataclass
class PlanContext:
    profile: Profile
    method: str
    kept_per_layer: int  # K for the experts the method is choosing from (the whole layer or one group)
    seed: int = 0
    protect_budget: int = 0  # B, used by methods that protect experts (tb-coverage)
    candidate: str | None = None  # tb-coverage: the method whose mask it starts from
    candidate_masks: Selections | None = None  # tb-coverage: a candidate selection made elsewhere
    candidate_select: Method | None = None  # tb-coverage: the candidate's select function (no masks given)
    precomputed: Selections | None = None  # selections of a method that needs the model (expert-sparsity)
    score_corpus: str | None = None  # reap: rank on this profiled corpus alone instead of the pooled corpora
    extra: dict[str, Any] = field(default_factory=dict)
    # Shared (not copied) by dataclasses.replace, so per-group contexts reuse the layer-wide scores.
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def _cached(self, key: str, compute: Any) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def pooled(self) -> ExpertStats:
        """All corpora summed into one."""
        return self._cached("pooled", self.profile.pooled)

    @property
    def corpus_scores(self) -> torch.Tensor:
        """Per-corpus REAP scores ``[num_corpora, num_moe_layers, N]``."""
        return self._cached("corpus_scores", self.profile.reap_scores)

    @property
    def mean_scores(self) -> torch.Tensor:
        """Mean over corpora of the per-corpus REAP scores ``[num_moe_layers, N]``."""
        return self._cached("mean_scores", lambda: self.corpus_scores.mean(dim=0))

    def layer(self, row: int) -> int:
        return self.profile.layer_ids[row]


def ranked(scores: torch.Tensor, experts: Sequence[int]) -> list[int]:
    """``experts`` best first by ``scores`` (a row over all N experts); equal scores: lower id first.

    A stable sort on (-score, id) rather than torch.topk, whose order among ties is unspecified.
    """
    values = scores.tolist()
    return sorted(experts, key=lambda e: (-values[e], e))


def top(scores: torch.Tensor, experts: Sequence[int], k: int) -> list[int]:
    return ranked(scores, experts)[:k]


def layer_selection(selections: Selections, layer: int, experts: list[int], k: int, what: str) -> list[int]:
    """The ids ``selections`` keeps for ``layer`` among ``experts``, checked to be exactly ``k`` of them."""
    if layer not in selections:
        raise MoePruneError(f"The {what} has no entry for MoE layer {layer}; it must cover every MoE layer.")
    allowed = set(experts)
    chosen = [e for e in dict.fromkeys(selections[layer]) if e in allowed]
    if len(chosen) != k:
        raise MoePruneError(
            f"The {what} keeps {len(chosen)} experts in MoE layer {layer} among experts "
            f"{experts[0]}..{experts[-1]}, expected {k}; "
            "make it with the same retain ratio (and, for grouped routing, K/n_group per group)."
        )
    return chosen


def select_precomputed(ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    """A selection computed outside the profile, e.g. by a method that needs the model."""
    if ctx.precomputed is None:
        raise MoePruneError(
            f"Method {ctx.method!r} selects experts with the model, not from the profile alone: pass its "
            "selections as precomputed={decoder_layer: [kept ids]} (candidate_masks= when it is "
            "tb-coverage's candidate), or plan it with the model loaded."
        )
    what = f"{ctx.method} selection"
    return LayerMask(layer_selection(ctx.precomputed, ctx.layer(row), experts, ctx.kept_per_layer, what))
