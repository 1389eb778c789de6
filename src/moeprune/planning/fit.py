"""Does this mask fit this model: expert count, config hash, top-k and routing groups, from the config alone.

One home for the checks that plan, apply (in memory or shard by shard) and the CLI's preflight all make, so
each message exists once. A config is a transformers config or a config.json dict.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moeprune.arch import moe_layers
from moeprune.arch.adapters import routing_meta
from moeprune.errors import BrokenConfig, MoePruneError
from moeprune.io import read_config_json
from moeprune.loading import config_hash, load_config
from moeprune.planning.groups import expert_groups
from moeprune.planning.mask import kept_count

log = logging.getLogger(__name__)


def check_retain_for_config(config: Any, retains: float | Sequence[float]) -> None:
    """K = floor(rho * N) must reach top-k and split over routing groups: checked before profiling."""
    meta = routing_meta(config)
    if not isinstance(meta["num_experts"], int):
        return
    for retain in [retains] if isinstance(retains, float | int) else retains:
        kept = kept_count(retain, meta["num_experts"], meta["top_k"])
        expert_groups(meta, meta["num_experts"], kept)


def check_mask_for_config(mask: Any, config: Any, *, force: bool = False) -> None:
    """The mask fits this model: its expert count, its config hash (unless ``force``), the router's top-k
    and its routing groups (the same per-group count in every group)."""
    meta = routing_meta(config)
    if meta["num_experts"] != mask.num_experts:
        where = f" (mask made for {mask.model!r})" if mask.model else ""
        raise MoePruneError(
            f"The mask is for a model with {mask.num_experts} experts per layer{where}, but this model has "
            f"{meta['num_experts']} ({meta['num_experts_key']} in its config.json). Plan a mask from a profile of "
            "this model."
        )
    check_mask_hash(mask, config, force)
    check_mask_routable(mask, meta)


def check_mask_hash(mask: Any, config: Any, force: bool) -> None:
    recorded = mask.extra.get("config_hash")
    if not recorded or force or isinstance(config, dict):
        return
    actual = config_hash(config)
    if recorded != actual:
        raise MoePruneError(
            f"The mask was planned for {mask.model!r} (config hash {recorded}), but this model's config hash is "
            f"{actual}: a mask of another model of the same shape prunes the wrong experts. Plan a mask from a "
            "profile of this model, or pass --force if the two configs differ only in ways you know are harmless."
        )


def check_mask_routable(mask: Any, meta: dict[str, Any]) -> None:
    """K >= top-k, and with grouped routing the same number kept in every group of every layer."""
    top_k = meta.get("top_k")
    if top_k is not None and mask.kept_per_layer < top_k:
        raise MoePruneError(
            f"The mask keeps K={mask.kept_per_layer} experts per layer, fewer than the router's top-k={top_k}; "
            f"the pruned model could not route. Plan a mask with --retain >= "
            f"{math.ceil(top_k / mask.num_experts * 1000) / 1000}."
        )
    if not meta.get("n_group") or int(meta["n_group"]) <= 1:
        return
    groups = expert_groups(meta, mask.num_experts, mask.kept_per_layer)
    per_group = mask.kept_per_layer // len(groups)
    for layer in sorted(mask.layers):
        kept = set(mask.kept(layer))
        counts = [len(kept.intersection(group)) for group in groups]
        if any(count != per_group for count in counts):
            raise MoePruneError(
                f"Mask layer {layer} keeps {counts} experts in the router's n_group={len(groups)} routing groups, "
                f"but every group must keep K/n_group={per_group}: an uneven mask silently regroups experts. "
                "Plan the mask with moeprune plan, which keeps the same number inside each group."
            )


def check_mask_layers(mask: Any, config: Any, trust_remote_code: bool = False) -> None:
    """The mask covers exactly the model's MoE layers (none missing, none extra), found on an empty (meta
    device) model built from the config: checked before the weights load. A config transformers cannot
    build without running code is left to the check at load."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        layers = moe_layers(empty)
    except Exception:  # noqa: BLE001 - any failure here is reported by the load itself, with its own message
        return
    mask.check_model([layer.index for layer in layers], layers[0].num_experts if layers else mask.num_experts)


def check_mask_for_checkpoint(mask: Any, folder: str | Path, *, force: bool = False,
                              trust_remote_code: bool = False) -> Any:
    """Model-free apply's check of ``mask`` against the checkpoint in ``folder``, made without its weights (the
    CLI and :func:`moeprune.surgery.shards.prune_checkpoint_files` both call it): :func:`check_mask_for_config`
    on the config transformers builds from config.json, config hash included (``force`` skips it)."""
    config = _config_or_json(Path(folder), trust_remote_code)
    if isinstance(config, dict) and mask.extra.get("config_hash") and not force:
        _warn_hash_unchecked(str(folder))
    check_mask_for_config(mask, config, force=force)
    return config


@functools.cache  # once per folder: the CLI checks up front, then again where it writes
def _warn_hash_unchecked(folder: str) -> None:
    log.warning("The mask's config hash was not checked: transformers cannot build the config of %s without "
                "--trust-remote-code (expert count, top-k and routing groups were checked).", folder)


def _config_or_json(folder: Path, trust_remote_code: bool) -> Any:
    """The config object when transformers can build it (for the config hash), else config.json's dict:
    model-free apply never runs the checkpoint's code, so it must not need --trust-remote-code."""
    try:
        return load_config(folder, trust_remote_code)
    except BrokenConfig:
        raise  # a broken config.json is not read another way
    except MoePruneError:
        path = folder / "config.json"
        if not path.exists():
            raise MoePruneError(
                f"{folder} has no config.json; model-free apply needs a Hugging Face checkpoint."
            ) from None
        return read_config_json(folder)
