"""The layer-major runner: every stage that runs a model over many batches, one decoder layer at a time.

1. Embeddings for every batch: the model's own forward runs with its decoder layers swapped for stubs that record
   each layer's inputs (hidden states, attention mask, position embeddings: per layer, so models that alternate
   sliding-window and full attention get each layer's own mask) and pass the hidden states through. The hidden
   states are parked on the CPU (:mod:`moeprune.streaming.parked`: in memory up to a budget, the rest in a
   temporary file inside the verb's output folder, removed when the run ends, fails or is interrupted).
2. Each decoder layer in turn is loaded (:mod:`moeprune.streaming.layers`: moved to the device, or read from disk
   while the previous one computes), run on every parked batch, and freed.
3. The head, when a callback wants logits: the model's own forward again, its layers swapped for stubs that return
   the parked final hidden states, so the final norm, head and any logit scaling are the model's own.

What a stage measures is a callback: profiling installs its recorder on the MoE layers (they run in step 2),
perplexity and lm-eval take the logits of step 3 (``on_logits``), the expert-sparsity capture reads each layer's
inputs (``on_layer_inputs``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.streaming.layers import StreamStats, detached_layers
from moeprune.streaming.memory import release_free_heap
from moeprune.streaming.parked import ParkedStore, default_budget

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]  # model inputs: input_ids [B, L] and, optionally, attention_mask [B, L]


class LayerPlace(Protocol):
    model: nn.Module
    layers: nn.ModuleList
    device: torch.device
    stats: StreamStats

    def load_outside(self) -> None: ...
    def free_outside(self) -> None: ...
    def load(self, index: int) -> nn.Module: ...
    def prefetch(self, index: int) -> None: ...
    def free(self, index: int) -> None: ...
    def close(self) -> None: ...


@dataclass
class RunReport:
    """Wall seconds per phase and what was read (for the log and the benchmark)."""

    embed_s: float = 0.0
    layers_s: float = 0.0
    head_s: float = 0.0
    stats: StreamStats | None = None
    spilled_bytes: int = 0  # parked activations written to the spill file (its size), 0 when all fit the budget
    parked: str = ""  # where the parked activations were kept (ParkedStore.describe)

    def describe(self) -> str:
        read = f"; {self.stats.describe()}" if self.stats is not None and self.stats.bytes_read else ""
        parked = f"; {self.parked}" if self.parked else ""
        return (f"embeddings {self.embed_s:.1f} s, decoder layers {self.layers_s:.1f} s, head {self.head_s:.1f} s"
                f"{read}{parked}")


class _Stub(nn.Module):
    """Stands in for a decoder layer; attributes the model's loop reads off its layers (``attention_type``,
    ``block_type``, ...) come from the real layer, which is not registered as a submodule."""

    def __init__(self, real: nn.Module | None) -> None:
        super().__init__()
        self.__dict__["_real"] = real

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            real = self.__dict__.get("_real")
            if real is None:
                raise
            return getattr(real, name)


class _Record(_Stub):
    """Stands in for decoder layer ``index`` while the embeddings run: records its inputs, passes hidden on."""

    def __init__(self, index: int, sink: list[tuple[tuple, dict]], real: nn.Module | None = None) -> None:
        super().__init__(real)
        self.index = index
        self.sink = sink

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not args and "hidden_states" in kwargs:  # called as layer(hidden_states=...): make it positional
            args = (kwargs.pop("hidden_states"),)
        self.sink.append((args, kwargs))
        return args[0]


class _Replay(_Stub):
    """Stands in for a decoder layer while the head runs: returns the parked final hidden states."""

    def __init__(self, real: nn.Module | None = None, hidden: list[torch.Tensor | None] | None = None) -> None:
        super().__init__(real)
        self.__dict__["_hidden"] = hidden if hidden is not None else [None]

    @property
    def hidden(self) -> torch.Tensor | None:
        return self.__dict__["_hidden"][0]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.__dict__["_hidden"][0]


@torch.inference_mode()
def run_layer_major(
    place: LayerPlace,
    batches: Sequence[Batch],
    *,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
    on_layer_inputs: Callable[[int, int, torch.Tensor], None] | None = None,
    on_layer_done: Callable[[int, nn.Module], None] | None = None,
    progress: bool = True,
    desc: str = "layer by layer",
) -> RunReport:
    """Run ``batches`` through ``place.model`` layer-major; see the module docstring.

    ``on_layer_inputs(layer, batch, hidden)`` sees each decoder layer's input hidden states before the layer runs
    on that batch; ``on_layer_done(layer, module)`` is called once the layer has run on every batch, before it is
    freed; ``on_logits(batch, logits)`` sees each batch's logits (then the head runs). Forward hooks installed on
    the model's modules fire as in an ordinary forward pass.

    The parked hidden states stay in CPU memory up to :func:`parked_budget`; the batches beyond it are parked in
    a temporary file (:class:`~moeprune.streaming.parked.ParkedStore`), removed on return,
    on an exception and on Ctrl-C.
    """
    model, layers = place.model, place.layers
    place.stats = StreamStats()  # this run's reads only (a reader serves one run per corpus, chunk, ...)
    report = RunReport(stats=place.stats)
    start = time.perf_counter()
    parked = ParkedStore(parked_budget(place))
    try:
        place.load_outside()
        kwargs = _embed(model, layers, batches, place.device, parked)
        if on_logits is None:
            place.free_outside()
        report.embed_s = time.perf_counter() - start

        start = time.perf_counter()
        bar = tqdm(total=len(layers) * len(batches), desc=desc, unit="batch", disable=not progress)
        for index in range(len(layers)):
            layer = place.load(index)
            place.prefetch(index + 1)
            for b in range(len(batches)):
                hidden = parked[b].to(place.device)
                if on_layer_inputs is not None:
                    on_layer_inputs(index, b, hidden)
                output = layer(hidden, **_to(kwargs[b][index], place.device))
                parked[b] = (output[0] if isinstance(output, tuple) else output).to("cpu")
                bar.update(1)
            if on_layer_done is not None:
                on_layer_done(index, layer)
            place.free(index)
            release_free_heap()  # or the heap keeps each layer's freed scratch memory, fragmented
        bar.close()
        report.layers_s = time.perf_counter() - start

        if on_logits is not None:
            start = time.perf_counter()
            _head(place, batches, parked, on_logits)
            place.free_outside()
            report.head_s = time.perf_counter() - start
        report.spilled_bytes, report.parked = parked.spilled_bytes, parked.describe()
    finally:
        parked.close()  # the spill file too, whatever ended the run
        place.close()
    log.info("%s: %s", desc, report.describe())
    return report


def parked_budget(place: LayerPlace) -> int:
    """The default budget of parked activations in memory: ``MOEPRUNE_PARKED_BYTES``, else a fraction of the
    memory available less the two decoder layers a streamed run materializes (one read ahead) and its embeddings
    and head (a run whose weights sit in memory has counted them already)."""
    layer_bytes = getattr(place, "layer_bytes", None)
    if layer_bytes is None or not len(place.layers):
        return default_budget()
    return default_budget(max(layer_bytes(i) for i in range(len(place.layers))), place.outside_bytes())


def _embed(model: nn.Module, layers: nn.ModuleList, batches: Sequence[Batch], device: torch.device,
           parked: ParkedStore) -> list[list[dict]]:
    """Each batch's hidden states entering layer 0 into ``parked``; each layer's other inputs per batch (kept in
    memory: position embeddings and masks, one tensor shared by the layers)."""
    kwargs: list[list[dict]] = []
    for b, batch in enumerate(batches):
        sink: list[tuple[tuple, dict]] = []
        stubs = nn.ModuleList([_Record(i, sink, layers[i]) for i in range(len(layers))])
        with detached_layers(model, layers, stubs):
            inputs = _inputs(batch, device)
            try:
                model.base_model(**inputs, use_cache=False)
            except (ValueError, TypeError) as err:  # e.g. `hidden, residual = layer(...)`: state beyond the hidden
                raise MoePruneError(
                    f"{type(model).__name__}'s decoder layers hand the next layer more than their hidden states "
                    f"({err}); it cannot run layer by layer: run it with --no-stream on a machine that holds it."
                ) from err
        if len(sink) != len(layers):
            raise MoePruneError(f"The model called {len(sink)} of its {len(layers)} decoder layers in its forward "
                                "pass; it cannot run layer by layer (run it with --no-stream).")
        first = sink[0][0][0]
        for args, _ in sink[1:]:
            if args[0].shape != first.shape:
                raise MoePruneError("The model's decoder layers do not hand their hidden states straight to the "
                                    "next layer; it cannot run layer by layer (run it with --no-stream).")
        if any(len(args) > 1 for args, _ in sink):
            raise MoePruneError("The model passes its decoder layers more than the hidden states positionally; it "
                                "cannot run layer by layer (run it with --no-stream).")
        memo: dict[int, Any] = {}
        parked[b] = first
        kwargs.append([_to(kw, "cpu", memo) for _, kw in sink])
    return kwargs


def _head(place: LayerPlace, batches: Sequence[Batch], parked: ParkedStore,
          on_logits: Callable[[int, torch.Tensor], None]) -> None:
    hidden: list[torch.Tensor | None] = [None]  # shared by every stub: the batch's final hidden states
    stubs = nn.ModuleList([_Replay(layer, hidden) for layer in place.layers])
    with detached_layers(place.model, place.layers, stubs):
        for b, batch in enumerate(batches):
            hidden[0] = parked[b].to(place.device)
            output = place.model(**_inputs(batch, place.device), use_cache=False)
            on_logits(b, output.logits if hasattr(output, "logits") else output[0])
    hidden[0] = None


def _inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask.to(device)}


def _to(value: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """``value`` with every tensor on ``device``; a tensor shared by several layers' inputs is moved once."""
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, tuple):
        return tuple(_to(v, device, memo) for v in value)
    if isinstance(value, list):
        return [_to(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value
