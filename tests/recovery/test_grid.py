"""Recovery as an axis of the experiment grid: cells per (mask, recovery), cached deltas, report and plot."""

from __future__ import annotations

import pytest

from moeprune.errors import MoePruneError
from moeprune.experiment import run_experiment
from moeprune.recovery import RecoveryOptions
from tests.grid_options import typed

RECOVERY = RecoveryOptions(samples=6, seq_len=32, epochs=1, batch_size=3)


def _kwargs(text_corpus, **over):
    kwargs = dict(
        retains=(0.5,), methods=["frequency", "random"], seeds=(0, 1), corpora=["wiki", "web"], samples=4,
        seq_len=32, batch_size=2, ppl_datasets=["wiki", str(text_corpus)], ppl_seq_len=64, max_windows=2,
        tasks=["none"], progress=False, recover=["none", "router-kd"], recovery=RECOVERY,
    )
    return {**kwargs, **over}


@pytest.fixture(scope="module")
def grid(tiny_checkpoint, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    return out, run_experiment(str(tiny_checkpoint), out, **typed(_kwargs(text_corpus)))


def test_cells_per_mask_and_recovery(grid) -> None:
    out, result = grid
    ids = [c["cell"] for c in result["cells"]]
    assert ids == ["dense", "frequency-0.50", "frequency-0.50+router-kd", "random-0.50-seed0",
                   "random-0.50-seed0+router-kd", "random-0.50-seed1", "random-0.50-seed1+router-kd"]
    kd = next(c for c in result["cells"] if c["cell"] == "frequency-0.50+router-kd")
    assert kd["recover"] == "router-kd" and kd["variant"] == "frequency+router-kd"
    assert kd["recovery"]["router_kd"]["kl_after"]["wiki"] < kd["recovery"]["router_kd"]["kl_before"]["wiki"]
    plain = next(c for c in result["cells"] if c["cell"] == "frequency-0.50")
    assert kd["summary"]["ppl"] != plain["summary"]["ppl"]
    assert len(list((out / "recovery").iterdir())) == 3  # one delta per recovered cell
    assert result["settings"]["recovery"]["kinds"] == ["none", "router-kd"]


def test_report_and_plot_show_recovery(grid) -> None:
    out, _ = grid
    text = (out / "report.md").read_text()
    assert "## Recovery after pruning" in text and "Frequency + Router KD" in text
    assert "| 50% | frequency | " in text  # the with/without table, a row per method
    assert (out / "plots" / "recovery_worst.png").exists()


def test_rerun_reuses_cells_and_deltas(grid, tiny_checkpoint, text_corpus, monkeypatch) -> None:
    from moeprune import experiment

    out, first = grid

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(experiment, "recover", refuse)
    for cell in (out / "cells").glob("*+router-kd.json"):
        cell.unlink()  # the cells go, the cached deltas stay: evaluated again without recomputing
    again = run_experiment(str(tiny_checkpoint), out, **typed(_kwargs(text_corpus)))
    assert {c["cell"]: c["summary"] for c in again["cells"]} == {c["cell"]: c["summary"] for c in first["cells"]}


def test_other_recovery_settings_are_refused(grid, tiny_checkpoint, text_corpus) -> None:
    out, _ = grid
    with pytest.raises(MoePruneError, match="other recovery settings"):
        run_experiment(str(tiny_checkpoint), out, **typed(_kwargs(text_corpus, recovery=RecoveryOptions(
            samples=6, seq_len=32, epochs=2, batch_size=3))))


def test_merge_on_a_ratio_keeping_all_experts_is_refused_up_front(tiny_checkpoint, text_corpus, tmp_path) -> None:
    with pytest.raises(MoePruneError, match="nothing to merge"):
        run_experiment(str(tiny_checkpoint), tmp_path, **typed(_kwargs(
            text_corpus, retains=(0.5, 1.0), recover=["none", "merge"],
            recovery=RecoveryOptions(samples=6, seq_len=32, batch_size=3))))  # no epochs: merge alone trains none
    assert not (tmp_path / "profile").exists()
