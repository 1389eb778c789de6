"""Layer-sequential profiling, for models larger than the accelerator.

The weights stay in CPU memory. Every calibration batch is first run up to the first decoder layer
(embeddings and rotary tables on the device), and its hidden states are parked on the CPU. Then
each decoder layer in turn is moved onto the device, run on every parked batch (observed like the
plain path), and moved back, so device memory peaks at about one decoder layer plus one batch of
activations. The statistics are the same as the plain path's: same layers, same tokens, same order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.arch.view import decoder_layers, moe_layers
from moeprune.errors import MoePruneError
from moeprune.profiling.instrument import StatsRecorder
from moeprune.profiling.stats import ExpertStats


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are known."""


@torch.inference_mode()
def profile_windows_sequential(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    meta: dict[str, Any],
    device: str | torch.device,
    progress: bool = True,
    desc: str = "profile (sequential)",
) -> ExpertStats:
    """Sums over ``windows [S, L]``, running one decoder layer at a time on ``device``."""
    layers = decoder_layers(model)
    moe = moe_layers(model)
    recorder = StatsRecorder(moe, device=device)
    parked = _first_layer_inputs(model, layers, torch.split(windows, batch_size), device)
    bar = tqdm(total=len(layers) * len(parked), desc=desc, unit="batch", disable=not progress)
    with recorder.installed():
        for layer in layers:
            layer.to(device)
            for i, (args, kwargs) in enumerate(parked):
                output = layer(*_to(args, device), **_to(kwargs, device))
                hidden = output[0] if isinstance(output, tuple) else output
                parked[i] = ((hidden.to("cpu"), *args[1:]), kwargs)
                bar.update(1)
            layer.to("cpu")
    bar.close()
    return recorder.take({**meta, "sequential": True})


def _first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches, device) -> list[tuple[tuple, dict]]:
    """Each batch's positional and keyword inputs to decoder layer 0, hidden states parked on the CPU."""
    _onload_all_but_layers(model, layers, device)
    captured: list[tuple[tuple, dict]] = []

    def capture(module, args, kwargs):
        captured.append((_to(args, "cpu"), _to(kwargs, "cpu")))
        raise _StopForward

    hook = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            batch = batch.to(device)
            try:
                model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            except _StopForward:
                continue
            raise MoePruneError("The model finished a forward pass without calling its first decoder layer.")
    finally:
        hook.remove()
    if not captured[0][0] and "hidden_states" in captured[0][1]:
        # Called as layer(hidden_states=...): make the hidden states positional so they can be swapped.
        captured = [((kw.pop("hidden_states"),), kw) for _, kw in captured]
    return captured


def _onload_all_but_layers(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move embeddings, norms, rotary tables and the head to ``device``; decoder layers stay on the CPU.

    The list is swapped out under its own name (``layers``, DBRX's ``blocks``, ...): setting ``base.layers``
    on a model whose list is called otherwise would register the blocks under a second name and move them."""
    holder, name = _holder(model, layers)
    setattr(holder, name, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(holder, name, layers)


def _holder(model: nn.Module, layers: nn.ModuleList) -> tuple[nn.Module, str]:
    """The module that holds ``layers`` as a child, and the child's name."""
    for module in model.modules():
        for name, child in module.named_children():
            if child is layers:
                return module, name
    raise MoePruneError("The decoder layers are not a child module of the model; profile without --sequential.")


def _to(value: Any, device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
