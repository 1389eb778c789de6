"""Unseen-domain coverage summary: ratios to dense, worst/mean, wins against random seeds, report section."""

from __future__ import annotations

import pytest

from moeprune.evaluation.coverage import coverage_table, heldout_domains, summary, wins_against_seeds
from moeprune.evaluation.report import render_report

CAL = ["wiki", "web"]


def cell(method, retain, ppl, seed=None):
    return {"cell": f"{method}-{retain}-{seed}", "method": method, "retain": retain, "seed": seed,
            "summary": {"ppl": ppl}}


DENSE = cell("dense", 1.0, {"wiki": 10.0, "web": 20.0, "bible": 5.0, "man": 8.0})
CELLS = [
    DENSE,
    cell("tb-coverage", 0.5, {"wiki": 12.0, "web": 22.0, "bible": 6.0, "man": 8.8}),
    cell("random", 0.5, {"wiki": 11.0, "web": 21.0, "bible": 7.5, "man": 8.0}, seed=0),
    cell("random", 0.5, {"wiki": 11.0, "web": 21.0, "bible": 5.5, "man": 8.4}, seed=1),
]


def test_heldout_domains_exclude_calibration():
    assert heldout_domains(CELLS, CAL) == ["bible", "man"]


def test_summary_ratios_worst_and_mean():
    s = summary(CELLS[1], DENSE, ["bible", "man"])
    assert s["bible"] == pytest.approx(1.2) and s["man"] == pytest.approx(1.1)
    assert s["worst"] == pytest.approx(1.2) and s["mean"] == pytest.approx(1.15)
    assert summary(CELLS[1], DENSE, ["nope"]) is None


def test_wins_count_seeds_with_a_worse_worst_domain():
    # ours: worst 1.2; seed 0: worst 1.5 (ours better); seed 1: worst 1.1 (ours worse)
    assert wins_against_seeds(CELLS, CAL, "tb-coverage") == {0.5: "1/2"}


def test_table_and_report_section():
    table = coverage_table(CELLS, CAL)
    assert "| 50% | tb-coverage | 1.200 | 1.100 | 1.200 | 1.150 |" in table
    assert "random (2 seeds) | 1.300 ± 0.283" in table  # bible ratios 1.5 and 1.1
    report = render_report(CELLS, {"calibration": {"corpora": CAL}, "evaluation": {}})
    assert "## Unseen-domain coverage" in report and "50% 1/2" in report
    assert coverage_table(CELLS[1:], CAL) == ""  # no dense cell, no ratios
