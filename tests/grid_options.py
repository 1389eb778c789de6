"""Flat keyword arguments (as tests write a small grid) to :func:`moeprune.experiment.run_experiment`'s typed
options, one per stage; the keys left over (plots, progress, dtype, ...) pass through."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from moeprune.options import Calibration, EvalSettings, GridOptions


def typed(flat: dict[str, Any]) -> dict[str, Any]:
    rest = dict(flat)

    def take(cls: type) -> Any:
        return cls(**{f.name: rest.pop(f.name) for f in fields(cls) if f.name in rest})

    return {"grid": take(GridOptions), "calibration": take(Calibration), "evaluation": take(EvalSettings), **rest}
