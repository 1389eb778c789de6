"""The experiment grid on a tiny checkpoint (files, resume, refusal of mixed settings) and the report tables
on a hand-made results list."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from moeprune.cli import experiment_options
from moeprune.errors import MoePruneError
from moeprune.evaluation import report, runner
from moeprune.evaluation.plots import ranking_overlap, series
from moeprune.experiment import run_experiment
from moeprune.options import parse_ppl_data
from tests.grid_options import typed

METHODS = ["random", "reap", "frequency", "tb-coverage"]


def grid_kwargs(text_corpus, **over):
    kwargs = dict(
        retains=(0.5, 0.75), methods=METHODS, seeds=(0, 1), corpora=["wiki", "web"], samples=4, seq_len=32,
        batch_size=2, ppl_datasets=[str(text_corpus)], ppl_seq_len=64, max_windows=2, tasks=["none"],
        candidate="reap", reconstruction={"samples": 4, "seq_len": 32}, reap_corpus="none", progress=False,
    )
    return {**kwargs, **over}


@pytest.fixture(scope="module")
def grid(tiny_checkpoint, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    return out, run_experiment(str(tiny_checkpoint), out, **typed(grid_kwargs(text_corpus)))


def _counting(monkeypatch, fail_at: int | None = None) -> list[str]:
    """Replace the per-cell evaluation by a counting wrapper (optionally raising at call ``fail_at``)."""
    real, calls = runner.evaluate_loaded, []

    def wrapper(*args, **kwargs):
        calls.append(kwargs["variant"].mask.method if kwargs.get("variant") is not None else "dense")
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_loaded", wrapper)
    return calls


def test_grid_writes_all_files(grid):
    out, result = grid
    masks = sorted(p.stem for p in (out / "masks").glob("*.json"))
    expected = sorted([f"random-{r}-seed{s}" for r in ("0.50", "0.75") for s in (0, 1)]
                      + [f"{m}-{r}" for m in ("reap", "frequency", "tb-coverage") for r in ("0.50", "0.75")])
    assert masks == expected
    assert sorted(p.stem for p in (out / "cells").glob("*.json")) == sorted(["dense", *expected])
    assert [c["cell"] for c in result["cells"]][0] == "dense" and len(result["cells"]) == 11
    for name in ("results.json", "results.csv", "report.md", "experiment.json", "profile/wiki.safetensors",
                 "plots/ranking_overlap.png", "plots/ppl_notes.txt.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(result["cells"]))
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == 11 and rows[0]["method"] == "dense"


def test_cells_record_mask_and_pruned_footprint(grid):
    _, result = grid
    dense, cell = result["cells"][0], next(c for c in result["cells"] if c["cell"] == "reap-0.50")
    assert cell["mask"]["method"] == "reap" and cell["mask"]["kept_per_layer"] == 4 and cell["kept_per_layer"] == 4
    assert cell["mask"]["file"].endswith("masks/reap-0.50.json")
    # masked() slices physically, so the cell's footprint is the pruned size, below the dense one.
    assert cell["summary"]["params"] < dense["summary"]["params"]
    assert cell["summary"]["params_ratio"] == pytest.approx(cell["summary"]["params"] / dense["summary"]["params"])
    (name,) = dense["summary"]["ppl"]
    assert name.endswith("notes.txt") and cell["summary"]["ppl"][name] != dense["summary"]["ppl"][name]
    tb = next(c for c in result["cells"] if c["cell"] == "tb-coverage-0.50")
    assert tb["mask"]["candidate"] == "reap" and tb["mask"]["protect_budget"] == 3  # round(8 / 3), at most K


def test_report_of_grid(grid):
    out, _ = grid
    text = (out / "report.md").read_text()
    assert "| 100% | Dense |" in text and "Random (2 seeds)" in text and "TB-Coverage better than" in text
    assert "![ranking_overlap](plots/ranking_overlap.png)" in text


def test_resume_recomputes_only_missing_cell(grid, tiny_checkpoint, text_corpus, monkeypatch):
    out, first = grid
    before = {c["cell"]: c["summary"] for c in json.loads(json.dumps(first["cells"]))}
    (out / "cells" / "frequency-0.75.json").unlink()
    calls = _counting(monkeypatch)
    again = run_experiment(str(tiny_checkpoint), out, **typed(grid_kwargs(text_corpus)))
    assert calls == ["frequency"]
    assert {c["cell"]: c["summary"] for c in again["cells"]} == before  # deterministic: the same numbers


def test_interrupted_run_resumes_without_redoing(tiny_checkpoint, text_corpus, tmp_path, monkeypatch):
    kwargs = grid_kwargs(text_corpus, methods=["reap"], retains=(0.5,))
    _counting(monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError, match="killed"):
        run_experiment(str(tiny_checkpoint), tmp_path, **typed(kwargs))
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["dense.json"]  # no half-written file
    calls = _counting(monkeypatch)
    result = run_experiment(str(tiny_checkpoint), tmp_path, **typed(kwargs))
    assert calls == ["reap"] and [c["cell"] for c in result["cells"]] == ["dense", "reap-0.50"]


def test_other_settings_are_refused(grid, tiny_checkpoint, text_corpus):
    out, _ = grid
    with pytest.raises(MoePruneError, match="other evaluation settings"):
        run_experiment(str(tiny_checkpoint), out, **typed(grid_kwargs(text_corpus, ppl_seq_len=32)))


def test_tb_coverage_reuses_expert_sparsity_candidate(tiny_checkpoint, text_corpus, tmp_path):
    from moeprune import api

    kwargs = grid_kwargs(text_corpus, methods=["expert-sparsity", "tb-coverage"], retains=(0.5,), candidate=None,
                         plots=False)
    cells = {c["cell"]: c for c in run_experiment(str(tiny_checkpoint), tmp_path, **typed(kwargs))["cells"]}
    assert set(cells) == {"dense", "expert-sparsity-0.50", "tb-coverage-0.50"}
    assert len(list((tmp_path / "profile" / "reconstruction").iterdir())) == 1  # one capture
    tb = json.loads((tmp_path / "masks" / "tb-coverage-0.50.json").read_text())
    # The same mask api.plan_many computes with its own search (on the cached capture).
    (direct,) = api.plan_many(tmp_path / "profile", "tb-coverage", [0.5], model=str(tiny_checkpoint),
                              reconstruction=kwargs["reconstruction"], progress=False)
    assert tb.pop("sha256")  # the seal of a saved mask (issue 27)
    assert tb == json.loads(json.dumps(direct.to_json()))


# ------------------------------------------------------------------------------------------------ report
def cell(method, retain, ppl, avg, seed=None, k=None, params=1.0):
    return {"cell": f"{method}-{retain}-{seed}", "method": method, "retain": retain, "seed": seed,
            "kept_per_layer": k, "summary": {"ppl": {"wikitext2": ppl}, "tasks": {"arc_easy": avg, "boolq": avg},
                                             "task_metrics": {"arc_easy": "acc_norm", "boolq": "acc"},
                                             "common_avg": avg, "params_ratio": params, "bytes_ratio": params}}


CELLS = [
    cell("dense", 1.0, 10.0, 0.70),
    cell("random", 0.5, 30.0, 0.40, seed=0, k=4, params=0.6),
    cell("random", 0.5, 40.0, 0.50, seed=1, k=4, params=0.6),
    cell("random", 0.5, 50.0, 0.45, seed=2, k=4, params=0.6),
    cell("reap", 0.5, 20.0, 0.55, k=4, params=0.6),
    cell("tb-coverage", 0.5, 35.0, 0.60, k=4, params=0.6),
    cell("reap", 0.75, 12.0, 0.65, k=6, params=0.8),
    cell("tb-coverage", 0.75, 12.0, 0.62, k=6, params=0.8),
]


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_table1_rows_bold_and_random_mean_std():
    table = report.table1(CELLS)
    header = table.splitlines()[0]
    assert header.split("|")[1:-1] == [" Retain ", " Method ", " WikiText2 PPL ↓ ", " ARC-e ", " BoolQ ",
                                       " Common Avg ↑ ", " Params (× dense) ", " Bytes (× dense) "]
    rows = _rows(table)
    assert [r[:2] for r in rows] == [["100%", "Dense"], ["75% (K=6)", "REAP"], ["75% (K=6)", "TB-Coverage"],
                                     ["50% (K=4)", "Random (3 seeds)"], ["50% (K=4)", "REAP"],
                                     ["50% (K=4)", "TB-Coverage"]]
    assert rows[0][2] == "10.00" and rows[0][5] == "70.00"  # dense: never bold
    assert rows[3][2] == "40.00 ± 10.00" and rows[3][5] == "45.00 ± 5.00" and rows[3][6] == "0.600"
    assert rows[4][2] == "**20.00**" and rows[5][2] == "35.00"  # lowest PPL of the 50% group
    assert rows[5][5] == "**60.00**" and rows[4][5] == "55.00"  # highest accuracy of the 50% group
    assert rows[1][2] == rows[2][2] == "**12.00**"  # a tie bolds both
    assert "**" not in rows[1][6]  # footprint is not ranked


def test_common_avg_note_names_metrics():
    note = report.common_avg_note(CELLS)
    assert "acc_norm for ARC-e; acc for BoolQ" in note and "six tasks ARC-c, ARC-e" in note
    assert report.common_avg_note([]) == ""


def test_table2_seeds_against_tb_coverage():
    rows = _rows(report.table2(CELLS))
    assert [r[1] for r in rows] == ["Random seed 0", "Random seed 1", "Random seed 2", "**TB-Coverage**",
                                    "TB-Coverage better than"]
    assert rows[-2][2:] == ["35.00", "60.00"]
    assert rows[-1][2:] == ["2/3", "3/3"]  # PPL 35 beats 40 and 50, not 30; 60% beats 40, 50, 45
    assert report.table2([c for c in CELLS if c["method"] != "random"]) == ""


def test_csv_has_one_row_per_cell():
    rows = list(csv.DictReader(io.StringIO(report.to_csv(CELLS))))
    assert len(rows) == len(CELLS) and rows[1]["ppl_wikitext2"] == "30.0" and rows[1]["arc_easy"] == "0.4"


def test_series_mean_and_std():
    points = series(CELLS, lambda c: c["summary"]["common_avg"])
    assert "dense" not in points
    retain, mean, std = points["random"][0]
    assert (retain, mean) == (0.5, pytest.approx(0.45)) and std == pytest.approx(0.05)


def test_ranking_overlap():
    scores = torch.tensor([[[4.0, 3, 2, 1], [4, 3, 2, 1]], [[4.0, 3, 2, 1], [1, 2, 3, 4]]])  # [corpora, layers, N]
    assert ranking_overlap(scores, 2) == [1.0, 0.0]
    assert ranking_overlap(scores, 3) == [1.0, pytest.approx(2 / 3)]  # {0,1,2} vs {3,2,1}
    three = torch.cat([scores, scores[:1]])  # pairs (0,1), (0,2), (1,2) in layer 1: 0, 1, 0
    assert ranking_overlap(three, 2) == [1.0, pytest.approx(1 / 3)]


def test_cli_options_follow_preset(tiny_checkpoint):
    import argparse

    from moeprune.cli import model_source
    from moeprune.experiment import resolve_experiment

    base = dict(model="bundled", preset=None, retain=None, methods=None, seeds=None, corpora=None, samples=None,
                seq_len=None, ppl=None, ppl_seq_len=None, tasks=None, limit=None, out="x", dtype="auto",
                device=None, trust_remote_code=False, reap_corpus="none")

    def resolved(**flags):
        args = argparse.Namespace(**{**base, **flags})
        return resolve_experiment(model_source(args), **experiment_options(args))[1]

    bundled = resolved()
    # calibration on the two generic corpora only; perplexity also on every domain calibration never sees
    assert bundled.calibration.corpora == ("wiki", "web")
    assert bundled.evaluation.ppl_datasets == ("wiki", "web", "bible", "man", "glossary", "devil")
    assert bundled.evaluation.tasks == ("heldout",) and len(bundled.grid.seeds) >= 6
    assert bundled.calibration.samples == 128
    # the paper preset on a model of 128 positions: its 2048-token reconstruction windows are refused up front
    with pytest.raises(MoePruneError, match="--recon-seq-len 2048"):
        resolved(model=str(tiny_checkpoint), samples=8, seq_len=32)
    paper = resolved(model=str(tiny_checkpoint), samples=8, seq_len=32, recon_seq_len=64, preset="paper")
    assert paper.grid.seeds == (0, 1, 2, 3, 4, 42) and paper.evaluation.tasks == ("common",)
    assert paper.calibration.samples == 8 and paper.evaluation.ppl_seq_len == 128  # min(2048, positions)
    assert paper.calibration.corpora == ("wikitext2", "c4") and paper.reconstruction["samples"] == 128
    # NAEE's settings in the paper preset; the bundled testbed keeps the cheaper global norm.
    assert paper.reconstruction["seq_len"] == 64 and paper.reconstruction["loss"] == "per-batch"
    assert bundled.reconstruction["loss"] == "global" and bundled.reconstruction["tokens"] is None
    assert parse_ppl_data(["c4=/x.json.gz"]) == {"c4": "/x.json.gz"}
    with pytest.raises(MoePruneError, match="NAME=PATH"):
        parse_ppl_data(["c4"])


def test_rerun_removes_killed_writers_leftovers_only(grid, tiny_checkpoint, text_corpus):
    """The experiment's folders have no lock: a rerun deletes a killed writer's temporary file, not a live one's."""
    from tests.test_temp_files import _writer

    out, _ = grid
    killed, _ = _writer(out / "cells", "killed", "dense.json")
    live, proc = _writer(out / "cells", "live", "dense.json")
    try:
        run_experiment(str(tiny_checkpoint), out, **typed(grid_kwargs(text_corpus)))
        assert not killed.exists(), "a killed writer's leftover is cleaned by the next run"
        assert live.exists(), "a live writer's temporary file must survive"
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        live.unlink(missing_ok=True)  # the grid is shared by the module's other tests
