"""TB-Coverage: protection by round-robin over corpus rankings, then trimming to K by mean score."""

from __future__ import annotations

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.planning import PlanRequest, default_protect_budget, plan
from moeprune.planning.tb_coverage import round_robin

from . import make_profile, random_profile


@pytest.mark.parametrize("budget", [0, 1, 5, 16])
@pytest.mark.parametrize("corpora", [1, 2, 4])
def test_keeps_every_protected_expert(budget: int, corpora: int) -> None:
    profile = random_profile(corpora, 5, 32, seed=budget + corpora, top_k=2)
    mask = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=budget, candidate="reap"))
    for layer_mask in mask.layers.values():
        assert len(layer_mask.protected) == len(set(layer_mask.protected)) == budget
        assert set(layer_mask.protected) <= set(layer_mask.kept)
        assert len(layer_mask.kept) == 16


@pytest.mark.parametrize("candidate", ["reap", "frequency", "max-score", "random"])
def test_zero_budget_returns_the_candidate(candidate: str) -> None:
    profile = random_profile(3, 4, 16, top_k=2)
    seed = 7 if candidate == "random" else None  # a seed only for a seeded method (PlanRequest refuses it otherwise)
    mask = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=0, candidate=candidate, seed=seed))
    reference = plan(profile, PlanRequest(candidate, 0.5, seed=seed))
    assert mask.candidate == candidate
    for layer in profile.layer_ids:
        assert mask.kept(layer) == reference.kept(layer)
        assert mask.layers[layer].extra["candidate"] == reference.kept(layer)


def test_zero_budget_returns_given_candidate_masks() -> None:
    profile = random_profile(2, 2, 8)
    masks = {1: [7, 1, 3, 5], 3: [0, 1, 2, 3]}
    mask = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=0), candidate_masks=masks)
    assert mask.kept(1) == [1, 3, 5, 7] and mask.kept(3) == [0, 1, 2, 3]
    assert mask.candidate == "precomputed"


def test_agreeing_rankings_protect_the_top_b_in_order() -> None:
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    base = torch.empty(16, dtype=torch.float64)
    base[order] = torch.arange(16, 0, -1, dtype=torch.float64)  # order[0] is best
    profile = make_profile(torch.stack([base, base * 2, base + 3]), top_k=2)  # same ranking, other scales
    mask = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=5, candidate="frequency"))
    assert mask.layers[1].protected == order[:5].tolist()


def test_round_robin_two_corpora() -> None:
    a = [8, 7, 6, 5, 4, 3, 2, 1]  # ranking 0 1 2 3 ...
    b = [7, 6, 0, 0, 0, 8, 5, 0]  # ranking 5 0 1 6 ...
    profile = make_profile([a, b])
    # A takes 0; B's best is 5; A takes 1; B skips 0 and 1 (taken) for 6.
    def protected(budget: int) -> list[int]:
        request = PlanRequest("tb-coverage", 0.5, protect_budget=budget, candidate="reap")
        return plan(profile, request).layers[1].protected

    assert protected(4) == [0, 5, 1, 6]
    assert protected(3) == [0, 5, 1]


def test_round_robin_three_corpora_in_profile_order() -> None:
    a = [8, 7, 6, 5, 4, 3, 2, 1]  # 0 1 2 3 4 5 6 7
    b = [7, 8, 4, 6, 5, 3, 2, 1]  # 1 0 3 4 2 5 6 7
    c = [8, 4, 0, 7, 6, 0, 5, 0]  # 0 3 4 6 1 2 5 7
    # A:0  B:1  C:3 (0 taken)  A:2  B:4 (0, 3 taken)  C:6 (3, 4 taken)
    profile = make_profile([a, b, c])
    mask = plan(profile, PlanRequest("tb-coverage", 0.75, protect_budget=6, candidate="reap"))
    assert mask.layers[1].protected == [0, 1, 3, 2, 4, 6]
    # Another corpus order, another turn order: C:0  A:1  B:3 ...
    reordered = make_profile([c, a, b])
    request = PlanRequest("tb-coverage", 0.75, protect_budget=3, candidate="reap")
    assert plan(reordered, request).layers[1].protected == [0, 1, 3]


