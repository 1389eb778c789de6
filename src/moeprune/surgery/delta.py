"""A recovery result: replacement tensors for a pruned model's MoE parameters, and its JSON record.

A delta maps parameter names of the *pruned* model (``surgery.slicing.apply_mask`` renumbered the kept
experts 0..K-1) to full replacement tensors. :func:`apply_delta` swaps in new Parameter objects (never an
in-place edit), so inside ``surgery.masked(model, mask)``, which snapshots and reattaches every module of
each MoE layer (block, router, experts, shared-expert gate), leaving the block restores the originals.
Only parameters of MoE-layer modules may be replaced: anything else is refused.

It lives in ``surgery`` (not ``recovery``, which makes deltas) because applying one is surgery's business:
the export writes it and the evaluation applies it inside the mask, and neither needs to know how it was made.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from moeprune.io import (
    SEAL_KEY,
    atomic_file,
    is_plain_name,
    make_dirs,
    read_bytes,
    read_json,
    seal_intact,
    sealed,
    write_json_atomic,
)

DELTA_FILE = "delta.safetensors"
RECORD_FILE = "recovery.json"
FORMAT = "moeprune.recovery/1"


@dataclass
class Recovery:
    """``delta``: {pruned-model parameter name: replacement tensor (CPU)}; ``record``: JSON-able account
    (kind, settings, seed, KL before/after per corpus, merge assignment)."""

    delta: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        """``folder/delta.safetensors`` then ``folder/recovery.json`` (the record last: it marks it done). The record
        is sealed and holds the delta file's SHA-256, so a cached recovery is checked whole before it is reused."""
        from safetensors.torch import save

        folder = make_dirs(folder)
        data = save({k: v.detach().cpu().contiguous() for k, v in self.delta.items()}, metadata={"format": FORMAT})
        with atomic_file(folder / DELTA_FILE) as handle:
            handle.write(data)
        record = {"format": FORMAT, **self.record, "delta_sha256": hashlib.sha256(data).hexdigest()}
        write_json_atomic(folder / RECORD_FILE, sealed(record))
        return folder

    @classmethod
    def load(cls, folder: str | Path, expected: dict[str, Any] | None = None) -> Recovery:
        """A saved recovery, checked before use: its record is moeprune's and unedited (format, seal, the schema
        below, and ``expected`` settings when given), its delta file is the one the record was written with
        (SHA-256), and every tensor is finite. Anything else is one line naming the folder (delete it)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        folder = Path(folder)
        fix = "delete it to recompute it"
        where = f"Recovery record in {folder}"
        # The project's one bounded, strict JSON reader (a cached record is a file like any other input).
        record = read_json(folder / RECORD_FILE, where, fix)
        problem = _record_problem(record, expected)
        if problem:
            raise MoePruneError(f"{where} {problem}; {fix}.")
        data = read_bytes(folder / DELTA_FILE, f"Recovery delta in {folder}")
        if hashlib.sha256(data).hexdigest() != record["delta_sha256"]:
            raise MoePruneError(f"Recovery delta in {folder} is not the one its record was written with; {fix}.")
        try:
            delta = load(data)
        except (OSError, SafetensorError) as err:
            raise MoePruneError(f"Recovery in {folder} is corrupt ({err}); {fix}.") from err
        bad = sorted(name for name, t in delta.items() if t.is_floating_point() and not torch.isfinite(t).all())
        if bad:
            raise MoePruneError(f"Recovery delta in {folder} holds NaN or infinite values ({bad[0]}); {fix}.")
        for key in ("format", "delta_sha256", SEAL_KEY):
            record.pop(key, None)
        return cls(delta, record)

    def check_mask(self, mask: Any) -> None:
        """A recovery is only valid for the mask it was made for (its router rows were trained for those kept
        experts): refuse it for any other, and one whose record names no mask."""
        made_for = self.record.get("mask")
        if made_for != mask.identity:
            what = "names no mask (made before recoveries recorded one)" if made_for is None else \
                f"was made for another mask ({made_for}, this one is {mask.identity})"
            raise MoePruneError(f"The recovery {what}; its router rows were trained for other experts. Compute "
                                "it for this mask (api.recover(model, mask, options)) or pass recover=options.")

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / RECORD_FILE).exists() and (Path(folder) / DELTA_FILE).exists()


def _record_problem(record: Any, expected: dict[str, Any] | None) -> str | None:
    """Why a saved recovery record cannot be reused, or None (schema: format, seal, kind, settings, corpora)."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    if record.get("format") != FORMAT:
        return f"has format {record.get('format')!r}, not {FORMAT!r}"
    if not seal_intact(record) or not isinstance(record.get("delta_sha256"), str):
        return "was edited since moeprune wrote it (its seal does not match)"
    if not is_plain_name(record.get("kind")) or not isinstance(record.get("settings", {}), dict):
        return "lacks its kind, or its settings are not an object"
    corpora = record.get("corpora", {})
    if not isinstance(corpora, dict) or not all(
        isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) for n in shape)
        for shape in corpora.values()
    ):
        return "has malformed corpora"
    if expected is not None and (record.get("settings") != expected or record["kind"] != expected.get("kind")):
        return "was made with other recovery settings"
    return None


def moe_parameter_owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """{full parameter name: (owning module, attribute)} for every parameter of the MoE layers' modules."""
    names = {id(m): n for n, m in model.named_modules()}
    owners: dict[str, tuple[nn.Module, str]] = {}
    for layer in moe_layers(model):
        for top in (layer.block, layer.router, layer.experts):
            for module in top.modules():
                prefix = names.get(id(module))
                if prefix is None:
                    continue
                for attr, param in module._parameters.items():
                    if param is not None:
                        owners[f"{prefix}.{attr}" if prefix else attr] = (module, attr)
    return owners


def check_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> dict[str, tuple[nn.Module, str]]:
    """Every name is a parameter of an MoE layer of ``model`` with the same shape; returns their owners."""
    owners = moe_parameter_owners(model)
    outside = sorted(set(delta) - set(owners))
    if outside:
        raise MoePruneError(
            f"A recovery delta may only replace MoE-layer parameters of the pruned model; {outside[:3]} "
            f"{'is' if len(outside) == 1 else 'are'} not one. Was it computed for another mask or model?"
        )
    for name, tensor in delta.items():
        module, attr = owners[name]
        live = module._parameters[attr]
        if tuple(live.shape) != tuple(tensor.shape):
            raise MoePruneError(
                f"Recovery delta {name} has shape {tuple(tensor.shape)} but the pruned model's is "
                f"{tuple(live.shape)}; it was computed for another mask. Delete it to recompute."
            )
    return {name: owners[name] for name in delta}


def apply_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> nn.Module:
    """Replace the named parameters by new Parameters holding ``delta``'s tensors (cast to each parameter's
    dtype and device); returns ``model``. Use inside ``masked(model, mask)`` or on a physically pruned model."""
    for name, (module, attr) in check_delta(model, delta).items():
        live = module._parameters[attr]
        value = delta[name].detach().to(device=live.device, dtype=live.dtype).clone()
        module._parameters[attr] = nn.Parameter(value, requires_grad=live.requires_grad)
    return model

