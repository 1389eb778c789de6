"""The quantized layouts moeprune reads and writes back, as data.

One :class:`QuantFormat` per published layout says which tensors make up one quantized weight (the payload and
its companions, by name suffix), where the layout is taken from, and how transformers' own code dequantizes it.
Slicing along the expert axis needs nothing per format: per-expert keys (``...experts.{j}.<proj>.<part>``) carry
the expert in the name, so the payload and every companion are kept or dropped and renumbered together; fused
keys (``...experts.<proj>_blocks``, ``...experts.<proj>_scales``) carry it on dim 0 and are sliced there (both
done by name in :mod:`moeprune.surgery.shards`). A kept expert's tensors are therefore the source's bytes.

The checks here read safetensors headers only (no tensor data) and run before anything is loaded or written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeprune.arch.adapters import DECODER_LISTS
from moeprune.errors import MoePruneError

# Tensor or module names inside a routed-experts module: per-expert (...experts.{j}[.rest]) or fused
# (...experts.param), the same rules as model-free apply's (surgery/keys.py).
_LAYER = r".*\.(?:" + "|".join(DECODER_LISTS) + r")\.(?P<layer>\d+)\.[^.]+\."
EXPERT_NAME = re.compile(r"^(?P<head>" + _LAYER + r"experts)\.(?P<expert>\d+)(?P<rest>\..+)?$")
FUSED_EXPERT_NAME = re.compile(r"^" + _LAYER + r"experts\.(?:mlp\.)?[^.]+$")
# Keys of a quantization_config that list module names left unquantized.
IGNORE_KEYS = ("ignore", "modules_to_not_convert", "ignored_layers", "exclude_modules")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class QuantFormat:
    """One quantized layout: ``payload`` is the name suffix of the quantized tensor, ``companions`` those that must
    sit next to it (same prefix), ``optional`` those that may; ``source`` says where the layout is taken from."""

    key: str
    quant_method: str
    title: str
    payload: str
    companions: tuple[str, ...]
    optional: tuple[str, ...] = ()
    source: str = ""
    block: tuple[int, int] | None = None  # FP8 block-scaled: weight_block_size
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def suffixes(self) -> tuple[str, ...]:
        return (self.payload, *self.companions, *self.optional)


@dataclass
class WeightParts:
    """The tensors of one weight: {suffix: tensor name}, with the weight's name prefix (``base``)."""

    base: str
    names: dict[str, str]


FP8_SOURCE = ("deepseek-ai/DeepSeek-V3 README_WEIGHTS.md (float8_e4m3fn weights, float32 weight_scale_inv per "
              "128 x 128 block) and its config.json quantization_config; Qwen3-*-FP8 use the same fields")
MXFP4_SOURCE = ("openai/gpt-oss-20b (fused experts gate_up_proj/down_proj as *_blocks uint8 [E, rows, cols/32, 16] "
                "and *_scales uint8 E8M0 [E, rows, cols/32]) and the OCP Microscaling (MX) v1.0 spec (E2M1 values, "
                "32-element blocks)")
CT_SOURCE = "the compressed-tensors package (the format llm-compressor writes), as its own compressors save it"

# Methods moeprune writes back in the source's own format. Any other method transformers reads may still be
# profiled and evaluated (transformers dequantizes it) and exported with --dequantize.
FORMATS: dict[str, QuantFormat] = {
    "fp8-block": QuantFormat("fp8-block", "fp8", "FP8 e4m3, 128 x 128 block scales (DeepSeek-V3 layout)", ".weight",
                             (".weight_scale_inv",), (".activation_scale",), FP8_SOURCE),
    "fp8-tensor": QuantFormat("fp8-tensor", "fp8", "FP8 e4m3, one scale per tensor", ".weight",
                              (".weight_scale_inv",), (".activation_scale",), "transformers FineGrainedFP8Config "
                              "with weight_block_size null"),
    "mxfp4": QuantFormat("mxfp4", "mxfp4", "MXFP4 (gpt-oss layout: E2M1 blocks, E8M0 scales per 32)", "_blocks",
                         ("_scales",), (), MXFP4_SOURCE),
    "ct-pack-quantized": QuantFormat("ct-pack-quantized", "compressed-tensors",
                                     "compressed-tensors pack-quantized (int4/int8 packed in int32)", ".weight_packed",
                                     (".weight_scale", ".weight_shape"), (".weight_zero_point", ".weight_g_idx"),
                                     CT_SOURCE),
    "ct-float-quantized": QuantFormat("ct-float-quantized", "compressed-tensors", "compressed-tensors FP8 "
                                      "(float-quantized)", ".weight", (".weight_scale",),
                                      (".input_scale", ".weight_zero_point"), CT_SOURCE),
}


