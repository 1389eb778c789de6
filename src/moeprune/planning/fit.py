"""Does this mask fit this model: expert count, config hash, top-k and routing groups, from the config alone.

One home for the checks that plan, apply (in memory or shard by shard) and the CLI's preflight all make, so
each message exists once. A config is a transformers config or a config.json dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from moeprune.arch.adapters import routing_meta
from moeprune.errors import MoePruneError
from moeprune.loading import config_hash
from moeprune.planning.groups import expert_groups
from moeprune.planning.mask import kept_count


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
