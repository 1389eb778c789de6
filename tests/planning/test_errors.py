"""Bad requests fail up front with a MoePruneError that names the problem and the fix."""

from __future__ import annotations

import pytest

from moeprune.errors import MoePruneError
from moeprune.planning import PlanRequest, plan

from . import random_profile


@pytest.fixture
def profile():
    return random_profile(2, 2, 8, top_k=2)


@pytest.mark.parametrize("retain", [0.0, 1.5, -0.2])
def test_retain_outside_unit_interval(profile, retain: float) -> None:
    with pytest.raises(MoePruneError, match=r"outside \(0, 1\].*--retain"):
        plan(profile, "reap", retain)


def test_fewer_kept_than_top_k(profile) -> None:
    with pytest.raises(MoePruneError, match=r"K=1 .*top-k=2.*--retain >= 0.25"):
        plan(profile, "reap", 0.125)


def test_unknown_method_lists_the_known_ones(profile) -> None:
    with pytest.raises(MoePruneError, match=r"Unknown planning method 'reapp'.*frequency.*tb-coverage"):
        plan(profile, "reapp", 0.5)


def test_budget_above_k_is_clamped_not_refused(profile) -> None:
    mask = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=5))
    assert (mask.protect_budget, mask.protect_budget_requested, mask.candidate_used) == (4, 5, False)


def test_negative_budget(profile) -> None:
    with pytest.raises(MoePruneError, match=r"--protect-budget \(-B\) must be 0 or more \(got -1\)"):
        plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=-1))


@pytest.mark.parametrize("options", [{"protect_budget": 2}, {"candidate": "reap"}, {"candidate_masks": {}}])
def test_protection_options_only_for_tb_coverage(profile, options) -> None:
    with pytest.raises(MoePruneError, match=r"only applies to tb-coverage; drop it for 'frequency'"):
        request = PlanRequest("frequency", 0.5, **{k: v for k, v in options.items() if k != "candidate_masks"})
        plan(profile, request, candidate_masks=options.get("candidate_masks"))


@pytest.mark.parametrize("candidate", ["nope", "tb-coverage"])
def test_bad_candidate(profile, candidate: str) -> None:
    with pytest.raises(MoePruneError, match=r"Unknown candidate method.*use one of: random, frequency"):
        plan(profile, PlanRequest("tb-coverage", 0.5, candidate=candidate))


def test_model_method_without_selections(profile) -> None:
    with pytest.raises(
        MoePruneError, match=r"'expert-sparsity' selects experts with the model.*precomputed="
    ):
        plan(profile, "expert-sparsity", 0.5)
    # As tb-coverage's candidate, the message still names expert-sparsity (not tb-coverage).
    with pytest.raises(MoePruneError, match=r"'expert-sparsity' selects .*candidate_masks="):
        plan(profile, PlanRequest("tb-coverage", 0.5, candidate="expert-sparsity"))


def test_selections_of_the_wrong_size_or_missing_layers(profile) -> None:
    with pytest.raises(MoePruneError, match=r"keeps 3 experts in MoE layer 1 .*expected 4"):
        plan(profile, "expert-sparsity", 0.5, precomputed={1: [0, 1, 2], 3: [0, 1, 2, 3]})
    with pytest.raises(MoePruneError, match=r"no entry for MoE layer 3"):
        plan(profile, "tb-coverage", 0.5, candidate_masks={1: [0, 1, 2, 3]})


def test_negative_seed_for_random(profile) -> None:
    with pytest.raises(MoePruneError, match=r"--plan-seed must be 0 or more"):
        plan(profile, PlanRequest("random", 0.5, seed=-1))


def test_both_protection_options_named_in_plural(profile) -> None:
    with pytest.raises(MoePruneError, match=r"protect_budget, candidate only apply to tb-coverage; drop them"):
        plan(profile, PlanRequest("frequency", 0.5, protect_budget=2, candidate="reap"))
