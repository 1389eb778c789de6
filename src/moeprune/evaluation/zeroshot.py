"""Zero-shot accuracy through lm-evaluation-harness, on an in-memory model (masked or pruned).

Common Avg is the unweighted mean over the evaluated tasks of one metric per task, chosen by
``COMMON_AVG_METRIC`` (the metrics pruning papers report: acc_norm where lm-eval length-normalises
multi-token choices, acc for WinoGrande and BoolQ); tasks not in the table use acc_norm if they
report it, else acc, and tasks with neither (e.g. gsm8k) are left out of the average.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moeprune.errors import MoePruneError
from moeprune.evaluation.tasks import BUNDLED_TASKS, HELDOUT_TASKS, TASKS_DIR

COMMON_TASKS: tuple[str, ...] = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "boolq")
COMMON_AVG_METRIC: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "arc_easy": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
    # Offline tasks over the bundled corpora: acc_norm, as for HellaSwag (also a continuation task).
    "bundled_wiki_cont": "acc_norm",
    "bundled_web_cont": "acc_norm",
    "bundled_cross_cont": "acc_norm",
    # Held-out-domain tasks: a minimal pair (same words) is scored by summed log-likelihood, as BLiMP.
    "heldout_order": "acc",
    "heldout_domain": "acc_mutual_info",  # log P(choice | passage) - log P(choice): see build_heldout.py
    "heldout_cloze": "acc",
}
# Names that expand to several tasks (``--tasks common,bundled``).
TASK_PRESETS: dict[str, tuple[str, ...]] = {"common": COMMON_TASKS, "bundled": BUNDLED_TASKS, "heldout": HELDOUT_TASKS}


def expand_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Split comma lists and expand presets, keeping order and dropping repeats."""
    names = tasks.split(",") if isinstance(tasks, str) else [n for t in tasks for n in t.split(",")]
    out: list[str] = []
    for name in (n.strip() for n in names if n.strip()):
        for task in TASK_PRESETS.get(name, (name,)):
            if task not in out:
                out.append(task)
    return out


def zero_shot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] = COMMON_TASKS,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    max_length: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    seed: int = 1234,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` with 0 shots; per-task metrics, Common Avg and the settings used.

    The bundled offline tasks are always on the include path; ``include_path`` adds more task folders.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = expand_tasks(tasks)
    manager = TaskManager(include_path=_include_paths(include_path))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except Exception as err:  # hub tasks offline fail deep inside datasets
        raise MoePruneError(
            f"lm-eval could not run {names}: {err.__class__.__name__}: {err}. Hub tasks (arc_*, hellaswag, ...) "
            "need their datasets online or in the HF cache; offline, use --tasks bundled."
        ) from err
    per_task = {name: _task_metrics(raw["results"].get(name, {}), raw.get("n-samples", {}).get(name)) for name in names}
    avg, used = common_avg(per_task)
    return {
        "tasks": per_task,
        "common_avg": avg,
        "common_avg_metrics": used,
        "settings": {
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "num_fewshot": 0,
            "limit": limit,
            "batch_size": batch_size,
            "max_length": lm.max_length,
            "seed": seed,
            "tasks": names,
        },
    }


def _include_paths(extra: str | Path | Sequence[str | Path] | None) -> list[str]:
    if extra is None:
        extra = []
    elif isinstance(extra, (str, Path)):
        extra = [extra]
    return [str(TASKS_DIR), *(str(p) for p in extra)]


def _task_metrics(row: dict[str, Any], samples: dict[str, int] | None) -> dict[str, Any]:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` keys as ``acc`` / ``acc_stderr``; other filters as
    ``metric@filter``. Non-numeric stderr ("N/A") is dropped."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric}@{filt}"] = float(value)
    if samples:
        out["samples"] = int(samples.get("effective", samples.get("original", 0)))
    return out


def metric_for_avg(task: str, metrics: dict[str, Any]) -> str | None:
    """The metric a task contributes to Common Avg, or None when it has none of acc_norm/acc."""
    if task in COMMON_AVG_METRIC:
        return COMMON_AVG_METRIC[task]
    return next((m for m in ("acc_norm", "acc") if m in metrics), None)


def common_avg(per_task: dict[str, dict[str, Any]]) -> tuple[float | None, dict[str, str]]:
    """Unweighted mean over tasks of each task's ``metric_for_avg``; also which metric each task used."""
    used = {t: m for t, metrics in per_task.items() if (m := metric_for_avg(t, metrics)) and m in metrics}
    if not used:
        return None, used
    return sum(per_task[t][m] for t, m in used.items()) / len(used), used
