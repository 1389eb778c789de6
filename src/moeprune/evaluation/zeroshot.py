"""Accuracy through lm-evaluation-harness, on an in-memory model (masked or pruned).

Each task reports one metric (``REPORT_METRIC``: the metrics pruning papers report, acc_norm where
lm-eval length-normalises multi-token choices, acc for WinoGrande, BoolQ and MMLU, exact match for the
generative stress tests). Two averages, each defined only when all of its tasks were evaluated:

- **Common Avg**: the unweighted mean over the six tasks of ``COMMON_TASKS`` (ARC-c, ARC-e, HellaSwag,
  PIQA, WinoGrande, BoolQ) and nothing else, so adding MMLU or any other task never moves it;
  ``None`` when any of the six is missing;
- **Bundled Avg**: the mean over the held-out-domain tasks (``HELDOUT_TASKS``, each its ``REPORT_METRIC``), else
  the acc_norm of the three offline continuation tasks (``BUNDLED_TASKS``).

``zero_shot`` wraps the model in ``SplitSafeHFLM`` (evaluation/hflm.py): plain HFLM misscores a request
whose text equals another request's split at a different point.

Every task runs 0-shot except those in ``FEWSHOT`` (the stress tests, with lm-eval's usual shots).

Inside ``with reuse_lm_eval():`` (the experiment grid wraps its cells in it) lm-eval's TaskManager, the
task objects (with their loaded datasets) and one HFLM wrapper per (model, tokenizer, batch size) are
built once and reused: indexing lm-eval's task folders alone takes seconds, paid per cell otherwise.
Reuse is safe because lm-eval rebuilds every request from the task's documents on each evaluation, and
``surgery.masked`` changes the wrapped model object in place, so the same HFLM sees each cell's model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moeprune.errors import MoePruneError
from moeprune.evaluation.tasks import BUNDLED_TASKS, HELDOUT_TASKS, TASKS_DIR
from moeprune.options import EvalSettings
from moeprune.streaming.layers import DiskLayers

COMMON_TASKS: tuple[str, ...] = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "boolq")
# The paper's stress tests: MMLU (5-shot, lm-eval's `mmlu` group, acc weighted by subtask size), GSM8K
# (lm-eval's `gsm8k`: 5-shot, exact match of the "#### N" answer, strict-match filter) and MATH-500
# (lm-eval's `minerva_math500`: Minerva's 4-shot prompt, exact match of the boxed answer).
STRESS_TASKS: tuple[str, ...] = ("mmlu", "gsm8k", "minerva_math500")
FEWSHOT: dict[str, int] = {"mmlu": 5, "gsm8k": 5, "minerva_math500": 4}
COMMON_AVG_METRIC: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "arc_easy": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
}
REPORT_METRIC: dict[str, str] = {
    **COMMON_AVG_METRIC,
    # Offline tasks over the bundled corpora: acc_norm, as for HellaSwag (also a continuation task).
    **{task: "acc_norm" for task in BUNDLED_TASKS},
    "mmlu": "acc",
    "gsm8k": "exact_match@strict-match",
    "minerva_math500": "exact_match",
    # Held-out-domain tasks: a minimal pair (same words) is scored by summed log-likelihood, as BLiMP.
    "heldout_order": "acc",
    "heldout_domain": "acc_mutual_info",  # log P(choice | passage) - log P(choice): see build_heldout.py
    "heldout_cloze": "acc",
}
# Names that expand to several tasks (``--tasks common,bundled``).
TASK_PRESETS: dict[str, tuple[str, ...]] = {
    "common": COMMON_TASKS,
    "bundled": BUNDLED_TASKS,
    "heldout": HELDOUT_TASKS,
    "stress": STRESS_TASKS,
}


_AUTO_BATCH = re.compile(r"auto(:[1-9][0-9]*)?")
# While reuse_lm_eval() is active: built lm-eval objects by key (see _reused).
_REUSED: dict[tuple, Any] | None = None


def eval_batch_size(value: int | str) -> int | str:
    """A positive integer, ``auto`` (lm-eval finds the largest batch that fits) or ``auto:N`` (it looks
    again N times per task as the inputs get shorter); integers given as text become ints."""
    text = str(value).strip().lower()
    if re.fullmatch(r"[0-9]+", text) and int(text) > 0:  # ASCII digits: "²".isdigit() is true, int() fails
        return int(text)
    if _AUTO_BATCH.fullmatch(text):
        return text
    raise MoePruneError(
        f"eval batch size {value!r} is not a positive integer, auto or auto:N; pass e.g. 16, auto or auto:4."
    )


@contextmanager
def reuse_lm_eval() -> Iterator[None]:
    """Build lm-eval's TaskManager, tasks and HFLM wrappers once for every ``zero_shot`` call inside."""
    global _REUSED
    if _REUSED is not None:  # nested: the outer block owns the objects
        yield
        return
    _REUSED = {}
    try:
        yield
    finally:
        _REUSED = None