def test_round_robin_helper_skips_taken_experts() -> None:
    assert round_robin([[0, 1, 2], [0, 2, 1]], 3) == [0, 2, 1]
    assert round_robin([[2, 1, 0]], 2) == [2, 1]
    assert round_robin([[0, 1], [1, 0]], 0) == []


def test_trim_drops_the_lowest_mean_unprotected_experts() -> None:
    # One corpus, so mean = its scores. Protected: 6, 7 (outside the candidate 0..3).
    # Unprotected kept 0..3 have means 1, 5, 3, 3: drop 0, then 3 (tied with 2; the lower id stays).
    profile = make_profile([[1, 5, 3, 3, 0, 0, 10, 9]])
    mask = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=2), candidate_masks={1: [0, 1, 2, 3]})
    layer = mask.layers[1]
    assert layer.protected == [6, 7]
    assert mask.kept(1) == [1, 2, 6, 7]
    assert layer.extra == {"candidate": [0, 1, 2, 3], "dropped": [0, 3]}


def test_trim_uses_the_mean_over_corpora() -> None:
    # Candidate {0, 1, 2}, expert 3 protected (best on B). Drop one of 0..2 by mean:
    # 0: (9 + 0)/2 = 4.5, 1: (4 + 4)/2 = 4, 2: (5 + 5)/2 = 5 -> drop 1 (max-score would drop 1 too, reap
    # by count-weighted pooling would not: 0 has 1 token on A and 100 on B, pooled 9/101).
    scores = [[[9, 4, 5, 0, 0, 0]], [[0, 4, 5, 10, 0, 0]]]
    counts = [[[1, 10, 10, 10, 10, 10]], [[100, 10, 10, 10, 10, 10]]]
    profile = make_profile(scores, counts)
    mask = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=1), candidate_masks={1: [0, 1, 2]})
    assert mask.layers[1].protected == [0]  # A's best comes first, and it is in the candidate
    mask = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=2), candidate_masks={1: [0, 1, 2]})
    assert mask.layers[1].protected == [0, 3]
    assert mask.kept(1) == [0, 2, 3]


def test_default_budget_follows_the_paper_then_a_third() -> None:
    assert default_protect_budget(60, 30) == 20
    assert default_protect_budget(64, 32) == 24
    assert default_protect_budget(128, 64) == 43
    assert default_protect_budget(8, 4) == 3
    assert default_protect_budget(64, 16) == 16  # capped at K
    mask = plan(random_profile(2, 1, 64, top_k=2), PlanRequest("tb-coverage", 0.5, candidate="reap"))
    assert mask.protect_budget == 24 and mask.candidate == "reap"
    assert len(mask.layers[1].protected) == 24


def test_the_one_default_candidate_is_the_papers_and_needs_the_model() -> None:
    # planning.plan and `moeprune plan` start from the same candidate (expert-sparsity); from a profile
    # alone it cannot be computed, so the planner says so instead of silently using another method.
    profile = random_profile(2, 1, 64, top_k=2)
    with pytest.raises(MoePruneError, match=r"candidate 'expert-sparsity' selects experts with the model.*='reap'"):
        plan(profile, "tb-coverage", 0.5)
    # B >= K: round-robin alone fills the mask, the candidate is never computed, so no model is needed.
    mask = plan(profile, PlanRequest("tb-coverage", 0.25, protect_budget=16))
    assert mask.candidate == "expert-sparsity" and mask.candidate_used is False
    chosen = {1: list(range(32))}
    mask = plan(profile, "tb-coverage", 0.5, candidate_masks=chosen)
    assert mask.candidate == "precomputed" and mask.candidate_used is True


def test_other_methods_record_no_budget_or_candidate() -> None:
    mask = plan(random_profile(2, 1, 8), "reap", 0.5)
    assert mask.protect_budget is None and mask.candidate is None and not mask.layers[1].protected


def test_candidate_from_a_model_method_via_candidate_masks() -> None:
    profile = make_profile([[1, 2, 3, 4, 5, 6, 7, 8]])
    given = {1: [0, 1, 2, 3]}
    request = PlanRequest("tb-coverage", 0.5, protect_budget=1, candidate="expert-sparsity")
    mask = plan(profile, request, candidate_masks=given)
    assert mask.candidate == "expert-sparsity"
    assert mask.layers[1].protected == [7]
    assert mask.kept(1) == [1, 2, 3, 7]  # 7 added, lowest-mean candidate 0 dropped
