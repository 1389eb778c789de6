"""Grouped routing (DeepSeek-V3 n_group): K splits evenly over groups and each group is planned alone."""

from __future__ import annotations

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.planning import PlanRequest, plan
from moeprune.planning.groups import split_budget

from . import make_profile, profile_only, random_profile

V3 = {"n_group": 4, "topk_group": 2, "top_k": 2, "model_type": "deepseek_v3"}
METHODS = ["random", "frequency", "reap", "mean-score", "max-score", "tb-coverage"]


def per_group(ids: list[int], group_size: int, n_group: int) -> list[int]:
    return [sum(1 for e in ids if e // group_size == g) for g in range(n_group)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("retain", [0.5, 0.75])
def test_each_group_keeps_k_over_g(method: str, retain: float) -> None:
    profile = random_profile(2, 3, 16, **V3)
    mask = plan(profile, PlanRequest(method, retain, **profile_only(method)))
    k = int(retain * 16)
    for layer in profile.layer_ids:
        assert per_group(mask.kept(layer), 4, 4) == [k // 4] * 4


def test_groups_are_ranked_separately() -> None:
    # The four best experts overall are all in group 0; grouped REAP still keeps the top 2 of each group.
    scores = torch.tensor([[16, 15, 14, 13, 1, 2, 3, 4, 8, 7, 6, 5, 0, 0, 9, 9]], dtype=torch.float64)
    mask = plan(make_profile(scores, **V3), "reap", 0.5)
    assert mask.kept(1) == [0, 1, 6, 7, 8, 9, 14, 15]


def test_protect_budget_is_split_over_groups_lowest_first() -> None:
    assert split_budget(5, 4) == [2, 1, 1, 1]
    assert split_budget(3, 4) == [1, 1, 1, 0]
    assert split_budget(8, 4) == [2, 2, 2, 2]
    profile = random_profile(3, 2, 16, **V3)
    mask = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=5, candidate="reap"))
    for layer in profile.layer_ids:
        protected = mask.layers[layer].protected
        assert per_group(protected, 4, 4) == [2, 1, 1, 1]
        assert set(protected) <= set(mask.kept(layer))


def test_uneven_split_suggests_the_nearest_valid_ratios() -> None:
    profile = random_profile(1, 1, 16, **V3)
    with pytest.raises(MoePruneError, match=r"K=10 .*n_group=4.*0\.5 \(K=8\) or 0\.75 \(K=12\)"):
        plan(profile, "reap", 0.625)


def test_v3_needs_two_experts_per_group() -> None:
    with pytest.raises(MoePruneError, match=r"1 experts per group.*top-2.*at least 2.*0\.5 \(K=8\)"):
        plan(random_profile(1, 1, 16, **V3), "reap", 0.25)
    # DeepSeek-V2 scores a group by its best expert, so one per group is fine there.
    mask = plan(random_profile(1, 1, 16, **{**V3, "model_type": "deepseek_v2"}), "reap", 0.25)
    assert per_group(mask.kept(1), 4, 4) == [1, 1, 1, 1]


def test_selected_groups_must_hold_top_k() -> None:
    meta = {**V3, "topk_group": 1, "top_k": 4}
    with pytest.raises(
        MoePruneError, match=r"topk_group=1 groups would hold 2 experts, fewer than its top-k=4"
    ):
        plan(random_profile(1, 1, 16, **meta), "reap", 0.5)


def test_precomputed_selection_must_respect_groups() -> None:
    profile = random_profile(1, 1, 16, **V3)
    balanced = {1: [0, 1, 4, 5, 8, 9, 12, 13]}
    assert plan(profile, "expert-sparsity", 0.5, precomputed=balanced).kept(1) == balanced[1]
    with pytest.raises(
        MoePruneError, match=r"keeps 4 experts in MoE layer 1 among experts 0\.\.3, expected 2"
    ):
        plan(profile, "expert-sparsity", 0.5, precomputed={1: [0, 1, 2, 3, 4, 5, 8, 9]})


def test_single_group_is_plain() -> None:
    scores = torch.arange(16, dtype=torch.float64).unsqueeze(0)
    mask = plan(make_profile(scores, n_group=1, topk_group=1), "reap", 0.25)
    assert mask.kept(1) == [12, 13, 14, 15]
