"""Load a Hugging Face MoE checkpoint (local directory or hub id) and its tokenizer, with clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moeprune.errors import MoePruneError
from moeprune.models import register as register_ports

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_model_path(model: str | Path) -> str:
    """``bundled`` names the testbed model that ships with moeprune; anything else is passed through."""
    if str(model) == "bundled":
        from moeprune.bundled import bundled_model_path

        return str(bundled_model_path())
    return str(model)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MoePruneError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'.")
    return DTYPES[dtype]


def load_config(model: str | Path, trust_remote_code: bool = False):
    # Model types moeprune maintains a port of (DeepSeek-MoE) load through it, never through their hub code.
    register_ports()
    path = resolve_model_path(model)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise MoePruneError(
                f"{path} uses custom modeling code; pass --trust-remote-code if you trust its source."
            ) from err
        raise MoePruneError(f"Cannot read the config of {path}: {err}") from err
    except OSError as err:
        raise MoePruneError(
            f"Cannot load model {path!r}: not a local directory with config.json, and the hub is unreachable or "
            f"has no such repo ({err.__class__.__name__}). Pass a local checkout path instead."
        ) from err


def load_model(
    model: str | Path,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    """Load a causal LM in eval mode; ``device_map`` (e.g. "auto") goes to accelerate."""
    path = resolve_model_path(model)
    config = load_config(path, trust_remote_code)
    kwargs = {"dtype": _auto_dtype(parse_dtype(dtype), device, device_map), "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except OSError as err:
        raise MoePruneError(f"Cannot load the weights of {path}: {err}") from err
    if device is not None and device_map is None:
        loaded = loaded.to(device)
    loaded.eval()
    loaded.name_or_path = path
    return loaded


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (float32 when the config does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return DTYPES.get(value, torch.float32) if isinstance(value, str) else value


def _auto_dtype(dtype: torch.dtype | str, device: str | None, device_map) -> torch.dtype | str:
    """ "auto" keeps the checkpoint's dtype, except on a CPU-only run: half-precision matmuls are many
    times slower than fp32 on CPUs, so there "auto" means float32."""
    on_cpu = device_map is None and (
        str(device).startswith("cpu") or (device is None and not torch.cuda.is_available())
    )
    return torch.float32 if dtype == "auto" and on_cpu else dtype


def load_tokenizer(model: str | Path, trust_remote_code: bool = False):
    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise MoePruneError(f"Cannot load a tokenizer from {path}: {err}. Pass --tokenizer PATH.") from err


def config_hash(config) -> str:
    """A short hash of the architecture-defining config, to recognise profiles and masks of other models."""
    data = config.to_dict()
    for key in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "auto_map",
        "use_cache",
        "output_router_logits",
        "_attn_implementation_autoset",
        "_experts_implementation",
    ):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_name(model: PreTrainedModel | str | Path) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    return str(name) if name else type(model).__name__


def is_local(model: str | Path) -> bool:
    return Path(resolve_model_path(model)).exists()