def _reused(key: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, or inside reuse_lm_eval() the object built the first time for ``key``."""
    if _REUSED is None:
        return build()
    if key not in _REUSED:
        _REUSED[key] = build()
    return _REUSED[key]


def check_tasks(names: Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None) -> None:
    """Every task is one lm-eval (with moeprune's own task folder) knows: an unknown --tasks name is refused before
    the model loads, not after the perplexity ran."""
    from lm_eval.tasks import TaskManager

    include = _include_paths(include_path)
    manager = _reused(("manager", *include), lambda: TaskManager(include_path=include))
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise MoePruneError(f"Unknown lm-eval task(s) {unknown}; use lm-eval task names (lm-eval ls tasks) or the "
                            f"presets {', '.join(TASK_PRESETS)}, or --tasks none.")


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
    settings: EvalSettings | None = None,
    *,
    max_length: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    seed: int = 1234,
    progress: bool = True,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` (0 shots, or ``FEWSHOT``'s); per-task metrics, the averages, settings.

    ``settings`` (:class:`~moeprune.options.EvalSettings`; None: its defaults): ``tasks`` (names or presets; None:
    ``COMMON_TASKS``), ``limit`` examples per task and ``eval_batch_size`` (an integer, ``auto`` or ``auto:N``, see
    :func:`eval_batch_size`). The bundled offline tasks are always on the include path; ``include_path`` adds more
    task folders. ``progress=False`` hides the log-likelihood progress bar (lm-eval's bars while it builds requests
    stay).
    """
    settings = settings or EvalSettings()
    tasks = COMMON_TASKS if settings.tasks is None else settings.tasks
    limit = settings.limit
    import lm_eval

    names = expand_tasks(tasks)
    batch_size = eval_batch_size(settings.eval_batch_size)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    raw: dict[str, Any] = {"results": {}, "n-samples": {}}
    shots = {name: FEWSHOT.get(name, 0) for name in names}
    try:
        lm = _hflm(model, tokenizer, batch_size, max_length)
        lm.show_progress = progress  # the wrapper may be reused across calls: set it every time
        # One simple_evaluate per shot count: its num_fewshot applies to every task it is given.
        for count in sorted(set(shots.values())):
            subset = [name for name in names if shots[name] == count]
            manager, task_objects = _tasks(subset, _include_paths(include_path))
            part = lm_eval.simple_evaluate(
                model=lm,
                tasks=task_objects,
                num_fewshot=count,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            for key in raw:
                raw[key].update(part.get(key, {}))
    except Exception as err:  # hub tasks offline fail deep inside datasets
        raise MoePruneError(
            f"lm-eval could not run {names}: {err.__class__.__name__}: {err}. Hub tasks (arc_*, hellaswag, ...) "
            "need their datasets online or in the HF cache; offline, use --tasks bundled."
        ) from err
    per_task = {name: _task_metrics(raw["results"].get(name, {}), raw.get("n-samples", {}).get(name)) for name in names}
    avg, used = common_avg(per_task)
    return {
        "tasks": per_task,
        "task_metrics": task_metrics(per_task),
        "common_avg": avg,
        "common_avg_metrics": used,
        "bundled_avg": bundled_avg(per_task),
        "settings": {
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "num_fewshot": shots,
            "limit": limit,
            "batch_size": batch_size,
            **({"batch_sizes_found": list(lm.batch_sizes.values())} if isinstance(batch_size, str) else {}),
            "max_length": lm.max_length,
            "seed": seed,
            "tasks": names,
        },
    }


def _tasks(names: list[str], include: list[str]) -> tuple[Any, list[Any]]:
    """lm-eval's TaskManager and what to evaluate: the names (lm-eval builds the tasks), or inside
    reuse_lm_eval() the task and group objects built once."""
    from lm_eval.tasks import TaskManager

    manager = _reused(("manager", *include), lambda: TaskManager(include_path=include))
    if _REUSED is None:
        return manager, names
    built = [_reused(("task", name, *include), lambda n=name: _build(manager, n)) for name in names]
    return manager, [obj for objects in built for obj in objects]


def _build(manager: Any, name: str) -> list[Any]:
    """The objects ``name`` stands for: its group (which holds its tasks), else its task(s) (a tag expands)."""
    loaded = manager.load(name)
    return [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())


def _hflm(model: Any, tokenizer: Any, batch_size: int | str, max_length: int | None) -> Any:
    # HFLM misscores a request whose text equals another's split at a different point (evaluation/hflm.py).
    from moeprune.evaluation.hflm import SplitSafeHFLM, StreamedHFLM  # lazy: lm-eval, needed only for zero-shot

    if isinstance(model, DiskLayers):  # no batch-size search: it would run the model outside the recorded batches
        size = batch_size if isinstance(batch_size, int) else STREAMED_BATCH_SIZE
        return _reused(("streamed", id(model), id(tokenizer), size, max_length),
                       lambda: StreamedHFLM(model, tokenizer=tokenizer, batch_size=size, max_length=max_length))

    # id() is a safe key: the cached wrapper holds the model and tokenizer, so neither id can be reused.
    return _reused(
        ("hflm", id(model), id(tokenizer), batch_size, max_length),
        lambda: SplitSafeHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length),
    )


STREAMED_BATCH_SIZE = 8  # for a streamed model given --eval-batch-size auto


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


def metric_for_task(task: str, metrics: dict[str, Any]) -> str | None:
    """The metric a task reports in the tables: ``REPORT_METRIC``'s, else acc_norm, acc or exact_match."""
    if task in REPORT_METRIC:
        return REPORT_METRIC[task]
    return next((m for m in ("acc_norm", "acc", "exact_match") if m in metrics), None)


def task_metrics(per_task: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{task: the metric it reports} for the tasks that report it."""
    return {t: m for t, metrics in per_task.items() if (m := metric_for_task(t, metrics)) and m in metrics}


def _mean_over(per_task: dict[str, dict[str, Any]], tasks: Sequence[str]) -> tuple[float | None, dict[str, str]]:
    """Unweighted mean of each task's reported metric, or None unless every one of ``tasks`` has it."""
    used = {t: m for t, m in task_metrics(per_task).items() if t in tasks}
    if len(used) < len(tasks):
        return None, {}
    return sum(per_task[t][used[t]] for t in tasks) / len(tasks), {t: used[t] for t in tasks}


def common_avg(per_task: dict[str, dict[str, Any]]) -> tuple[float | None, dict[str, str]]:
    """Common Avg: the mean over the six ``COMMON_TASKS`` only (None unless all six were evaluated), and
    which metric each of them contributed."""
    return _mean_over(per_task, COMMON_TASKS)


def bundled_avg(per_task: dict[str, dict[str, Any]]) -> float | None:
    """Bundled Avg: the mean over the testbed's offline tasks: the held-out-domain tasks (``heldout``, what
    the bundled experiment preset runs) when all of them ran, else the three continuation tasks
    (``bundled``) when all of those ran, else None."""
    for tasks in (HELDOUT_TASKS, BUNDLED_TASKS):
        average = _mean_over(per_task, tasks)[0]
        if average is not None:
            return average
    return None
