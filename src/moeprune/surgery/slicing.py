"""Physical expert pruning: slice the routed experts and router rows a mask keeps, in place.

Kept experts are renumbered 0..K-1 in sorted original-id order. For the router that is the same as
setting the removed experts' router logits to -inf (see docs/apply.md), which is why an in-memory
masked model and the exported checkpoint give equal logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moeprune.arch.adapters import HASH_TABLES, NUM_EXPERTS_KEYS, config_value, routing_meta, set_config_value
from moeprune.arch.view import MoELayer, moe_layers, top_k_of
from moeprune.errors import MoePruneError
from moeprune.loading import model_name
from moeprune.planning.fit import check_mask_routable as check_routable_by_config
from moeprune.planning.mask import ExpertMask
from moeprune.streaming.layers import DiskLayers

# Module attributes that cache the routed-expert count (matched by name, never by value alone, so that
# e.g. a hidden size that happens to equal N is left alone).
EXPERT_COUNT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "n_experts",
                      "num_router_classes", "total_experts", "num_routed_experts")


def slice_moe_layer(layer: MoELayer, kept: list[int]) -> None:
    """Keep only the experts ``kept`` (original ids) of one MoE layer, renumbered 0..K-1, in place.

    Besides the experts and the router rows, every per-expert vector of the block is sliced wherever it
    sits (``gate.e_score_correction_bias``, ``mlp.e_score_correction_bias``, ``feed_forward.expert_bias``,
    ``gate.moe_statics.e_score_correction_bias``, ...); a larger per-expert tensor outside the experts and
    the router is refused rather than left unsliced.
    """
    num_experts = layer.num_experts
    ids = _checked_ids(kept, num_experts, layer.index)
    if layer.spec.layout == "modulelist":
        new_experts = nn.ModuleList([layer.experts[i] for i in ids])
        setattr(layer.block, layer.spec.experts_attr, new_experts)
        layer.experts = new_experts
    # Router rows past N (zero-compute, shared or "no expert" columns) are not prunable and stay last.
    rows = layer.router_rows
    extended = ids + list(range(num_experts, rows))
    if layer.spec.layout == "flat":
        for module in layer.experts.modules():
            _slice_flat(module, num_experts, ids)
    elif layer.spec.layout != "modulelist":
        # Every per-expert tensor (gate_up_proj, down_proj and any [E, ...] bias) has the expert on dim 0, in
        # the experts module or its submodules (Ergo's post_expert_norm.weight [E, H]); LongCat pads gate_up_proj
        # to the router's rows.
        for module in layer.experts.modules():
            _slice_rows(module, {num_experts: ids, rows: extended})
    # Inkling's router has rows for its shared experts but a correction bias for the routed ones only.
    _slice_rows(layer.router, {num_experts: ids, rows: extended})
    _slice_block_vectors(layer, num_experts, ids, rows)
    _remap_hash_tables(layer, num_experts, ids)
    for module in _layer_modules(layer):
        _set_expert_counts(module, num_experts, len(ids), rows)


def _hash_tables(layer: MoELayer) -> list[tuple[nn.Module, str]]:
    return [(m, name) for m in _layer_modules(layer) for name in HASH_TABLES if m._buffers.get(name) is not None]


def _remap_hash_tables(layer: MoELayer, num_experts: int, ids: list[int]) -> None:
    """Renumber a hash-routed layer's token -> expert table to the kept experts' new ids."""
    for module, name in _hash_tables(layer):
        table = module._buffers[name]
        position = torch.full((num_experts,), -1, dtype=table.dtype, device=table.device)
        position[torch.tensor(ids, device=table.device)] = torch.arange(len(ids), dtype=table.dtype,
                                                                         device=table.device)
        module._buffers[name] = position[table]


def _check_hash_tables(model: nn.Module, mask: ExpertMask) -> None:
    """A hash-routed layer sends each token to fixed experts: none of them may be removed."""
    for layer in moe_layers(model):
        _check_hash_tables_of(layer, mask)


def _check_hash_tables_of(layer: MoELayer, mask: ExpertMask) -> None:
    for module, name in _hash_tables(layer):
        if module._buffers[name].is_meta:
            continue
        used = set(module._buffers[name].unique().tolist())
        removed = sorted(used - set(mask.kept(layer.index)))
        if removed:
            raise MoePruneError(
                f"Layer {layer.index} routes tokens by a fixed token -> expert table ({name}) that sends "
                f"tokens to experts {removed}, which the mask removes; a hash-routed layer cannot lose an "
                "expert that its table uses. Keep every expert such a table uses, or prune a model "
                "without hash-routed layers."
            )


def _layer_modules(layer: MoELayer) -> list[nn.Module]:
    """The block's modules and the router and experts (which may sit outside the block)."""
    seen: dict[int, nn.Module] = {}
    for module in (*layer.block.modules(), *layer.router.modules(), *layer.experts.modules()):
        seen.setdefault(id(module), module)
    return list(seen.values())


