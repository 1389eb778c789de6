"""Typed options: one from_args per stage (flag, else preset), the CLI's numeric rules on the class, so the
Python API refuses what the CLI refuses with the same message."""

from __future__ import annotations

import argparse

import pytest

from moeprune import api
from moeprune.errors import MoePruneError
from moeprune.options import Calibration, EvalSettings, ReconstructionOptions
from moeprune.presets import BUNDLED, PAPER, PRESETS
from moeprune.validation import check_args


def _args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{"model": "some/model", **flags})


def test_flag_wins_else_the_preset() -> None:
    paper, bundled = PRESETS[PAPER], PRESETS[BUNDLED]
    assert Calibration.from_args(_args(samples=None, seq_len=None)) == Calibration(paper.corpora, 512, 1024, 4)
    assert Calibration.from_args(_args(model="bundled", samples=8, corpora=["x"])).samples == 8
    assert Calibration.from_args(_args(model="bundled")).corpora == bundled.corpora
    recon = ReconstructionOptions.from_args(_args(recon_samples=None, recon_loss=None))
    assert (recon.samples, recon.seq_len, recon.loss) == (paper.recon_samples, paper.recon_seq_len, paper.recon_loss)
    assert ReconstructionOptions.from_args(_args(), bundled).loss == "global"
    ev = EvalSettings.from_args(_args(ppl=["wiki"], limit=3), bundled)
    assert ev.ppl_datasets == ("wiki",) and ev.limit == 3 and ev.tasks == tuple(bundled.tasks)
    assert recon["samples"] == recon.samples and recon.get("tokens") is None  # read as the old dicts were


@pytest.mark.parametrize(
    ("flag", "make"),
    [
        ("--samples", lambda: Calibration(samples=0)),
        ("--seq-len", lambda: Calibration(seq_len=-1)),
        ("--recon-samples", lambda: ReconstructionOptions(samples=0)),
        ("--recon-tokens", lambda: ReconstructionOptions(tokens=0)),
        ("--ppl-seq-len", lambda: EvalSettings(ppl_seq_len=0)),
        ("--limit", lambda: EvalSettings(limit=0)),
        ("--eval-batch-size", lambda: EvalSettings(eval_batch_size=0)),
    ],
)
def test_the_class_refuses_what_the_cli_refuses(flag, make) -> None:
    with pytest.raises(MoePruneError) as by_class:
        make()
    name = flag.removeprefix("--").replace("-", "_")
    value = int(str(by_class.value).split("(got ")[1].split(")")[0])
    with pytest.raises(MoePruneError) as by_cli:
        check_args(argparse.Namespace(verb="none", **{name: value}))
    expected = f"{flag} must be at least 1 (got {value}); omit it for the default."
    assert str(by_class.value) == str(by_cli.value) == expected


def test_other_rules_and_the_dict_form() -> None:
    with pytest.raises(MoePruneError, match="whole number"):
        Calibration(samples=1.5)
    with pytest.raises(MoePruneError, match="--recon-loss 'sum' is unknown"):
        ReconstructionOptions(loss="sum")
    given = {"samples": 4, "loss": "global"}
    assert ReconstructionOptions.coerce(given) == ReconstructionOptions(samples=4, loss="global")
    assert ReconstructionOptions.coerce(None) == ReconstructionOptions()
    with pytest.raises(MoePruneError, match=r"Unknown reconstruction option\(s\) \['sample'\]"):
        ReconstructionOptions.coerce({"sample": 4})
    # The token budget caps the windows (whole windows, at least one), as api._reconstruct always did.
    resolved = ReconstructionOptions(tokens=5000).resolved(PRESETS[PAPER])
    assert (resolved.samples, resolved.seq_len, resolved.windows) == (128, 2048, 2)
    assert ReconstructionOptions(tokens=10, samples=8, seq_len=64).windows == 1


def test_the_api_refuses_before_loading_anything(tmp_path) -> None:
    # No such model: the option check must fail first, with the CLI's message.
    with pytest.raises(MoePruneError, match="--samples must be at least 1"):
        api.profile(str(tmp_path / "no-model"), ["wiki"], tmp_path / "prof", samples=0)
    with pytest.raises(MoePruneError, match="--recon-seq-len must be at least 1"):
        api.prune(str(tmp_path / "no-model"), 0.5, tmp_path / "out", reconstruction={"seq_len": 0})


def test_grid_options_follow_the_preset_and_check_their_fields() -> None:
    from moeprune.options import GridOptions

    paper, bundled = PRESETS[PAPER], PRESETS[BUNDLED]
    grid = GridOptions.from_args(_args(protect_budget=[20], recover=["none", "router-kd", "none"]))
    assert (grid.retains, grid.seeds, grid.reap_corpus) == (paper.retains, paper.seeds, paper.reap_corpus)
    assert grid.protect_budget == 20 and grid.budgets == [20]  # -B 20 arrives as [20]: not a sweep
    assert grid.recover == ("none", "router-kd")  # once each, in the given order
    sweep = GridOptions.from_args(_args(model="bundled", protect_budget=[0, 4, "auto", 4], reap_corpus="off"))
    assert sweep.budgets == [0, 4, "auto"] and sweep.reap_corpus is None and sweep.seeds == bundled.seeds
    assert GridOptions(protect_budget=None).budgets == [None]
    with pytest.raises(MoePruneError, match="at least one retain ratio"):
        GridOptions(retains=())
    with pytest.raises(MoePruneError, match="--seeds must be 0 or more"):
        GridOptions(seeds=(0, -1))
    with pytest.raises(MoePruneError, match="--reap-samples must be at least 1"):
        GridOptions(reap_samples=0)


def test_api_prune_refuses_bad_calibration_before_loading(tmp_path) -> None:
    """The Calibration refuses where it is built: prune (no such model here) never gets to load anything."""
    with pytest.raises(MoePruneError, match="--seq-len must be at least 1"):
        api.prune(str(tmp_path / "no-model"), 0.5, tmp_path / "out", calibration=Calibration(seq_len=0))
