"""Recovery after pruning: router-only KD (``router-kd``), expert merging (``merge``), or both.

A recovery runs between the mask and the checkpoint and returns a :class:`Recovery`: replacement tensors
for the pruned model's MoE parameters (a *delta*, named in the pruned model's namespace) and a JSON record
of what was done. Applying it (:func:`apply_delta`) swaps in new Parameters, so an in-memory evaluation
inside ``surgery.masked`` is undone on exit and an export is the plain pruned checkpoint with those
tensors replaced. Calibration text is generic only: by default the profiled corpora's train splits, never
an evaluation split (docs/recovery.md).

``merge+router-kd`` merges first and trains the routers of the merged model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moeprune.data.corpora import is_builtin_corpus, parse_corpus
from moeprune.data.sampling import calibration_windows
from moeprune.errors import MoePruneError
from moeprune.io import terminal_safe
from moeprune.loading import load_tokenizer, model_name
from moeprune.planning.mask import ExpertMask
from moeprune.recovery.merge import merge_delta, merge_supported
from moeprune.recovery.options import (
    KINDS,
    MERGE,
    MERGE_ROUTER_KD,
    NONE,
    ROUTER_KD,
    RecoveryOptions,
    check_prunes,
    check_train_split,
)
from moeprune.recovery.router_kd import TeacherTargets, teacher_targets, train_routers
from moeprune.surgery.delta import Recovery, apply_delta, check_delta
from moeprune.surgery.slicing import masked

__all__ = [
    "KINDS",
    "MERGE",
    "MERGE_ROUTER_KD",
    "NONE",
    "ROUTER_KD",
    "Recovery",
    "RecoveryOptions",
    "apply_delta",
    "calibration_set",
    "check_delta",
    "check_mergeable",
    "check_mergeable_config",
    "check_prunes",
    "recover",
    "recovery_corpora",
    "teacher_targets",
]

log = logging.getLogger(__name__)


def recovery_corpora(options: RecoveryOptions, mask: ExpertMask | None) -> list[str]:
    """``options.corpora``, else the corpora the mask was profiled on (its ``extra["corpora"]``), but only the
    built-in ones: a mask is a record from someone else, and a local file or hub dataset it names is read only
    when the user names it (``--recover-corpus``). (prune and experiment pass their own corpora explicitly.)"""
    if options.corpora:
        return list(options.corpora)
    recorded = list((mask.extra.get("corpora") if mask is not None else None) or [])
    if not recorded:
        raise MoePruneError(
            "Recovery needs calibration text and the mask records no profiled corpora; pass --recover-corpus "
            "(e.g. --recover-corpus wikitext2 --recover-corpus c4)."
        )
    for spec in recorded:
        if not is_builtin_corpus(spec):
            raise MoePruneError(
                f"The mask records the profiled corpus {terminal_safe(spec)[:120]!r}, which is not a built-in corpus; "
                "recovery reads a file or dataset a mask names only when you name it too: pass --recover-corpus "
                "for each calibration corpus."
            )
    return recorded


def calibration_set(tokenizer: Any, corpora: Sequence[str], options: RecoveryOptions) -> dict[str, torch.Tensor]:
    """{corpus: windows [n, seq_len]}: ``options.samples`` windows in all, split evenly over the corpora, from
    each corpus's train split, sampled with ``options.data_seed`` (not the profiling seed)."""
    options.require_resolved()
    out: dict[str, torch.Tensor] = {}
    share, extra = divmod(options.samples, len(corpora))
    for i, spec_text in enumerate(corpora):
        check_train_split(spec_text)
        count = share + (1 if i < extra else 0)
        if count < 1:
            continue
        try:
            spec = parse_corpus(spec_text)
        except MoePruneError as err:
            raise MoePruneError(f"{err} (recovery calibration corpus; pass --recover-corpus SPEC to choose one)") \
                from err
        out[spec.name] = calibration_windows(spec, tokenizer, count, options.seq_len, options.data_seed)
    return out


def recover(
    model: nn.Module,
    mask: ExpertMask,
    options: RecoveryOptions,
    *,
    tokenizer: Any = None,
    windows: dict[str, torch.Tensor] | None = None,
    teacher: TeacherTargets | None = None,
    progress: bool = True,
) -> Recovery:
    """Compute the recovery ``options.kind`` of ``model`` (loaded, dense, all experts) under ``mask``.

    ``windows``: {corpus: token windows} (default: :func:`calibration_set` with ``tokenizer``); ``teacher``:
    precomputed :class:`~moeprune.recovery.router_kd.TeacherTargets` for those windows (a grid reuses them
    for every mask). The model is left exactly as it was."""
    if not options.active:
        return Recovery({}, {"kind": NONE, "mask": mask.identity})
    options.require_resolved()
    check_prunes([options.kind], mask.kept_per_layer, mask.num_experts, "the mask")
    if windows is None:
        if tokenizer is None:
            tokenizer = load_tokenizer(model_name(model))
        windows = calibration_set(tokenizer, recovery_corpora(options, mask), options)
    record: dict[str, Any] = {
        "kind": options.kind,
        "mask": mask.identity,  # what the delta was trained for: apply refuses it for any other mask
        "settings": options.to_json(),
        "corpora": {name: list(w.shape) for name, w in windows.items()},
    }
    delta: dict[str, torch.Tensor] = {}
    if options.merge:
        check_mergeable(model)
        stacked = torch.cat(list(windows.values()))
        delta, record["merge"] = merge_delta(model, mask, stacked, batch_size=options.batch_size,
                                             max_tokens=options.merge_tokens, progress=progress)
    if options.router_kd:
        targets = teacher if teacher is not None else teacher_targets(model, windows, options, progress)
        with masked(model, mask):
            apply_delta(model, delta)
            trained, record["router_kd"] = train_routers(model, targets, options, progress)
        delta = {**delta, **trained}
    diverged = sorted(name for name, t in delta.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if diverged:  # never exported, evaluated or cached: blamed on the settings that made it
        raise MoePruneError(
            f"Recovery {options.kind} diverged: {diverged[0]} holds NaN or infinite values after training. Lower "
            f"--recover-lr (now {options.lr}) or use fewer --recover-epochs."
        )
    return Recovery(delta, record)


def check_mergeable(model: nn.Module) -> None:
    """merge_supported's reason as an error (the one line names the layout that cannot merge)."""
    reason = merge_supported(model)
    if reason is not None:
        raise MoePruneError(reason)


def check_mergeable_config(config: Any, trust_remote_code: bool = False) -> None:
    """Before any weights load: build the model on the meta device from ``config`` and ask merge_supported.
    A config that cannot be built that way is checked after loading instead (recover() asks again)."""
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 (any builder failure: fall back to the check after loading)
        log.debug("merge check deferred until the model loads: %s", err)
        return
    check_mergeable(skeleton)