def transformers_methods() -> set[str]:
    """The quant_method values this transformers reads (its quantizer table)."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    return set(AUTO_QUANTIZER_MAPPING)


def format_of(quantization: Mapping[str, Any] | None, *, name: str = "the checkpoint") -> QuantFormat | None:
    """The layout a ``quantization_config`` describes; None for an unquantized checkpoint.

    Refused (one line, with the fix): a method transformers cannot read; a method transformers reads but moeprune
    does not write back is returned as a ``generic`` format (compute works, apply needs ``--dequantize``)."""
    if not quantization:
        return None
    method = str(quantization.get("quant_method", "")).lower()
    if method not in transformers_methods():
        raise MoePruneError(
            f"{name} is quantized with quant_method {method or '(none)'!r}, which this transformers cannot read "
            f"(it reads {', '.join(sorted(transformers_methods())[:8])}, ...); dequantize it with the tool that made "
            "it and pass that folder."
        )
    if method == "fp8":
        block = quantization.get("weight_block_size")
        if block is None:
            return FORMATS["fp8-tensor"]
        fmt = FORMATS["fp8-block"]
        return QuantFormat(**{**fmt.__dict__, "block": (int(block[0]), int(block[1]))})
    if method == "mxfp4":
        return FORMATS["mxfp4"]
    if method == "compressed-tensors":
        kind = str(quantization.get("format", ""))
        if kind == "pack-quantized":
            return FORMATS["ct-pack-quantized"]
        if kind in ("float-quantized", "naive-quantized"):
            return FORMATS["ct-float-quantized"]
        return QuantFormat("generic", method, f"compressed-tensors {kind or '?'}", "", (), details={"format": kind})
    return QuantFormat("generic", method, method, "", ())


def is_writable(fmt: QuantFormat | None) -> bool:
    """Whether apply writes this layout back as it is (unquantized checkpoints: always)."""
    return fmt is None or fmt.key != "generic"


def describe(fmt: QuantFormat | None) -> str:
    return "unquantized" if fmt is None else f"{fmt.title} (quant_method {fmt.quant_method})"


# ---------------------------------------------------------------------------------------------- names
def group_weights(names: Iterable[str], fmt: QuantFormat) -> dict[str, WeightParts]:
    """{weight prefix: its parts} for every tensor name that ends in one of ``fmt``'s suffixes (longest first)."""
    suffixes = sorted(fmt.suffixes(), key=len, reverse=True)
    groups: dict[str, WeightParts] = {}
    for name in names:
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None:
            continue
        base = name[: -len(suffix)]
        groups.setdefault(base, WeightParts(base, {})).names[suffix] = name
    return groups


def is_expert_tensor(name: str) -> bool:
    return bool(EXPERT_NAME.match(name) or FUSED_EXPERT_NAME.match(name))


# ---------------------------------------------------------------------------------------------- headers
# Bytes per element of safetensors' dtype strings.
DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}


def dtype_size(dtype: str) -> int:
    return DTYPE_SIZES.get(dtype, 1)


