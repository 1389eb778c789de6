"""Typed options: fields default to "the preset", one resolved(source) per class fills them and applies the window
rule; the CLI's numeric rules on the class, so the Python API refuses what the CLI refuses with the same message."""

from __future__ import annotations

import argparse

import pytest

from moeprune import api
from moeprune.errors import MoePruneError
from moeprune.options import Calibration, EvalSettings, PresetSource, ReconstructionOptions, fit_window
from moeprune.preflight import check_args
from moeprune.presets import BUNDLED, PAPER, PRESETS


def _args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{"model": "some/model", **flags})


def test_flag_wins_else_the_preset() -> None:
    paper, bundled = PRESETS[PAPER], PRESETS[BUNDLED]
    assert Calibration.from_args(_args(samples=None, seq_len=None)) == Calibration()  # unset: the preset's
    resolved = Calibration.from_args(_args(samples=None)).resolved(PresetSource(paper))
    assert resolved == Calibration(paper.corpora, 512, 1024, 4, checkpoint_every=16)
    assert Calibration.from_args(_args(model="bundled", samples=8, corpora=["x"])).samples == 8
    assert Calibration.from_args(_args()).resolved(PresetSource(bundled)).corpora == bundled.corpora
    recon = ReconstructionOptions.from_args(_args(recon_samples=None, recon_loss=None)).resolved(PresetSource(paper))
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
    resolved = ReconstructionOptions(tokens=5000).resolved(PresetSource(PRESETS[PAPER]))
    assert (resolved.samples, resolved.seq_len, resolved.windows) == (128, 2048, 2)
    assert ReconstructionOptions(tokens=10, samples=8, seq_len=64).windows == 1


def test_the_api_refuses_before_loading_anything(tmp_path) -> None:
    # No such model: the option check must fail first, with the CLI's message.
    with pytest.raises(MoePruneError, match="--samples must be at least 1"):
        api.profile(str(tmp_path / "no-model"), ["wiki"], tmp_path / "prof", calibration={"samples": 0})
    with pytest.raises(MoePruneError, match="--recon-seq-len must be at least 1"):
        api.prune(str(tmp_path / "no-model"), 0.5, tmp_path / "out", reconstruction={"seq_len": 0})


def test_grid_options_follow_the_preset_and_check_their_fields() -> None:
    from moeprune.options import GridOptions

    paper, bundled = PRESETS[PAPER], PRESETS[BUNDLED]
    grid = GridOptions.from_args(_args(protect_budget=[20], recover=["none", "router-kd", "none"]))
    assert (grid.retains, grid.seeds, grid.reap_corpus) == (None, None, None)  # unset: the preset's
    grid = grid.resolved(PresetSource(paper), ["tb-coverage"])
    assert (grid.retains, grid.seeds, grid.reap) == (paper.retains, paper.seeds, paper.reap_corpus)
    assert grid.protect_budget == 20 and grid.budgets == [20]  # -B 20 arrives as [20]: not a sweep
    assert grid.recover == ("none", "router-kd")  # once each, in the given order
    sweep = GridOptions.from_args(_args(protect_budget=[0, 4, "auto", 4], reap_corpus="off"))
    sweep = sweep.resolved(PresetSource(bundled))
    assert sweep.budgets == [0, 4, "auto"] and sweep.reap is None and sweep.seeds == bundled.seeds
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


class _Source:
    """A model source as resolved() sees it: a preset and a positions limit."""

    def __init__(self, preset: str, limit: int | None) -> None:
        self.preset, self.max_positions = PRESETS[preset], limit


def test_one_window_rule_for_every_class() -> None:
    """Given or the preset's, a window beyond the model's positions is refused naming the flag; an open window
    (perplexity's, the paper preset) is min(2048, positions)."""
    from moeprune.recovery import RecoveryOptions

    small = _Source(PAPER, 128)
    cases = [(lambda: Calibration().resolved(small), "--seq-len 1024"),
             (lambda: ReconstructionOptions().resolved(small), "--recon-seq-len 2048"),
             (lambda: RecoveryOptions(kind="router-kd").resolved(small), "--recover-seq-len 1024"),
             (lambda: EvalSettings(ppl_seq_len=256).resolved(small), "--ppl-seq-len 256")]
    for resolve, flag in cases:
        with pytest.raises(MoePruneError, match=f"{flag} \\(given or the default\\) exceeds the model's "
                                                "max_position_embeddings=128"):
            resolve()
    assert EvalSettings().resolved(small).ppl_seq_len == 128
    assert EvalSettings().resolved(_Source(PAPER, 8192)).ppl_seq_len == 2048
    assert EvalSettings().resolved(_Source(BUNDLED, 1024)).ppl_seq_len == 256
    assert fit_window(None, None, "--x") == 2048 and fit_window(64, 128, "--x") == 64


def test_recovery_options_default_to_the_model_preset() -> None:
    """Defect 2 of issue 26: RecoveryOptions() took the bundled preset's numbers for every model."""
    from moeprune.loading import ModelSource
    from moeprune.recovery import RecoveryOptions

    paper, bundled = PRESETS[PAPER], PRESETS[BUNDLED]
    hub_like = RecoveryOptions(kind="router-kd").resolved(_Source(PAPER, 4096))
    assert (hub_like.samples, hub_like.seq_len, hub_like.epochs) == (paper.recover_samples, paper.recover_seq_len,
                                                                     paper.recover_epochs) == (256, 1024, 1)
    testbed = RecoveryOptions(kind="router-kd").resolved(ModelSource.of("bundled"))
    assert (testbed.samples, testbed.seq_len, testbed.epochs) == (bundled.recover_samples, 256, 3)
    assert RecoveryOptions(kind="router-kd", epochs=2).resolved(_Source(PAPER, 4096)).epochs == 2  # given wins
    with pytest.raises(MoePruneError, match="resolve them first"):
        RecoveryOptions(kind="router-kd").require_resolved()