def _slice_block_vectors(layer: MoELayer, num_experts: int, ids: list[int], rows: int) -> None:
    """Slice the block's per-expert vectors outside the router and experts; refuse what cannot be placed.

    A vector has N entries (one per routed expert) or, next to a router with extra rows, one per router row.
    """
    # The router's own tensors are sliced already; its submodules (e.g. ERNIE's gate.moe_statics) are not.
    handled = {id(layer.router), *(id(m) for m in layer.experts.modules())}
    scope = layer.vector_scope or layer.block
    for name, module in scope.named_modules():
        if id(module) in handled or "shared" in name:
            continue
        for tensor_name, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is None or tensor.dim() == 0:
                continue
            if tensor.numel() == num_experts and num_experts in tensor.shape:  # [N], or [1, N] (ERNIE)
                _slice_vector(module, tensor_name, tensor, ids)
            elif rows > num_experts and tensor.numel() == rows and rows in tensor.shape:
                _slice_vector(module, tensor_name, tensor, ids + list(range(num_experts, rows)))
            elif num_experts not in tensor.shape:
                continue
            elif tensor.shape[0] == num_experts:
                where = ".".join(p for p in (name, tensor_name) if p)
                raise MoePruneError(
                    f"Layer {layer.index}: {where} {tuple(tensor.shape)} looks per-expert (first dimension "
                    f"{num_experts}) but is neither the router nor the experts, so moeprune cannot slice it "
                    "safely; add an ArchSpec row for this architecture in moeprune.arch.adapters."
                )


def _slice_vector(module: nn.Module, name: str, tensor: torch.Tensor, ids: list[int]) -> None:
    """Keep the entries ``ids`` of a per-expert vector (any shape with N entries along one dimension)."""
    kept = tensor.detach().index_select(tensor.shape.index(tensor.numel()), torch.tensor(ids, device=tensor.device))
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(kept, requires_grad=tensor.requires_grad)
    else:
        module._buffers[name] = kept


def apply_mask(model: nn.Module, mask: ExpertMask) -> nn.Module:
    """Prune ``model`` in place to the experts ``mask`` keeps, after checking the mask fits it; returns it."""
    layers = moe_layers(model)
    num_experts = _common_num_experts(layers)
    mask.check_model([layer.index for layer in layers], num_experts, model_name(model))
    check_mask_routable(model, mask)
    for layer in layers:
        slice_moe_layer(layer, mask.kept(layer.index))
    _set_config_count(model.config, layers[0].spec.num_experts_key, num_experts, mask.kept_per_layer)
    return model


def check_mask_routable(model: nn.Module, mask: ExpertMask) -> None:
    """The router must still find top-k experts, grouped routers need the same count in every group (the
    same check as for a mask read before loading, see validation), and hash tables must route to kept ones."""
    check_routable_by_config(mask, {**routing_meta(model.config), "top_k": top_k_of(model)})
    _check_hash_tables(model, mask)


@contextmanager
def masked(model: nn.Module, mask: ExpertMask) -> Iterator[nn.Module]:
    """Apply ``mask`` in memory for the ``with`` block, then put back the original experts, router and config.

    Restoring reattaches the original Parameter, buffer and module objects (nothing is copied), so many
    masks can be evaluated on one loaded model and the model afterwards is exactly what it was.
    """
    layers = moe_layers(model)
    snapshots = [_Snapshot.take(m) for layer in layers for m in _layer_modules(layer)]
    restore_config = _config_snapshot(model, layers)
    try:
        apply_mask(model, mask)
        yield model
    finally:
        for snapshot in snapshots:
            snapshot.restore()
        restore_config()


@contextmanager
def masked_on_load(place: DiskLayers, mask: ExpertMask) -> Iterator[DiskLayers]:
    """:func:`masked` for a model streamed from disk: each MoE layer is sliced to the experts ``mask`` keeps as
    soon as it is read, and put back whole before it is freed; the config says K for the ``with`` block."""
    model = place.model
    layers = moe_layers(model)
    by_index = {layer.index: layer for layer in layers}
    num_experts = _common_num_experts(layers)
    mask.check_model(list(by_index), num_experts, model_name(model))
    check_routable_by_config(mask, {**routing_meta(model.config), "top_k": top_k_of(model)})

    def slice_on_load(index: int, _module: nn.Module) -> Any:
        layer = by_index.get(index)
        if layer is None:  # a dense layer
            return None
        _check_hash_tables_of(layer, mask)
        snapshots = [_Snapshot.take(m) for m in _layer_modules(layer)]
        slice_moe_layer(layer, mask.kept(index))
        return lambda: [snapshot.restore() for snapshot in snapshots]

    restore_config = _config_snapshot(model, layers)
    place.layer_hooks.append(slice_on_load)
    try:
        _set_config_count(model.config, layers[0].spec.num_experts_key, num_experts, mask.kept_per_layer)
        yield place
    finally:
        place.layer_hooks.remove(slice_on_load)
        restore_config()


