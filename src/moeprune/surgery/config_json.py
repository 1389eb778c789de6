"""config.json of a pruned checkpoint: the source's own file with only the expert count changed.

transformers 5 ``save_pretrained`` writes its own view of a config: ``rope_parameters`` and ``dtype``
instead of ``rope_theta``, ``rope_scaling`` and ``torch_dtype``. A transformers 4.x reader (and other
tools, e.g. older vLLM) then silently falls back to rope_theta 10000, where Qwen1.5-MoE needs 1e6, and
DeepSeek-V2-Lite loses its yarn ``rope_scaling``. So the exported config.json is the source's config.json,
field for field, with the expert count (and any alias of it) set to K; keys that transformers 5 wrote and
the source lacks are merged in (transformers 5 reads them first, 4.x ignores them). When the source file
cannot be found (a model built in memory), the legacy keys are derived from transformers 5's own.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from moeprune.arch.adapters import ARCHITECTURES, NUM_EXPERTS_KEYS, config_value, set_config_value
from moeprune.io import read_config_json
from moeprune.planning.mask import ExpertMask
from moeprune.quant import pruned_quantization_config

log = logging.getLogger(__name__)


def source_config_json(source: str | Path | None) -> dict[str, Any] | None:
    """The raw config.json of ``source`` (a local directory, or a hub id in the local cache), else None."""
    if source is None:
        return None
    path = Path(source) / "config.json"
    if path.is_file():
        return read_config_json(source)
    try:
        from transformers import PretrainedConfig

        # Raw JSON, no class-specific rewriting; only from the local cache (the model was loaded from it).
        config, _ = PretrainedConfig.get_config_dict(str(source), local_files_only=True)
        return config
    except (OSError, ValueError):
        return None


def pruned_config_json(source: dict[str, Any] | None, saved: dict[str, Any], num_experts: int,
                       kept: int) -> dict[str, Any]:
    """The config.json to write: ``source`` (else ``saved`` plus legacy keys) with N -> K and the dtype saved."""
    if source is None:
        log.warning("The source config.json was not found: writing transformers' config with rope_theta, "
                    "rope_scaling and torch_dtype added for older readers.")
        config = {**saved, **legacy_keys(saved)}
    else:
        config = {**saved, **source}
    config = with_expert_count(config, num_experts, kept)
    saved_dtype = saved.get("dtype") or saved.get("torch_dtype")
    if saved_dtype is not None:
        # The weights' own dtype: differs from the source's when the user asked for another --dtype.
        config["torch_dtype"] = saved_dtype
        if "dtype" in config:
            config["dtype"] = saved_dtype
    return config


def with_expert_count(config: dict[str, Any], num_experts: int, kept: int) -> dict[str, Any]:
    """``config`` with every expert-count key that reads N (the architecture's key and its aliases) set to K;
    a dotted key of the architecture table (DBRX ``ffn_config.moe_num_experts``) is set inside its nested dict."""
    edited = {key: kept for key in NUM_EXPERTS_KEYS if config.get(key) == num_experts}
    config = {**config, **edited}
    row = ARCHITECTURES.get(config.get("model_type"))
    if row is not None and "." in row.num_experts_key and config_value(config, row.num_experts_key) == num_experts:
        config = copy.deepcopy(config)  # the nested dicts are the source's: edit a copy
        set_config_value(config, row.num_experts_key, kept)
    return config


def with_pruned_quantization(config: dict[str, Any], mask: ExpertMask) -> dict[str, Any]:
    """``config`` with its quantization_config's ignore lists (``ignore``, ``modules_to_not_convert``, ...) naming
    routed experts renumbered to the kept ones, and those of removed experts dropped (see moeprune.quant)."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return config
    kept = {layer: mask.kept(layer) for layer in mask.layers}
    return {**config, "quantization_config": pruned_quantization_config(quantization, kept)}


def without_quantization(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` for dequantized weights: no quantization_config (a reader would look for scales otherwise)."""
    return {k: v for k, v in config.items() if k != "quantization_config"}


def legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, rope_scaling and torch_dtype as transformers 4.x writes them, from transformers 5's keys."""
    out: dict[str, Any] = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            out["rope_scaling"] = {"type": scaling["rope_type"], **scaling}
    if "dtype" in config:
        out["torch_dtype"] = config["dtype"]
    return out
