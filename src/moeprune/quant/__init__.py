"""Quantized checkpoints as data: which tensors make up one quantized weight in each published layout, how they
are sliced along the expert axis, how transformers' own quantizers dequantize them, and the checks made before
anything is read or written. Used by loading (checks), apply (in memory and model-free) and the streamer."""

from moeprune.quant.formats import (
    FORMATS,
    QuantFormat,
    WeightParts,
    check_checkpoint,
    checkpoint_bytes,
    dequantize,
    describe,
    dtype_size,
    format_of,
    group_weights,
    header_info,
    is_writable,
    pruned_quantization_config,
)

__all__ = [
    "FORMATS",
    "checkpoint_bytes",
    "describe",
    "dtype_size",
    "header_info",
    "is_writable",
    "QuantFormat",
    "WeightParts",
    "check_checkpoint",
    "dequantize",
    "format_of",
    "group_weights",
    "pruned_quantization_config",
]
