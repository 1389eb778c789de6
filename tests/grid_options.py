"""Flat keyword arguments (as tests write a small grid) to :func:`moeprune.experiment.run_experiment`'s typed
options, one per stage; the keys left over (plots, progress, dtype, ...) pass through."""

from __future__ import annotations

from typing import Any

from moeprune.options import Calibration, EvalSettings, GridOptions

GRID = ("retains", "methods", "seeds", "protect_budget", "candidate", "reap_corpus", "reap_samples", "reap_seq_len",
        "recover")
CALIBRATION = ("corpora", "samples", "seq_len", "batch_size")
EVALUATION = ("ppl_datasets", "ppl_seq_len", "ppl_sources", "max_windows", "tasks", "limit", "eval_batch_size")


def typed(flat: dict[str, Any]) -> dict[str, Any]:
    rest = dict(flat)

    def take(names: tuple[str, ...]) -> dict[str, Any]:
        return {name: rest.pop(name) for name in names if name in rest}

    return {
        "grid": GridOptions(**take(GRID)),
        "calibration": Calibration(**take(CALIBRATION)),
        "evaluation": EvalSettings(**take(EVALUATION)),
        **rest,
    }
