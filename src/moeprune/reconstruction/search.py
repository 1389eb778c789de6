"""Which K experts of a layer minimise the reconstruction loss: exact when feasible, else a stated search.

- **exact**: when the number of admissible masks is at most :data:`EXACT_LIMIT` (C(N, K), or
  C(N/G, K/G)^G with G routing groups), every mask is evaluated, in batches. Lu et al. (2024)
  enumerate too; this is their method for N = 8 (Mixtral) and e.g. N = 16.
- **greedy+swap** (N = 60-128, where C(N, K) is astronomically large): *backward elimination* starts
  from all N experts and repeatedly removes the expert whose removal increases the loss least
  (intermediate sets are routed with the model's rule over the remaining experts), until K remain;
  then *swap refinement* repeatedly applies the best 1-for-1 swap (a kept expert out, a removed one
  in) while it lowers the loss, for at most :data:`MAX_SWAP_PASSES` swaps. Greedy elimination costs
  about (N - K)(N + K) / 2 mask evaluations, one swap pass K (N - K).

Several K share work (:func:`search_layer_many`): with ungrouped routing, elimination towards the
smallest K passes through every larger K on the way (each step depends only on the current set), so
one path is recorded and the swap refinement starts from its point at each K; the result per K is
the same as a separate greedy run to that K. Grouped routing's per-group quota depends on K, so
there each K runs its own elimination.

With grouped routing (DeepSeek ``n_group`` > 1) every mask keeps K/G experts of each group: exact
search enumerates per-group combinations, elimination only removes from groups holding more than
K/G, swaps stay inside a group. Ties go to the lexicographically smallest mask (lower ids first):
candidates are enumerated in that order and the first minimum wins.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from moeprune.errors import MoePruneError
from moeprune.reconstruction.loss import LayerProblem

EXACT_LIMIT = 100_000  # largest number of masks enumerated exactly
MAX_SWAP_PASSES = 100  # at most this many improving swaps per layer (each pass applies one)
EXACT_BATCH = 512  # masks per batched evaluation during enumeration
# A swap must improve by more than this relative amount, so float noise cannot make it cycle.
IMPROVEMENT_RTOL = 1e-9


@dataclass(frozen=True)
class SearchResult:
    kept: list[int]  # sorted original expert ids
    loss: float  # ||Z - Z_kept||_F over the calibration tokens
    search: str  # "exact" | "greedy+swap"
    evaluations: int  # masks evaluated
    swaps: int = 0  # improving swaps applied after greedy elimination

    def __iter__(self) -> Iterator:
        """Unpacks as ``kept, loss = result`` (the pair callers of reconstruction_selection use)."""
        return iter((self.kept, self.loss))


def mask_count(num_experts: int, kept: int, groups: int = 1) -> int:
    """Admissible masks: C(N/G, K/G)^G."""
    return math.comb(num_experts // groups, kept // groups) ** groups


def search_layer(
    problem: LayerProblem,
    kept: int,
    exact_limit: int = EXACT_LIMIT,
    max_swap_passes: int = MAX_SWAP_PASSES,
) -> SearchResult:
    """The best mask of ``kept`` experts found for one layer (exact if at most ``exact_limit`` masks)."""
    _check(problem, kept)
    if mask_count(problem.num_experts, kept, problem.num_groups) <= exact_limit:
        return exact_search(problem, kept)
    return greedy_swap_search(problem, kept, max_swap_passes)


def search_layer_many(
    problem: LayerProblem,
    kept: Iterable[int],
    exact_limit: int = EXACT_LIMIT,
    max_swap_passes: int = MAX_SWAP_PASSES,
) -> dict[int, SearchResult]:
    """``{K: search_layer(problem, K)}`` for every K, sharing one elimination path where routing allows."""
    ks = sorted(set(kept))
    for k in ks:
        _check(problem, k)
    results = {k: exact_search(problem, k) for k in ks
               if mask_count(problem.num_experts, k, problem.num_groups) <= exact_limit}
    greedy_ks = [k for k in ks if k not in results]
    if problem.num_groups == 1 and greedy_ks:
        path = elimination_path(problem, greedy_ks[0])  # passes through every larger K
        results |= {k: _refined(problem, *path[k], max_swap_passes) for k in greedy_ks}
    else:
        results |= {k: greedy_swap_search(problem, k, max_swap_passes) for k in greedy_ks}
    return dict(sorted(results.items()))


def exact_search(problem: LayerProblem, kept: int) -> SearchResult:
    best_loss, best_mask, evaluations = math.inf, None, 0
    for batch in _batched(_all_masks(problem, kept), EXACT_BATCH):
        losses = problem.losses(batch)
        evaluations += len(batch)
        i = int(torch.argmin(losses))  # first minimum: the smallest mask among ties
        if float(losses[i]) < best_loss:
            best_loss, best_mask = float(losses[i]), batch[i]
    return SearchResult(list(best_mask), best_loss, "exact", evaluations)


def greedy_swap_search(problem: LayerProblem, kept: int, max_swap_passes: int = MAX_SWAP_PASSES) -> SearchResult:
    return _refined(problem, *greedy_elimination(problem, kept), max_swap_passes)


def _refined(problem: LayerProblem, mask: list[int], loss: float, evaluations: int, passes: int) -> SearchResult:
    mask, loss, swaps, more = swap_refinement(problem, mask, loss, passes)
    return SearchResult(mask, loss, "greedy+swap", evaluations + more, swaps)


def greedy_elimination(problem: LayerProblem, kept: int) -> tuple[list[int], float, int]:
    """Backward elimination from all N experts down to ``kept``: (mask, loss, evaluations)."""
    return elimination_path(problem, kept)[kept]


def elimination_path(problem: LayerProblem, kept: int) -> dict[int, tuple[list[int], float, int]]:
    """Backward elimination down to ``kept``, every size on the way: ``{size: (mask, loss, evaluations)}``.

    Evaluations are counted from the start, so each entry is what a separate run to that size reports.
    """
    mask = list(range(problem.num_experts))
    loss, evaluations = 0.0, 0
    path = {len(mask): (mask, loss, evaluations)}
    quota = kept // problem.num_groups
    while len(mask) > kept:
        counts = _group_counts(problem, mask)
        removable = [e for e in mask if counts[problem.group_of(e)] > quota]
        candidates = [[x for x in mask if x != e] for e in removable]
        losses = problem.losses(candidates, original_groups=True)
        evaluations += len(candidates)
        i = int(torch.argmin(losses))  # ties: the lowest expert id is removed
        mask, loss = candidates[i], float(losses[i])
        path[len(mask)] = (mask, loss, evaluations)
    return path


def swap_refinement(
    problem: LayerProblem, mask: list[int], loss: float, max_passes: int = MAX_SWAP_PASSES
) -> tuple[list[int], float, int, int]:
    """Best-improvement 1-for-1 swaps until none improves: (mask, loss, swaps, evaluations)."""
    swaps = evaluations = 0
    while swaps < max_passes:
        candidates = _swaps(problem, mask)
        if not candidates:
            break
        losses = problem.losses(candidates, original_groups=True)
        evaluations += len(candidates)
        i = int(torch.argmin(losses))
        if not float(losses[i]) < loss * (1 - IMPROVEMENT_RTOL):
            break
        mask, loss = candidates[i], float(losses[i])
        swaps += 1
    return mask, loss, swaps, evaluations


def _swaps(problem: LayerProblem, mask: list[int]) -> list[list[int]]:
    """Every mask one same-group swap away from ``mask``, sorted, in (out, in) ascending order."""
    kept = set(mask)
    out = []
    for leaving in mask:
        for joining in range(problem.num_experts):
            if joining not in kept and problem.group_of(joining) == problem.group_of(leaving):
                out.append(sorted((kept - {leaving}) | {joining}))
    return out


def _all_masks(problem: LayerProblem, kept: int) -> Iterator[list[int]]:
    """Every admissible mask, in lexicographic order."""
    groups = problem.num_groups
    size = problem.num_experts // groups
    per_group = [itertools.combinations(range(g * size, (g + 1) * size), kept // groups) for g in range(groups)]
    for parts in itertools.product(*per_group):
        yield [e for part in parts for e in part]


def _batched(masks: Iterator[list[int]], size: int) -> Iterator[list[list[int]]]:
    while batch := list(itertools.islice(masks, size)):
        yield batch


def _group_counts(problem: LayerProblem, mask: list[int]) -> list[int]:
    counts = [0] * problem.num_groups
    for e in mask:
        counts[problem.group_of(e)] += 1
    return counts


def _check(problem: LayerProblem, kept: int) -> None:
    n, groups, top_k = problem.num_experts, problem.num_groups, problem.dense_index.shape[1]
    if not top_k <= kept <= n:
        raise MoePruneError(f"Cannot keep K={kept} of {n} experts with top-k={top_k}; need {top_k} <= K <= {n}.")
    if kept % groups:
        raise MoePruneError(f"K={kept} does not split evenly over the router's n_group={groups} groups.")
    if problem.spec.routing == "deepseek_v3" and groups > 1 and kept // groups < 2:
        raise MoePruneError(f"K={kept} keeps {kept // groups} per group; DeepSeek-V3 routing needs >= 2 per group.")
