"""The ``eval`` verb: load a model once, optionally apply a mask in memory, evaluate, summarise, save.

The mask is applied with :func:`moeprune.surgery.masked`, which slices the experts physically for the
duration of the evaluation, so the numbers (and the footprint) are those of the exported checkpoint
without writing one. :func:`evaluate_loaded` is the part the experiment grid reuses per cell on one
loaded model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeprune.errors import MoePruneError
from moeprune.evaluation import compare_footprints, evaluate, footprint
from moeprune.evaluation.zeroshot import COMMON_TASKS, expand_tasks
from moeprune.io import check_output_file, write_json_atomic
from moeprune.loading import ModelSource, model_name
from moeprune.options import EvalSettings
from moeprune.planning.mask import ExpertMask
from moeprune.streaming.layers import DiskLayers
from moeprune.surgery import masked
from moeprune.surgery.delta import apply_delta
from moeprune.surgery.slicing import masked_on_load

NO_TASKS = {"none", ""}


def resolve_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """None -> the six Common Avg tasks; [] or ["none"] -> no zero-shot; presets ("bundled") expand."""
    if tasks is None:
        return list(COMMON_TASKS)
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names or all(n.strip().lower() in NO_TASKS for n in names):
        return []
    return expand_tasks([n for n in names if n.strip().lower() not in NO_TASKS])


@dataclass(frozen=True)
class Variant:
    """The pruned variant an evaluation runs in memory: ``mask`` (applied for the evaluation, restored afterwards),
    ``path`` (the mask's file, recorded in the result) and ``delta`` (a recovery's replacement tensors, applied
    inside the mask)."""

    mask: ExpertMask
    path: str | Path | None = None
    delta: Mapping[str, torch.Tensor] | None = None


def mask_record(mask: ExpertMask, path: str | Path | None = None) -> dict[str, Any]:
    """What a result needs to say about its mask (the full mask stays in its own file)."""
    return {
        "file": str(path) if path is not None else None,
        "method": mask.method,
        "retain": mask.retain,
        "kept_per_layer": mask.kept_per_layer,
        "num_experts": mask.num_experts,
        "protect_budget": mask.protect_budget,
        "seed": mask.seed,
        "candidate": mask.candidate,
        "variant": mask.variant,
        "protect_budget_requested": mask.protect_budget_requested,
        "candidate_used": mask.candidate_used,
        "notes": list(mask.notes),
    }


def evaluate_model(
    model: ModelSource | str | Path | torch.nn.Module,
    *,
    settings: EvalSettings,
    mask: ExpertMask | str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity and zero-shot accuracy of ``model`` (a model source, or what :meth:`ModelSource.of` takes),
    under ``mask`` when given, with resolved ``settings`` (``EvalSettings(...).resolved(source)``: the api does
    it); the result (with a ``summary``) is written atomically to ``out`` when given.

    A source that streams (see :meth:`ModelSource.placement`) is evaluated from disk one decoder layer at a time:
    perplexity runs all windows layer-major, lm-eval's batches are computed layer-major in chunks, and the mask is
    applied to each layer as it is read."""
    source = ModelSource.of(model)
    if out is not None:
        check_output_file(out, overwrite=overwrite)  # an unwritable --out fails now, not after the evaluation
    streamed = not source.is_loaded and source.placement() == "stream"
    loaded = source.open_stream() if streamed else source.load()
    tok = source.load_tokenizer(loaded.model if streamed else loaded)
    mask_path = None if mask is None or isinstance(mask, ExpertMask) else mask
    if mask_path is not None:
        mask = ExpertMask.load(mask_path)
    results = evaluate_loaded(
        loaded,
        tok,
        settings,
        variant=None if mask is None else Variant(mask, mask_path),
        progress=progress,
        metadata={"model": model_name(loaded) if source.is_loaded else str(source.model),
                  **({"stream": True} if streamed else {})},
    )
    if out is not None:
        write_json_atomic(out, results)
    return results


def evaluate_loaded(
    model: torch.nn.Module | DiskLayers,
    tokenizer: Any,
    settings: EvalSettings,
    *,
    variant: Variant | None = None,
    dense_footprint: dict[str, int] | None = None,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One evaluation of an already loaded model, dense or as ``variant`` (its mask restored afterwards), with
    resolved ``settings``."""
    if settings.ppl_datasets is None or settings.ppl_seq_len is None or settings.tasks is None:
        raise MoePruneError("evaluate_loaded takes resolved settings: EvalSettings(...).resolved(source).")
    # Measured before masking: masked() slices in place, so footprint() inside it is the pruned size.
    streamed = isinstance(model, DiskLayers)
    net = model.model if streamed else model
    dense = dense_footprint or footprint(net)
    meta = dict(metadata or {})
    tasks = resolve_tasks(settings.tasks)
    mask, delta = (None, None) if variant is None else (variant.mask, variant.delta)
    if mask is None:
        results = evaluate(model, tokenizer, settings, tasks=tasks, progress=progress, metadata=meta)
    elif streamed:
        if delta:
            raise MoePruneError("A recovery delta cannot be applied to a model streamed from disk; evaluate the "
                                "exported checkpoint instead (it holds the delta).")
        with masked_on_load(model, mask):
            results = evaluate(model, tokenizer, settings, tasks=tasks, progress=progress, metadata=meta)
            results["footprint"] = _pruned_footprint(net, mask)
    else:
        with masked(model, mask):
            apply_delta(model, dict(delta or {}))
            results = evaluate(model, tokenizer, settings, tasks=tasks, progress=progress, metadata=meta)
    results["mask"] = None if variant is None else mask_record(variant.mask, variant.path)
    results["footprint_vs_dense"] = compare_footprints(dense, results["footprint"])
    results["summary"] = summarise(results)
    return results


def _pruned_footprint(model: torch.nn.Module, mask: ExpertMask) -> dict[str, Any]:
    """The footprint of the pruned model, for a streamed one: its meta skeleton sliced (nothing is read)."""
    with masked(model, mask):
        return footprint(model)


def summarise(results: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers the tables need: ppl per dataset, each task's reported metric, the averages, footprint."""
    zs = results.get("zero_shot") or {}
    used = zs.get("task_metrics", zs.get("common_avg_metrics", {}))
    ratios = results.get("footprint_vs_dense", {})
    fp = results.get("footprint", {})
    return {
        "ppl": {name: r["ppl"] for name, r in results.get("perplexity", {}).items()},
        "tasks": {task: zs["tasks"][task][metric] for task, metric in used.items()},
        "task_metrics": dict(used),
        "common_avg": zs.get("common_avg"),
        "bundled_avg": zs.get("bundled_avg"),
        "params": fp.get("params_total"),
        "params_routed_experts": fp.get("params_routed_experts"),
        "bytes": fp.get("bytes"),
        "params_ratio": ratios.get("params_total_ratio"),
        "bytes_ratio": ratios.get("bytes_ratio"),
    }
