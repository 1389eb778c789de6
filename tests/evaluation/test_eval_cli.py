"""``moeprune eval``: a mask applied in memory scores exactly like the exported pruned checkpoint."""

from __future__ import annotations

import json

import pytest

from moeprune.bundled import read_bundled_corpus
from moeprune.cli import main
from moeprune.evaluation.runner import resolve_tasks, summarise
from moeprune.evaluation.zeroshot import COMMON_TASKS
from moeprune.loading import ModelSource
from moeprune.options import EvalSettings
from moeprune.planning.mask import ExpertMask, LayerMask
from moeprune.presets import PAPER, PRESETS
from moeprune.surgery import export_pruned

PPL = ["--ppl-seq-len", "64", "--tasks", "none", "--dtype", "float32"]


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    """About 800 tokens (a dozen 64-token windows): the tiny model scores it in seconds."""
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text("\n\n".join(read_bundled_corpus("web", "test"))[:4000])
    return path


@pytest.fixture(scope="module")
def mask_file(tiny_checkpoint, tmp_path_factory):
    # The tiny qwen2_moe has MoE layers 0 and 2 (layer 1 is dense), 8 experts each.
    mask = ExpertMask(model=str(tiny_checkpoint), method="reap", retain=0.5, num_experts=8, kept_per_layer=4,
                      layers={0: LayerMask([0, 2, 5, 7]), 2: LayerMask([1, 2, 3, 6])})
    path = tmp_path_factory.mktemp("mask") / "reap-0.50.json"
    mask.save(path)
    return path


def _eval(model, out, short_text, *extra) -> dict:
    assert main(["eval", str(model), "--ppl", str(short_text), *PPL, "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_masked_eval_equals_exported_checkpoint(tiny_checkpoint, mask_file, short_text, tmp_path, capsys):
    masked = _eval(tiny_checkpoint, tmp_path / "masked.json", short_text, "--mask", str(mask_file))
    exported = export_pruned(ModelSource.of(str(tiny_checkpoint), dtype="float32"), mask_file, tmp_path / "pruned",
                             progress=False)
    pruned = _eval(exported, tmp_path / "pruned.json", short_text)
    dense = _eval(tiny_checkpoint, tmp_path / "dense.json", short_text)
    name = str(short_text)
    assert masked["summary"]["ppl"][name] == pytest.approx(pruned["summary"]["ppl"][name], rel=1e-5)
    assert abs(masked["summary"]["ppl"][name] / dense["summary"]["ppl"][name] - 1) > 1e-4  # the mask matters
    assert masked["footprint"] == pruned["footprint"]  # masked() slices physically: same size as the export
    assert masked["summary"]["params_ratio"] < 1 and dense["summary"]["params_ratio"] == 1
    assert masked["mask"]["method"] == "reap" and masked["mask"]["kept_per_layer"] == 4
    assert masked["mask"]["file"] == str(mask_file) and dense["mask"] is None
    assert "zero_shot" not in masked and masked["perplexity"][name]["seq_len"] == 64
    assert '"ppl"' in capsys.readouterr().out  # the summary is printed


def test_summary_from_results():
    results = {
        "perplexity": {"wiki": {"ppl": 12.5}},
        "zero_shot": {"tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.6}, "boolq": {"acc": 0.7, "acc_norm": 0.1}},
                      "common_avg": 0.65, "common_avg_metrics": {"arc_easy": "acc_norm", "boolq": "acc"}},
        "footprint": {"params_total": 50, "params_routed_experts": 30, "bytes": 100},
        "footprint_vs_dense": {"params_total_ratio": 0.5, "bytes_ratio": 0.5},
    }
    assert summarise(results) == {
        "ppl": {"wiki": 12.5}, "tasks": {"arc_easy": 0.6, "boolq": 0.7},
        "task_metrics": {"arc_easy": "acc_norm", "boolq": "acc"}, "common_avg": 0.65, "bundled_avg": None, "params": 50,
        "params_routed_experts": 30, "bytes": 100, "params_ratio": 0.5, "bytes_ratio": 0.5,
    }


def test_resolve_tasks():
    assert resolve_tasks(None) == list(COMMON_TASKS)
    assert resolve_tasks([]) == [] and resolve_tasks(["none"]) == [] and resolve_tasks("none") == []
    assert resolve_tasks(["bundled", "piqa"]) == ["bundled_wiki_cont", "bundled_web_cont", "bundled_cross_cont",
                                                  "piqa"]


def test_default_seq_len():
    """The open perplexity window of the paper preset: min(2048, max positions); a given one is kept."""
    class Source:
        preset = PRESETS[PAPER]
        max_positions = 1024

    assert EvalSettings().resolved(Source()).ppl_seq_len == 1024
    assert EvalSettings(ppl_seq_len=256).resolved(Source()).ppl_seq_len == 256
    Source.max_positions = 32768
    assert EvalSettings().resolved(Source()).ppl_seq_len == 2048


def _settings(model, **flags):
    import argparse

    return EvalSettings.from_args(argparse.Namespace(model=model, **flags)).resolved(ModelSource.of(model))


def test_default_ppl_datasets(tiny_checkpoint):
    # offline for the testbed: the calibration corpora and the domains calibration never uses
    assert _settings("bundled").ppl_datasets == ("wiki", "web", "bible", "man", "glossary", "devil")
    assert _settings(str(tiny_checkpoint)).ppl_datasets == ("wikitext2", "c4")
    assert _settings("bundled", ppl=[]).ppl_datasets == () and _settings("bundled", ppl=["c4"]).ppl_datasets == ("c4",)
    assert _settings("bundled").ppl_seq_len == 256 and _settings(str(tiny_checkpoint)).ppl_seq_len == 128


def test_default_tasks(tiny_checkpoint):
    # the testbed's default runs offline: its held-out tasks, not the six hub tasks of Common Avg
    assert resolve_tasks(_settings("bundled").tasks) == ["heldout_order", "heldout_domain", "heldout_cloze"]
    assert resolve_tasks(_settings(str(tiny_checkpoint)).tasks) == list(COMMON_TASKS)
    assert _settings("bundled", tasks=["none"]).tasks == ("none",)
    assert _settings("bundled", tasks="arc_easy").tasks == "arc_easy"


def test_eval_of_the_bundled_model_defaults_to_offline_tasks(monkeypatch, capsys):
    import moeprune.evaluation.runner as runner

    seen = {}
    monkeypatch.setattr(runner, "evaluate_loaded", lambda model, tok, settings, **kw: seen.update(settings=settings)
                        or {"summary": {}})
    assert main(["eval", "bundled", "--ppl", "-q"]) == 0
    assert seen["settings"].tasks == ("heldout",) and seen["settings"].ppl_datasets == ()
