"""How a pruned checkpoint is written: apply's ``--overwrite``, ``--no-verify``, ``--force`` and ``--dequantize``, as
one frozen value that ``api.apply`` builds once and hands to whichever writer runs (in memory
:func:`~moeprune.surgery.export.export_pruned`, streamed :func:`~moeprune.surgery.export.export_streamed`, model-free
:func:`~moeprune.surgery.shards.prune_checkpoint_files`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportOptions:
    """``overwrite``: replace an existing output folder. ``verify``: check the written checkpoint against the
    pruned model before it replaces the output (in memory: reloaded weights and logits; streamed: layer by layer;
    model-free writes have no logits verification). ``force``: accept a mask planned for a model with another
    config hash (the streamed and model-free writers check the mask against the checkpoint themselves; for
    ``export_pruned`` its caller does, as ``api.apply``). ``dequantize``: write a quantized checkpoint dequantized,
    without ``quantization_config`` (in memory only: the streamed and model-free writers refuse it)."""

    overwrite: bool = False
    verify: bool = True
    force: bool = False
    dequantize: bool = False
