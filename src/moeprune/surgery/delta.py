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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from moeprune.io import read_json, save_safetensors_atomic, write_json_atomic

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
        """``folder/delta.safetensors`` then ``folder/recovery.json`` (the record last: it marks it done)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(folder / DELTA_FILE, {k: v.detach().cpu().contiguous() for k, v in self.delta.items()},
                                metadata={"format": FORMAT})
        write_json_atomic(folder / RECORD_FILE, {"format": FORMAT, **self.record})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Recovery:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        fix = "delete it to recompute it"
        # The project's one bounded, strict JSON reader (a cached record is a file like any other input).
        record = read_json(folder / RECORD_FILE, f"Recovery record in {folder}", fix)
        if not isinstance(record, dict):
            raise MoePruneError(f"Recovery record in {folder} is not a JSON object; {fix}.")
        try:
            delta = load_file(str(folder / DELTA_FILE))
        except (OSError, SafetensorError) as err:
            raise MoePruneError(f"Recovery in {folder} is missing or corrupt ({err}); {fix}.") from err
        record.pop("format", None)
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

