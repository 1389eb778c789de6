"""The presets: one frozen row per preset, read by every verb, and the help texts written from them."""

from __future__ import annotations

import dataclasses

import pytest

from moeprune import api
from moeprune.bundled import bundled_model_path
from moeprune.evaluation.perplexity import BUNDLED_PPL_DATASETS
from moeprune.presets import BUNDLED, PAPER, PRESETS, help_default, is_bundled, preset_for


def test_the_model_picks_the_preset() -> None:
    assert preset_for("bundled") is PRESETS[BUNDLED]
    assert preset_for(str(bundled_model_path())) is PRESETS[BUNDLED]
    assert preset_for("Qwen/Qwen1.5-MoE-A2.7B") is PRESETS[PAPER]
    assert not is_bundled(object()) and not is_bundled("")
    assert api.preset_for is preset_for and api.PRESETS is PRESETS  # the old names still import


def test_presets_are_frozen_and_read_both_ways() -> None:
    paper = PRESETS[PAPER]
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.samples = 1  # type: ignore[misc]
    assert paper["samples"] == paper.samples == 512
    assert paper.get("no_such_field", "x") == "x"
    with pytest.raises(KeyError):
        paper["no_such_field"]


def test_the_values_the_paper_and_the_testbed_use() -> None:
    paper, bundled = PRESETS[PAPER], PRESETS[BUNDLED]
    assert (paper.samples, paper.seq_len, paper.recon_samples, paper.recon_seq_len) == (512, 1024, 128, 2048)
    assert (bundled.samples, bundled.seq_len, bundled.recon_samples, bundled.recon_seq_len) == (128, 256, 32, 256)
    assert bundled.ppl_datasets == BUNDLED_PPL_DATASETS
    assert paper.ppl_seq_len is None and bundled.ppl_seq_len == 256  # None: min(2048, the model's positions)
    assert (bundled.recover_samples, bundled.recover_seq_len, bundled.recover_epochs) == (128, 256, 3)
    assert (paper.recover_samples, paper.recover_seq_len, paper.recover_epochs) == (256, 1024, 1)


def test_help_texts_come_from_the_presets() -> None:
    assert help_default("samples") == "default 512; bundled: 128"
    assert help_default("corpora") == "default wikitext2 c4; bundled: wiki web"
