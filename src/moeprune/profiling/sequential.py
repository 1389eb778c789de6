"""Layer-major profiling, for models larger than the accelerator or than memory.

The calibration batches run through the shared layer-major runner (:mod:`moeprune.streaming.runner`): every batch
up to the first decoder layer, its hidden states parked on the CPU; then each decoder layer in turn, loaded (moved
from CPU memory to the device for ``--sequential``, read from the checkpoint's shards for ``--stream``), run on
every parked batch while the recorder observes it like the plain path, and freed. Device memory peaks at about one
decoder layer plus one batch of activations; streamed, host memory at two decoder layers (one read ahead) plus the
parked activations. The statistics are the plain path's: same layers, same tokens, same order.

Under torchrun each rank takes every world-size-th batch and streams its own layers over them; the sums are
all-reduced (by the caller) as on the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeprune.arch.view import moe_layers
from moeprune.profiling.instrument import StatsRecorder
from moeprune.profiling.stats import ExpertStats
from moeprune.streaming.layers import DiskLayers, ResidentLayers
from moeprune.streaming.runner import LayerPlace, run_layer_major


def profile_windows_sequential(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    meta: dict[str, Any],
    device: str | torch.device,
    progress: bool = True,
    desc: str = "profile (sequential)",
) -> ExpertStats:
    """Sums over ``windows [S, L]``, the weights in CPU memory, one decoder layer at a time on ``device``."""
    return profile_windows_layer_major(ResidentLayers(model, device), windows, batch_size, meta, progress=progress,
                                       desc=desc)


@dataclass(frozen=True)
class Share:
    """This process's share of the calibration batches: every ``world``-th batch from ``rank`` (one process: all)."""

    rank: int = 0
    world: int = 1

    def takes(self, step: int) -> bool:
        return step % self.world == self.rank


def profile_windows_layer_major(
    place: LayerPlace | DiskLayers,
    windows: torch.Tensor,
    batch_size: int,
    meta: dict[str, Any],
    *,
    share: Share = Share(),
    progress: bool = True,
    desc: str = "profile (layer by layer)",
) -> ExpertStats:
    """Sums over this process's ``share`` of ``windows [S, L]`` (under torchrun, its rank's batches), layer-major."""
    recorder = StatsRecorder(moe_layers(place.model), device=place.device)
    batches = [{"input_ids": b} for step, b in enumerate(torch.split(windows, batch_size)) if share.takes(step)]
    with recorder.installed():
        if batches:
            run_layer_major(place, batches, progress=progress, desc=desc)
    return recorder.take({**meta, "sequential": True})
