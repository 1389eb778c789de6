"""The profile-only selection methods: exact K, the right experts on crafted scores, ties, seeds."""

from __future__ import annotations

import json

import pytest

from moeprune.planning import METHODS, PlanRequest, plan
from moeprune.planning.mask import ExpertMask

from . import make_profile, profile_only, random_profile

PROFILE_METHODS = ["random", "frequency", "reap", "mean-score", "max-score", "tb-coverage"]


def test_registry_lists_every_method() -> None:
    assert set(PROFILE_METHODS) | {"expert-sparsity"} == set(METHODS)


@pytest.mark.parametrize("method", PROFILE_METHODS)
@pytest.mark.parametrize("num_experts", [8, 60, 64])
@pytest.mark.parametrize("retain", [0.25, 0.5, 0.75, 1.0])
def test_every_method_keeps_exactly_k_per_layer(method: str, num_experts: int, retain: float) -> None:
    profile = random_profile(3, 4, num_experts, top_k=2)
    mask = plan(profile, PlanRequest(method, retain, **profile_only(method)))
    k = int(retain * num_experts)
    assert mask.kept_per_layer == k
    assert sorted(mask.layers) == profile.layer_ids
    for layer_mask in mask.layers.values():
        assert len(set(layer_mask.kept)) == k
        assert all(0 <= e < num_experts for e in layer_mask.kept)


def test_frequency_keeps_the_most_routed_experts() -> None:
    # Scores say the opposite of counts, so a score-based pick would fail this.
    counts = [[[5, 50, 1, 30]], [[5, 10, 2, 30]]]  # pooled: 10, 60, 3, 60
    scores = [[[9, 1, 9, 1]], [[9, 1, 9, 1]]]
    mask = plan(make_profile(scores, counts), "frequency", 0.5)
    assert mask.kept(1) == [1, 3]


def test_frequency_ties_go_to_the_lower_id() -> None:
    mask = plan(make_profile([[[1, 1, 1, 1]]], [[[7, 7, 7, 7]]]), "frequency", 0.5)
    assert mask.kept(1) == [0, 1]


def test_reap_pools_sums_instead_of_averaging_ratios() -> None:
    # Expert 0: score 10 on 1 token of corpus A, 1 on 100 tokens of B -> pooled 110/101, mean of ratios 5.5.
    # Expert 1: score 5 everywhere -> 5 either way. Pooled REAP keeps 1, mean-score keeps 0.
    scores = [[[10, 5, 0, 0]], [[1, 5, 0, 0]]]
    counts = [[[1, 100, 10, 10]], [[100, 1, 10, 10]]]
    profile = make_profile(scores, counts)
    assert plan(profile, "reap", 0.25).kept(1) == [1]
    assert plan(profile, "mean-score", 0.25).kept(1) == [0]


def test_mean_and_max_score_differ_on_a_specialist() -> None:
    # Expert 0 is a specialist (10 on A, 0 on B: mean 5, max 10); expert 1 a generalist (6, 6).
    profile = make_profile([[[10, 6, 1, 0]], [[0, 6, 1, 0]]])
    assert plan(profile, "mean-score", 0.25).kept(1) == [1]
    assert plan(profile, "max-score", 0.25).kept(1) == [0]


@pytest.mark.parametrize("method", ["reap", "mean-score", "max-score", "tb-coverage"])
def test_score_ties_go_to_the_lower_id(method: str) -> None:
    profile = make_profile([[[3, 5, 5, 5, 5, 1]], [[3, 5, 5, 5, 5, 1]]])
    assert plan(profile, PlanRequest(method, 0.5, **profile_only(method))).kept(1) == [1, 2, 3]


def test_each_layer_is_planned_from_its_own_row() -> None:
    profile = make_profile([[[1, 9, 0, 0], [0, 0, 9, 1]]], layers=[4, 7])
    mask = plan(profile, "reap", 0.25)
    assert mask.kept(4) == [1] and mask.kept(7) == [2]


def test_random_is_reproducible_per_seed_and_varies_with_seed_and_layer() -> None:
    profile = random_profile(1, 6, 64, top_k=2)
    first = plan(profile, PlanRequest("random", 0.5, seed=3))
    again = plan(profile, PlanRequest("random", 0.5, seed=3))
    other = plan(profile, PlanRequest("random", 0.5, seed=4))
    assert first.to_json() == again.to_json()
    assert first.to_json()["layers"] != other.to_json()["layers"]
    assert len({tuple(first.kept(layer)) for layer in profile.layer_ids}) > 1
    assert first.seed == 3 and plan(profile, "reap", 0.5).seed is None


def test_expert_sparsity_uses_precomputed_selections() -> None:
    profile = random_profile(2, 2, 8)
    chosen = {1: [0, 2, 4, 6], 3: [1, 3, 5, 7]}
    mask = plan(profile, "expert-sparsity", 0.5, precomputed=chosen)
    assert mask.kept(1) == [0, 2, 4, 6] and mask.kept(3) == [1, 3, 5, 7]
    # Selections read back from JSON have string keys; they work too.
    from_json = {str(layer): ids for layer, ids in chosen.items()}
    assert plan(profile, "expert-sparsity", 0.5, precomputed=from_json).kept(3) == [1, 3, 5, 7]


@pytest.mark.parametrize("method", PROFILE_METHODS)
def test_mask_json_round_trips(method: str) -> None:
    seed = 1 if METHODS[method].seeded else None
    mask = plan(random_profile(2, 3, 16, top_k=2), PlanRequest(method, 0.5, seed=seed, **profile_only(method)))
    text = json.dumps(mask.to_json())
    back = ExpertMask.from_json(json.loads(text))
    assert back.to_json() == mask.to_json()
    assert back.model == "test/tiny-moe" and back.method == method and back.kept_per_layer == 8


def test_reap_on_one_named_corpus() -> None:
    from moeprune import api
    from moeprune.errors import MoePruneError

    # corpus0 prefers the high ids, corpus1 the low ones; the pooled ranking follows corpus1's larger counts.
    profile = make_profile([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]], [[1] * 6, [100] * 6])
    assert plan(profile, "reap", 0.5).kept(1) == [0, 1, 2]
    on_code = plan(profile, PlanRequest("reap", 0.5, score_corpus="corpus0"))
    assert on_code.kept(1) == [3, 4, 5] and on_code.variant == "reap@corpus0"
    assert on_code.extra["corpora"] == ["corpus0"] and api.mask_filename(on_code) == "reap@corpus0-0.50.json"
    with pytest.raises(MoePruneError, match=r"'code' is not in the profile.*corpus0, corpus1.*--corpus code="):
        plan(profile, PlanRequest("reap", 0.5, score_corpus="code"))
    with pytest.raises(MoePruneError, match="only applies to reap"):
        plan(profile, PlanRequest("frequency", 0.5, score_corpus="corpus0"))
