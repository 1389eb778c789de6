from __future__ import annotations

from pathlib import Path

import pytest

from moeprune.evaluation import plots


def _cell(method: str, retain: float, ppl: float) -> dict:
    return {"method": method, "retain": retain, "summary": {"ppl": {"wiki": ppl}}}


def test_metric_plot_keeps_its_axis_label_and_one_legend_entry_per_method(monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    seen: dict = {}

    def record(plt, fig, ax, path: Path) -> Path:
        seen["ylabel"] = ax.get_ylabel()
        seen["legend"] = ax.get_legend_handles_labels()[1]
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "_save", record)
    cells = [_cell("dense", 1.0, 10.0), _cell("reap", 0.5, 12.0), _cell("frequency", 0.5, 14.0)]
    plots.plot_metric(cells, lambda c: c["summary"]["ppl"].get("wiki"), "wiki perplexity", tmp_path / "p.png")
    assert seen["ylabel"] == "wiki perplexity"  # not the last method's legend label
    assert len(seen["legend"]) == 3  # two methods and the dense line