def header_info(folder: str | Path, shards: Iterable[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype string, shape)} from the shards' headers (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    info: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in shards:
        path = Path(folder) / shard
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    piece = handle.get_slice(name)
                    info[name] = (str(piece.get_dtype()), tuple(piece.get_shape()))
        except (SafetensorError, OSError) as err:
            raise MoePruneError(f"{path} is truncated or corrupt ({err}); re-download the checkpoint.") from err
    return info


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the tensors of a local safetensors checkpoint, from its headers."""
    shards = sorted(p.name for p in Path(folder).glob("*.safetensors"))
    return sum(math.prod(shape) * dtype_size(dtype) for dtype, shape in header_info(folder, shards).values())


# ---------------------------------------------------------------------------------------------- checks
def check_checkpoint(folder: str | Path, config: Mapping[str, Any], headers: Mapping[str, tuple[str, tuple[int, ...]]],
                     *, compute: bool = False) -> QuantFormat | None:
    """The checkpoint's layout, after the checks that need only ``config`` and the safetensors ``headers``
    ({name: (dtype string, shape)}): every quantized weight has its companions; an FP8 block-scaled weight's
    scale grid is ceil(shape / block) and, for routed experts, the block divides the shape. ``compute`` (the model
    will be loaded and dequantized): the block must divide every FP8 weight, since transformers 5.25's
    dequantization takes the block from the scale grid (a ragged edge block gives wrong weights, or an error)."""
    fmt = format_of(config.get("quantization_config"), name=str(folder))
    if fmt is None or fmt.key == "generic":
        return fmt
    for base, parts in sorted(group_weights(headers, fmt).items()):
        payload = parts.names.get(fmt.payload)
        if payload is None:
            continue  # a companion without a payload (e.g. an activation scale of a fused projection)
        dtype, shape = headers[payload]
        if fmt.payload == ".weight" and not _quantized_weight(dtype, parts, fmt):
            continue  # an unquantized weight (norms, router, embeddings, lm_head, modules_to_not_convert)
        missing = [s for s in fmt.companions if s not in parts.names]
        if missing:
            raise MoePruneError(
                f"{folder}: {payload} ({fmt.title}) has no {base}{missing[0]} next to it; the checkpoint is "
                "incomplete (a partial download or a bad conversion): re-download it."
            )
        if fmt.key == "fp8-block":
            _check_fp8_block(folder, payload, shape, headers[parts.names[".weight_scale_inv"]][1], fmt.block,
                             compute)
        if fmt.key == "mxfp4" and tuple(headers[parts.names["_scales"]][1]) != tuple(shape[:-1]):
            raise MoePruneError(
                f"{folder}: {payload} has shape {list(shape)} but {base}_scales has "
                f"{list(headers[parts.names['_scales']][1])}, not {list(shape[:-1])} (one E8M0 scale per 32-value "
                "block); the checkpoint is damaged: re-download it."
            )
    return fmt


def _quantized_weight(dtype: str, parts: WeightParts, fmt: QuantFormat) -> bool:
    if fmt.key.startswith("fp8") or fmt.key == "ct-float-quantized":
        return dtype in FP8_DTYPES or any(s in parts.names for s in fmt.companions)
    return True


def _check_fp8_block(folder: str | Path, name: str, shape: tuple[int, ...], scale: tuple[int, ...],
                     block: tuple[int, int] | None, compute: bool = False) -> None:
    if block is None or len(shape) < 2:
        return
    grid = (*shape[:-2], *(math.ceil(d / b) for d, b in zip(shape[-2:], block, strict=True)))
    if tuple(scale) != grid:
        raise MoePruneError(
            f"{folder}: {name} has shape {list(shape)} and a scale grid {list(scale)}, not the {list(grid)} that "
            f"weight_block_size {list(block)} gives; the checkpoint's scales do not match its config: re-download it."
        )
    if is_expert_tensor(name) and (shape[-2] % block[0] or shape[-1] % block[1]):
        raise MoePruneError(
            f"{folder}: expert weight {name} of shape {list(shape[-2:])} is not a whole number of "
            f"{block[0]} x {block[1]} blocks (weight_block_size); transformers' dequantization reads the block from "
            "the scale grid and would compute wrong weights. Use a checkpoint quantized with a block that divides "
            "the expert shape (or its unquantized release)."
        )
    # transformers' block is shape // grid per dim: right where the grid is 1 (one block, whole) or the block divides
    if compute and any(g > 1 and d % b for d, g, b in zip(shape[-2:], grid[-2:], block, strict=True)):
        raise MoePruneError(
            f"{folder}: {name} of shape {list(shape[-2:])} ends in a partial {block[0]} x {block[1]} block, and "
            "transformers' dequantization reads the block from the scale grid, so it would compute wrong weights (or "
            "fail) when loading; prune it with `moeprune apply --model-free` (no dequantization), or use its "
            "unquantized release for profiling."
        )


# ---------------------------------------------------------------------------------------------- dequantization
def dequantize(fmt: QuantFormat, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
               quantization: Mapping[str, Any] | None = None) -> torch.Tensor:
    """One weight's dequantized tensor from its parts ({suffix: tensor}), through transformers' (or
    compressed-tensors') own code; the result has the checkpoint's layout of that weight (for MXFP4,
    transformers' ``[E, in, out]`` parameter layout)."""
    if fmt.key in ("fp8-block", "fp8-tensor"):
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize

        return Fp8Dequantize(None)._dequantize_one(tensors[".weight"], tensors[".weight_scale_inv"], dtype)
    if fmt.key == "mxfp4":
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        return convert_moe_packed_tensors(tensors["_blocks"], tensors["_scales"], dtype=dtype)
    if fmt.key.startswith("ct-"):
        return _ct_dequantize(fmt, tensors, quantization or {}, dtype).to(dtype)
    raise MoePruneError(f"moeprune cannot dequantize {describe(fmt)} itself; load the model through transformers.")


def _ct_dequantize(fmt: QuantFormat, tensors: Mapping[str, torch.Tensor], quantization: Mapping[str, Any],
                   dtype: torch.dtype) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate({k: v for k, v in quantization.items() if k != "quant_method"})
    scheme = next(iter(config.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(config.format)
    # Scales in the compute dtype first, as transformers' loader casts them before it decompresses.
    state = {suffix.lstrip("."): tensor.to(dtype) if suffix == ".weight_scale" else tensor
             for suffix, tensor in tensors.items()}
    return compressor.decompress(state, scheme)["weight"]


# ---------------------------------------------------------------------------------------------- config.json
def pruned_quantization_config(quantization: Mapping[str, Any], kept: Mapping[int, list[int]]) -> dict[str, Any]:
    """``quantization`` with every module name of an ignore list (``ignore``, ``modules_to_not_convert``, ...) that
    names a routed expert of a pruned layer renumbered to the kept expert's new index, or dropped with its expert.
    Other entries (attention, routers, regular expressions) are kept as they are."""

    def edit(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (edit_list(v) if k in IGNORE_KEYS and isinstance(v, list) else edit(v))
                    for k, v in value.items()}
        return value

    def edit_list(entries: list[Any]) -> list[Any]:
        out = []
        for entry in entries:
            match = EXPERT_NAME.match(entry) if isinstance(entry, str) else None
            if match is None or int(match["layer"]) not in kept:
                out.append(entry)
                continue
            ids = kept[int(match["layer"])]
            if int(match["expert"]) in ids:
                out.append(f"{match['head']}.{ids.index(int(match['expert']))}{match['rest'] or ''}")
        return out

    return edit(dict(quantization))
