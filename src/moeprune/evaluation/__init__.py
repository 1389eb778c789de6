"""Evaluation: perplexity (SparseGPT/Wanda protocol), zero-shot accuracy via lm-eval, model footprint.

:func:`evaluate` runs all of them on one in-memory model (dense, masked or pruned) and returns one
JSON-able dict; :func:`save_results` writes it atomically. Protocols: docs/evaluation.md.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import moeprune
from moeprune.evaluation.footprint import compare_footprints, footprint
from moeprune.evaluation.perplexity import PPL_DATASETS, perplexity
from moeprune.evaluation.zeroshot import (
    COMMON_AVG_METRIC,
    COMMON_TASKS,
    TASK_PRESETS,
    common_avg,
    expand_tasks,
    zero_shot,
)
from moeprune.io import write_json_atomic
from moeprune.options import EvalSettings
from moeprune.streaming.layers import DiskLayers


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    settings: EvalSettings,
    *,
    tasks: Sequence[str] | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Perplexity on each of the resolved ``settings.ppl_datasets`` (``settings.ppl_seq_len`` tokens a window) and
    zero-shot accuracy on ``tasks`` (lm-eval names, already expanded; None: ``settings.tasks`` as given; () skips).

    ``metadata`` (e.g. model path, mask file, method) is copied into the result as is.
    """
    start = time.time()
    tasks = settings.tasks if tasks is None else tasks
    net = model.model if isinstance(model, DiskLayers) else model
    results: dict[str, Any] = {"metadata": dict(metadata or {}), "footprint": footprint(net)}
    results["perplexity"] = {
        name: perplexity(model, tokenizer, name, settings, progress=progress) for name in settings.ppl_datasets or ()
    }
    names = [tasks] if isinstance(tasks, str) else list(tasks or ())
    if names and not all(n.strip().lower() in ("none", "") for n in names):
        results["zero_shot"] = zero_shot(model, tokenizer, replace(settings, tasks=tasks), include_path=include_path,
                                         progress=progress)
    results["versions"] = versions()
    results["seconds"] = round(time.time() - start, 1)
    return results


def versions() -> dict[str, str]:
    """Library versions that change numbers (recorded with every result)."""
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "moeprune": getattr(moeprune, "__version__", "unknown"),
    }
    try:
        import lm_eval

        found["lm_eval"] = getattr(lm_eval, "__version__", "unknown")
    except ImportError:
        found["lm_eval"] = "not installed"
    return found


def save_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``results`` as JSON atomically (a crash never leaves half a file)."""
    write_json_atomic(path, dict(results))
    return Path(path)


__all__ = [
    "COMMON_AVG_METRIC",
    "COMMON_TASKS",
    "PPL_DATASETS",
    "TASK_PRESETS",
    "common_avg",
    "compare_footprints",
    "evaluate",
    "expand_tasks",
    "footprint",
    "perplexity",
    "save_results",
    "versions",
    "zero_shot",
]
