"""Where a model's decoder layers live while a layer-major run goes over them.

:class:`ResidentLayers`: the weights sit in CPU memory; each layer is moved to the compute device for its turn
and back afterwards (``profile --sequential``).

:class:`DiskLayers`: the weights stay on disk. The model is a skeleton on the meta device; the parts outside the
decoder layers (embeddings, final norm, head) and one decoder layer at a time are materialized on the compute
device from the checkpoint's safetensors shards through transformers' own loading path
(``convert_and_load_state_dict_in_model`` with the model's weight conversions: fused experts, renames, dtype
casts), and put back on the meta device when their turn is over. The next layer is read in a background thread
while the current one computes, so at most two decoder layers are materialized at once.

A quantized checkpoint (``quantization_config``) would be materialized through the model's quantizer: pass it as
``hf_quantizer`` (transformers' ``AutoHfQuantizer``); its per-layer dequantization is the quantized-checkpoint
issue's work, and :func:`check_streamable` refuses such checkpoints until then.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from moeprune.arch.view import decoder_layers
from moeprune.errors import MoePruneError
from moeprune.models import register as register_ports
from moeprune.streaming.checkpoint import Checkpoint
from moeprune.streaming.memory import Memory, available_memory, gib

log = logging.getLogger(__name__)


@dataclass
class StreamStats:
    """What a run read and how the time went: reads run in the background while layers compute."""

    bytes_read: int = 0
    read_s: float = 0.0  # seconds spent reading and converting weights (in the read-ahead thread, mostly)
    wait_s: float = 0.0  # seconds the compute waited for a read to finish
    layers_read: int = 0

    def describe(self) -> str:
        return (f"read {gib(self.bytes_read)} in {self.layers_read} layer loads ({self.read_s:.1f} s of reads, "
                f"{self.wait_s:.1f} s of them waited for)")


class ResidentLayers:
    """Weights in CPU memory; each decoder layer visits the compute device for its turn."""

    def __init__(self, model: nn.Module, device: str | torch.device) -> None:
        self.model = model
        self.device = torch.device(device)
        self.layers = decoder_layers(model)
        self.stats = StreamStats()

    def load_outside(self) -> None:
        with detached_layers(self.model, self.layers):
            self.model.to(self.device)

    def free_outside(self) -> None:
        """Embeddings and head stay where they are: they fit (the rest of the model sits in CPU memory)."""

    def load(self, index: int) -> nn.Module:
        return self.layers[index].to(self.device)

    def prefetch(self, index: int) -> None:
        """Nothing to read ahead: the weights are in memory."""

    def free(self, index: int) -> None:
        if self.device.type != "cpu":
            self.layers[index].to("cpu")

    def close(self) -> None:
        """Nothing to release."""


class DiskLayers:
    """A meta skeleton of the model whose weights are read from ``folder``'s safetensors shards layer by layer."""

    def __init__(self, folder: str | Path, config: Any, dtype: torch.dtype, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False, hf_quantizer: Any = None) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.modeling_utils import LoadStateDictConfig

        register_ports()
        self.folder = Path(folder)
        self.checkpoint = Checkpoint.open(self.folder)
        self.device = torch.device(device)
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        with init_empty_weights():  # parameters on meta; buffers (rotary tables) computed on the CPU as usual
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.eval()
        model.name_or_path = str(self.folder)
        if hf_quantizer is not None:  # modules replaced by their quantized forms (weights untouched)
            hf_quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": str(self.device)},
                                          checkpoint_files=[str(self.folder / s)
                                                            for s in sorted(set(self.checkpoint.shard_of.values()))])
        self.model = model
        self.layers = decoder_layers(model)
        self.prefix = _qualified_name(model, self.layers)
        if self.device.type != "cpu":
            self.model.to(self.device)  # buffers only: the parameters are on the meta device
        self.load_config = LoadStateDictConfig(
            pretrained_model_name_or_path=str(self.folder),
            device_map={"": self.device},
            dtype=dtype,
            dtype_plan=model._get_dtype_plan(dtype),
            hf_quantizer=hf_quantizer,
            weight_mapping=get_model_conversion_mapping(model, None, hf_quantizer),
        )
        self.groups, self.outside = self._group_keys()
        self.stats = StreamStats()
        # Called with (index, layer) right after a layer is read, e.g. to apply a mask in memory; each returns the
        # undo (or None), called before the layer is freed.
        self.layer_hooks: list[Callable[[int, nn.Module], Callable[[], None] | None]] = []
        self._undo: dict[int, list[Callable[[], None]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeprune-read-ahead")
        self._ahead: tuple[int, Future] | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    # ---------------------------------------------------------------------------------- sizes
    def layer_bytes(self, index: int) -> int:
        """Bytes of decoder layer ``index`` in the compute dtype."""
        return _module_bytes(self.layers[index], self.dtype)

    def outside_bytes(self) -> int:
        """Bytes of everything outside the decoder layers (embeddings, norm, head; tied weights once)."""
        seen = {id(p) for layer in self.layers for p in layer.parameters()}
        params = {id(p): p for p in self.model.parameters() if id(p) not in seen}
        size = torch.tensor([], dtype=self.dtype).element_size()
        return sum(p.numel() * size for p in params.values())

    def check_fits(self, memory: Memory | None = None, read_ahead: bool = True) -> None:
        """Refuse, before any weight is read, when the largest layer (and the one read ahead) with the embeddings
        and head cannot fit in the memory available to this process."""
        if self.device.type != "cpu":
            return  # host memory holds only what is being read: a layer's tensors on their way to the device
        memory = memory or available_memory()
        largest = max(self.layer_bytes(i) for i in range(len(self.layers)))
        need = (2 if read_ahead else 1) * largest + self.outside_bytes()
        if need > memory.available:
            both = "two of them (one read ahead)" if read_ahead else "it"
            raise MoePruneError(
                f"Too little memory to stream {self.folder}: one decoder layer takes {gib(largest)} in "
                f"{str(self.dtype).removeprefix('torch.')}, and {both} with the embeddings and head "
                f"({gib(self.outside_bytes())}) need {gib(need)}, but only "
                f"{memory.describe()}. Run with more memory, or on a GPU (--device cuda); nothing was read."
            )

    # ---------------------------------------------------------------------------------- the layer protocol
    def load_outside(self) -> None:
        self._materialize(self.outside)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        meta = [name for name, p in _outside_parameters(self.model, self.layers) if p.is_meta]
        if meta:
            raise MoePruneError(f"{len(meta)} weight(s) outside the decoder layers are missing from {self.folder} "
                                f"(e.g. {meta[0]}); re-download or re-save the checkpoint.")

    def free_outside(self) -> None:
        with detached_layers(self.model, self.layers):
            _to_meta(self.model)

    def load(self, index: int) -> nn.Module:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            start = time.perf_counter()
            ahead[1].result()
            self.stats.wait_s += time.perf_counter() - start
        else:
            if ahead is not None:
                ahead[1].result()
                self.free(ahead[0])
            start = time.perf_counter()
            self._load_layer(index)
            self.stats.wait_s += time.perf_counter() - start
        return self.layers[index]

    def prefetch(self, index: int) -> None:
        if 0 <= index < len(self.layers) and self._ahead is None:
            self._ahead = (index, self._pool.submit(self._load_layer, index))

    def free(self, index: int) -> None:
        for undo in reversed(self._undo.pop(index, [])):
            undo()
        _to_meta(self.layers[index])

    def close(self) -> None:
        """Wait for a read still running ahead and free its layer (the reader thread stays for the next run)."""
        if self._ahead is not None:
            try:
                self._ahead[1].result()
            except Exception:  # noqa: BLE001 - the run is over (or failing already); the layer goes back to meta
                pass
            self.free(self._ahead[0])
            self._ahead = None

    # ---------------------------------------------------------------------------------- reading
    def _load_layer(self, index: int) -> None:
        self._materialize(self.groups[index])
        meta = [name for name, p in self.layers[index].named_parameters() if p.is_meta]
        if meta:
            raise MoePruneError(f"Decoder layer {index}: {len(meta)} weight(s) are missing from {self.folder} (e.g. "
                                f"{self.prefix}.{index}.{meta[0]}); re-download or re-save the checkpoint.")
        undo = [hook(index, self.layers[index]) for hook in self.layer_hooks]
        self._undo[index] = [u for u in undo if u is not None]
        self.stats.layers_read += 1

    def _materialize(self, keys: list[str]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.utils import logging as hf_logging

        start = time.perf_counter()
        self.checkpoint.will_need(keys)  # the kernel reads the layer's bytes now, whether or not they are copied
        handles = {}
        try:
            state = {}
            for key in keys:
                shard = self.checkpoint.shard_of[key]
                if shard not in handles:
                    handles[shard] = safe_open(str(self.folder / shard), framework="pt", device="cpu")
                state[key] = handles[shard].get_slice(key)
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # one "Loading weights" bar per layer would drown the run's own
            try:
                info, _ = convert_and_load_state_dict_in_model(self.model, state, self.load_config)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        finally:
            handles.clear()
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys, key=str)[0]
            raise MoePruneError(f"{self.folder}: the tensor for {name} has shape {tuple(got)}, but the config makes "
                                f"it {tuple(want)}; fix config.json or re-download the checkpoint.")
        self.stats.bytes_read += self.checkpoint.bytes_of(keys)
        self.stats.read_s += time.perf_counter() - start

    def _group_keys(self) -> tuple[dict[int, list[str]], list[str]]:
        """Checkpoint keys per decoder layer (by the name transformers' renamings give them) and the rest."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = self.load_config.weight_mapping or []
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta_state = self.model.state_dict()
        pattern = re.compile(re.escape(self.prefix) + r"\.(\d+)\.")
        groups: dict[int, list[str]] = {i: [] for i in range(len(self.layers))}
        outside: list[str] = []
        for key in self.checkpoint.shard_of:
            renamed, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta_state)
            if renamed not in meta_state and key in meta_state:
                renamed = key
            found = pattern.match(renamed)
            if found is None:
                outside.append(key)
            elif int(found.group(1)) in groups:
                groups[int(found.group(1))].append(key)
            # else: a layer past num_hidden_layers (e.g. DeepSeek-V3's multi-token-prediction layer): unused
        empty = [i for i, keys in groups.items() if not keys]
        if empty:
            raise MoePruneError(f"{self.folder} holds no weights for decoder layer(s) {empty[:5]} of the "
                                f"{len(self.layers)} its config describes; re-download the checkpoint.")
        return groups, outside


@contextmanager
def detached_layers(model: nn.Module, layers: nn.ModuleList, replacement: nn.ModuleList | None = None):
    """The model with its decoder-layer list swapped for ``replacement`` (empty by default) for the block.

    The list is swapped under its own name (``layers``, DBRX's ``blocks``, ...), so that nothing else is
    registered under a second name."""
    holder, name = _holder(model, layers)
    setattr(holder, name, replacement if replacement is not None else nn.ModuleList())
    try:
        yield model
    finally:
        setattr(holder, name, layers)


def _holder(model: nn.Module, layers: nn.ModuleList) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name, child in module.named_children():
            if child is layers:
                return module, name
    raise MoePruneError("The decoder layers are not a child module of the model; run it in memory (--no-stream).")


def _qualified_name(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise MoePruneError("The decoder layers are not a child module of the model; run it in memory (--no-stream).")


def _outside_parameters(model: nn.Module, layers: nn.ModuleList) -> list[tuple[str, nn.Parameter]]:
    inside = {id(p) for p in layers.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in inside]


def _to_meta(module: nn.Module) -> None:
    """Every parameter of ``module`` back on the meta device (same shape and dtype): its memory is released.

    Buffers stay (rotary tables, small per-expert vectors): they are not weights, and some are computed, not read."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def _module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in module.parameters())
