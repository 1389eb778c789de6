"""B >= K: TB-Coverage is round-robin alone, the candidate is skipped, and the mask says so (issues 9, 12)."""

from __future__ import annotations

import pytest

from moeprune import api
from moeprune.cli import main
from moeprune.planning import PlanRequest, candidate_needed, plan
from moeprune.planning.mask import ExpertMask
from moeprune.planning.tb_coverage import round_robin
from moeprune.reconstruction.search import SearchResult

from . import random_profile


def test_paper_default_at_25_percent_is_clamped_and_recorded() -> None:
    # Qwen1.5-MoE: N=60, 25% keeps K=15 < the paper's B=20.
    mask = plan(random_profile(2, 2, 60, top_k=4), "tb-coverage", 0.25)
    assert (mask.kept_per_layer, mask.protect_budget, mask.protect_budget_requested) == (15, 15, 20)
    assert mask.candidate_used is False
    assert "B=20 > K=15, so B is clamped to K" in mask.notes[0]
    for layer in mask.layers.values():
        assert sorted(layer.protected) == sorted(layer.kept) and "candidate" not in layer.extra
    again = ExpertMask.from_json(mask.to_json())
    assert (again.protect_budget_requested, again.candidate_used, again.notes) == (20, False, mask.notes)


def test_clamped_mask_is_the_round_robin_and_never_computes_the_candidate() -> None:
    prof = random_profile(3, 1, 16, top_k=2)
    # expert-sparsity without selections raises if asked: B >= K must not ask.
    mask = plan(prof, PlanRequest("tb-coverage", 0.25, protect_budget=7, candidate="expert-sparsity"))
    rankings = [sorted(range(16), key=lambda e, c=c: (-float(prof.reap_scores()[c, 0, e]), e)) for c in range(3)]
    assert mask.layers[1].protected == round_robin(rankings, 4)
    assert mask.kept(1) == sorted(round_robin(rankings, 4))


def test_below_k_uses_the_candidate_and_has_no_note() -> None:
    mask = plan(random_profile(2, 1, 60, top_k=4), PlanRequest("tb-coverage", 0.5, candidate="reap"))
    assert (mask.protect_budget, mask.protect_budget_requested, mask.candidate_used, mask.notes) == (20, 20, True, [])
    assert candidate_needed(60, 30, None) and not candidate_needed(60, 15, None) and not candidate_needed(8, 4, 4)


def test_plan_many_reconstructs_only_where_the_candidate_counts(monkeypatch) -> None:
    asked = []

    def fake_reconstruct(prof, kept, *args):
        asked.append(list(kept))
        return {k: {layer: SearchResult(list(range(k)), 0.5, "exact", 1) for layer in prof.layer_ids} for k in kept}

    monkeypatch.setattr(api, "_reconstruct", fake_reconstruct)
    masks = api.plan_many(random_profile(2, 1, 60, top_k=4), "tb-coverage", [0.25, 0.5, 0.75], protect_budget=20)
    assert asked == [[30, 45]]
    assert [m.candidate_used for m in masks] == [False, True, True]
    assert "candidate_reconstruction_loss" not in masks[0].layers[1].extra
    assert masks[1].layers[1].extra["candidate_reconstruction_loss"] == 0.5


def test_cli_writes_every_mask_and_explains_the_clamped_one(tmp_path, capsys) -> None:
    random_profile(2, 1, 60, top_k=4).save(tmp_path / "prof")
    argv = ["plan", str(tmp_path / "prof"), "--method", "tb-coverage", "--candidate", "reap", "-B", "20"]
    assert main([*argv, "--retain", "0.25", "0.5", "0.75", "--out", str(tmp_path / "masks")]) == 0
    files = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert files == ["tb-coverage-0.25.json", "tb-coverage-0.50.json", "tb-coverage-0.75.json"]
    printed = capsys.readouterr().out
    assert printed.count("note:") == 1 and "B=20 > K=15" in printed


@pytest.mark.parametrize("budget", [1.5, "x", True])
def test_non_integer_budget_is_refused(budget) -> None:
    from moeprune.errors import MoePruneError

    with pytest.raises(MoePruneError, match="whole number"):
        plan(random_profile(2, 1, 8), PlanRequest("tb-coverage", 0.5, protect_budget=budget))


def test_cli_budget_is_a_number_or_auto(tmp_path, capsys) -> None:
    from moeprune.cli import budget_arg

    assert budget_arg("20") == 20 and budget_arg("AUTO") == "auto"
    with pytest.raises(SystemExit) as err:
        main(["plan", str(tmp_path), "-B", "twenty", "--retain", "0.5", "--out", str(tmp_path)])
    assert err.value.code == 2 and "not a whole number or 'auto'" in capsys.readouterr().err


def test_model_free_plan_refuses_auto_with_the_fix() -> None:
    from moeprune.errors import MoePruneError

    with pytest.raises(MoePruneError, match="B='auto'.*load the model"):
        plan(random_profile(2, 1, 8), PlanRequest("tb-coverage", 0.5, protect_budget="auto"))