def _config_snapshot(model: nn.Module, layers: list[MoELayer]) -> Any:
    """A function that puts the config's expert-count keys back as they are now."""
    config_state = {k: v for k, v in vars(model.config).items() if k in NUM_EXPERTS_KEYS}
    key = layers[0].spec.num_experts_key
    nested = config_value(model.config, key) if "." in key else None

    def restore() -> None:
        for alias in NUM_EXPERTS_KEYS:
            if alias in vars(model.config) and alias not in config_state:
                delattr(model.config, alias)
        for name, value in config_state.items():
            setattr(model.config, name, value)
        if nested is not None:
            set_config_value(model.config, key, nested)

    return restore


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class _Snapshot:
    """The tensors, submodules and expert-count attributes of one module, by reference."""

    module: nn.Module
    parameters: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def take(cls, module: nn.Module) -> _Snapshot:
        counts = {k: v for k, v in vars(module).items() if k in EXPERT_COUNT_ATTRS}
        return cls(module, dict(module._parameters), dict(module._buffers), dict(module._modules), counts)

    def restore(self) -> None:
        for live, saved in ((self.module._parameters, self.parameters), (self.module._buffers, self.buffers),
                            (self.module._modules, self.modules)):
            live.clear()
            live.update(saved)
        for key, value in self.counts.items():
            setattr(self.module, key, value)


def _checked_ids(kept: list[int], num_experts: int, layer: int) -> list[int]:
    ids = sorted(int(e) for e in kept)
    if len(set(ids)) != len(ids) or not ids or ids[0] < 0 or ids[-1] >= num_experts:
        raise MoePruneError(
            f"Layer {layer}: kept experts {ids} must be distinct ids in 0..{num_experts - 1} (at least one)."
        )
    return ids


def _slice_flat(module: nn.Module, num_experts: int, ids: list[int]) -> None:
    """DBRX: each expert owns a consecutive block of rows of the module's [N * I, H] matrices."""
    for name, param in list(module._parameters.items()):
        if param is None or param.dim() != 2 or param.shape[0] % num_experts:
            continue
        blocks = param.detach().view(num_experts, -1, param.shape[1])
        kept = blocks.index_select(0, torch.tensor(ids, device=param.device)).reshape(-1, param.shape[1])
        module._parameters[name] = nn.Parameter(kept, requires_grad=param.requires_grad)


def _slice_rows(module: nn.Module, kept_by_size: dict[int, list[int]]) -> None:
    """Slice each of the module's own tensors by the kept rows for its first dimension (N or router rows)."""
    sizes = {name: t.shape[0] for name, t in (*module._parameters.items(), *module._buffers.items())
             if t is not None and t.dim() > 0}
    for size, kept in kept_by_size.items():
        names = tuple(name for name, first in sizes.items() if first == size)
        if names:
            _slice_tensors(module, size, kept, names)


def _slice_tensors(module: nn.Module, num_experts: int, ids: list[int], names: tuple[str, ...] | None = None) \
        -> None:
    """Replace the module's own [num_experts, ...] tensors (all, or only ``names``) by their kept rows."""
    for name, param in list(module._parameters.items()):
        if _per_expert(name, param, num_experts, names):
            rows = param.detach().index_select(0, torch.tensor(ids, device=param.device))
            # A new Parameter, not an in-place edit, so masked() can reattach the untouched original.
            module._parameters[name] = nn.Parameter(rows, requires_grad=param.requires_grad)
    for name, buffer in list(module._buffers.items()):
        if _per_expert(name, buffer, num_experts, names):
            # Assigning into _buffers keeps the buffer's persistent/non-persistent registration.
            module._buffers[name] = buffer.index_select(0, torch.tensor(ids, device=buffer.device))


def _per_expert(name: str, tensor: torch.Tensor | None, num_experts: int,
                names: tuple[str, ...] | None) -> bool:
    if tensor is None or tensor.dim() == 0 or tensor.shape[0] != num_experts:
        return False
    return names is None or name in names


def _set_expert_counts(module: nn.Module, old: int, new: int, rows: int | None = None) -> None:
    """Cached counts of routed experts (== N) and of router rows (== N + extra rows) shrink by N - K."""
    for name in EXPERT_COUNT_ATTRS:
        value = vars(module).get(name)
        if value == old or (rows is not None and rows > old and value == rows):
            setattr(module, name, value - (old - new))


def _set_config_count(config: Any, key: str, old: int, new: int) -> None:
    """Write K to the spec's key, and to every alias still reading N, so that all readers agree."""
    set_config_value(config, key, new)
    for alias in NUM_EXPERTS_KEYS:
        if getattr(config, alias, None) == old:
            setattr(config, alias, new)


def _common_num_experts(layers: list[MoELayer]) -> int:
    counts = {layer.index: layer.num_experts for layer in layers}
    if len(set(counts.values())) != 1:
        raise MoePruneError(
            f"MoE layers hold different expert counts {counts}; a Hugging Face config stores one count for "
            "all layers, so this model is already inconsistent (was it pruned unevenly?)."
        )
    return next(iter(counts.values()))
