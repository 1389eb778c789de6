"""Tiny quantized checkpoints in published layouts, written offline by the tests' own writers.

FP8 block-scaled, as DeepSeek-V3 publishes it (deepseek-ai/DeepSeek-V3 README_WEIGHTS.md and config.json): every
linear weight of attention and MLPs (routed and shared experts, dense MLPs) stored as ``float8_e4m3fn`` with a
``float32`` ``weight_scale_inv`` holding, per 128 x 128 block, the block's max |w| / 448 (the dequantized weight is
``w_fp8 * scale_inv`` block-wise); embeddings, ``lm_head``, norms and the router (``mlp.gate``) stay unquantized;
``quantization_config {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
"weight_block_size": [128, 128]}``. The bf16 checkpoint is first written by ``save_pretrained`` (hub per-expert keys,
as the published checkpoints have), then each shard is converted in place, so multi-shard sources keep their index.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV3Config, Qwen3MoeConfig

FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
UNQUANTIZED = ("embed_tokens", "lm_head", "norm", "mlp.gate.")  # DeepSeek-V3 keeps these in bf16 / fp32

COMMON = dict(vocab_size=128, hidden_size=128, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def config(arch: str, expert_width: int = 128, num_experts: int = 8, vocab_size: int = 128, **overrides) -> object:
    """A tiny deepseek_v3 or qwen3_moe whose linear weights are whole 128 x 128 blocks (``expert_width`` is the
    routed experts' intermediate size: pass one the block does not divide to test the refusal)."""
    common = {**COMMON, "vocab_size": vocab_size, **overrides}
    if arch == "deepseek_v3":
        return DeepseekV3Config(
            **common, intermediate_size=256, n_routed_experts=num_experts, num_experts_per_tok=2,
            moe_intermediate_size=expert_width, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=128,
            q_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=128, v_head_dim=64, n_group=2, topk_group=2,
            norm_topk_prob=True, routed_scaling_factor=2.5,
        )
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, head_dim=64, intermediate_size=256, num_experts=num_experts,
                              num_experts_per_tok=2, moe_intermediate_size=expert_width, norm_topk_prob=True)
    raise ValueError(arch)


def build(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """The bf16 model the quantized checkpoint is made from, with decisive routing (see tests/tiny_models.py)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, **kwargs), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.5 if name.endswith("gate.weight") and param.shape[0] > 1 else 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
    return model.eval()


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [ceil(rows/128), ceil(cols/128)]): DeepSeek-V3's block scaling
    (a block at the edge is scaled by its own max, as if zero-padded to 128)."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    tiles = padded.reshape(grid[0], block[0], grid[1], block[1])
    scale_inv = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    quantized = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.reshape(padded.shape)[:rows, :cols].contiguous(), scale_inv.float()


def quantize_fp8_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scalar scale_inv): one scale per tensor (``weight_block_size: null``)."""
    scale_inv = (weight.float().abs().max() / FP8_MAX).clamp(min=1e-12).float()
    return (weight.float() / scale_inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale_inv


def write_fp8_block(model: torch.nn.Module, path: Path, *, max_shard_size: str | None = None,
                    quantization: dict | None = None) -> Path:
    """``model`` saved in DeepSeek-V3's FP8 block layout (see the module docstring); with a ``quantization``
    whose ``weight_block_size`` is None, one scale per tensor instead."""
    quantization = dict(quantization or FP8_CONFIG)
    quantize = quantize_fp8_block if quantization.get("weight_block_size") else quantize_fp8_tensor
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for shard in sorted(path.glob("*.safetensors")):
        tensors = {}
        for name, tensor in load_file(shard).items():
            if tensor.ndim == 2 and name.endswith(".weight") and not any(u in name for u in UNQUANTIZED):
                tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = quantize(tensor)
                if index is not None:
                    index["weight_map"][name.removesuffix("weight") + "weight_scale_inv"] = shard.name
            else:
                tensors[name] = tensor
        save_file(tensors, str(shard), metadata={"format": "pt"})
    if index is not None:
        index["metadata"]["total_size"] = sum(_tensor_bytes(s) for s in path.glob("*.safetensors"))
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_file.write_text(json.dumps(index, indent=2))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _tensor_bytes(shard: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(shard).values())


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


# ---------------------------------------------------------------------------------------------- MXFP4 (gpt-oss)
# openai/gpt-oss-20b's layout: the fused experts' gate_up_proj and down_proj as ``*_blocks`` (uint8, two E2M1 values
# per byte, the even element in the low nibble) ``[E, out, in / 32, 16]`` and ``*_scales`` (uint8, E8M0: the exponent
# + 127) ``[E, out, in / 32]`` of the transposed ``[E, out, in]`` matrix; biases, router, attention, embeddings and
# head unquantized; ``quantization_config {"quant_method": "mxfp4", "modules_to_not_convert": [...]}``. Scaling per
# the OCP Microscaling spec v1.0: shared exponent floor(log2(max |x|)) - 2 (E2M1's largest exponent), elements
# rounded to the nearest E2M1 value and clamped to +-6.
MXFP4_CONFIG = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def build_gpt_oss(seed: int = 0, vocab_size: int = 128, width: int = 64, num_experts: int = 8) -> torch.nn.Module:
    from transformers import GptOssConfig

    torch.manual_seed(seed)
    config = GptOssConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=width, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=num_experts,
                          num_experts_per_tok=2, max_position_embeddings=128, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name and "sinks" not in name:
                param.normal_(0.0, 0.5 if "router" in name else 0.1)
    return model.eval()


def quantize_mxfp4(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [..., rows, cols / 32, 16], scales uint8 [..., rows, cols / 32]) of ``matrix``
    ``[..., rows, cols]``."""
    x = matrix.float().reshape(*matrix.shape[:-1], matrix.shape[-1] // 32, 32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0 ** -126))) - 2, torch.zeros_like(amax))
    scaled = (x / torch.exp2(exponent)).clamp(-6.0, 6.0)
    codes = (scaled.unsqueeze(-1) - E2M1).abs().argmin(dim=-1).to(torch.uint8)  # nearest E2M1 value
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def write_mxfp4(model: torch.nn.Module, path: Path, *, max_shard_size: str | None = None) -> Path:
    """``model`` (gpt_oss) saved in gpt-oss's MXFP4 layout (see above)."""
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for shard in sorted(path.glob("*.safetensors")):
        tensors = {}
        for name, tensor in load_file(shard).items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] in transformers
                blocks, scales = quantize_mxfp4(tensor.transpose(1, 2))
                tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
                if index is not None:
                    del index["weight_map"][name]
                    index["weight_map"].update({name + "_blocks": shard.name, name + "_scales": shard.name})
            else:
                tensors[name] = tensor
        save_file(tensors, str(shard), metadata={"format": "pt"})
    if index is not None:
        index["metadata"]["total_size"] = sum(_tensor_bytes(s) for s in path.glob("*.safetensors"))
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_file.write_text(json.dumps(index, indent=2))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = dict(MXFP4_CONFIG)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


# ---------------------------------------------------------------------------------------------- compressed-tensors
# Made by the compressed-tensors package itself: its preset schemes (W4A16: int4 symmetric, groups of 128, format
# pack-quantized; FP8_DYNAMIC: float8 per output channel, format float-quantized), its qparam and compressor code,
# and its QuantizationConfig as the quantization_config, for every Linear but lm_head and the routers (the ignore
# list llm-compressor's MoE examples use). Per-expert keys, as llm-compressor saves MoE checkpoints.
CT_FORMATS = {"W4A16": "pack-quantized", "FP8_DYNAMIC": "float-quantized"}


def write_compressed_tensors(model: torch.nn.Module, path: Path, preset: str = "W4A16", *,
                             max_shard_size: str | None = None) -> Path:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    scheme = preset_name_to_scheme(preset, ["Linear"])
    fmt = CT_FORMATS[preset]
    compressor = BaseCompressor.get_value_from_registry(fmt)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for shard in sorted(path.glob("*.safetensors")):
        tensors = {}
        for name, tensor in load_file(shard).items():
            if not (tensor.ndim == 2 and name.endswith(".weight") and not any(u in name for u in UNQUANTIZED)):
                tensors[name] = tensor
                continue
            args = scheme.weights
            rows = tensor.float() if args.strategy == "channel" else \
                tensor.float().unflatten(-1, (tensor.shape[-1] // args.group_size, args.group_size))
            scale, zero = calculate_qparams(rows.amin(dim=-1), rows.amax(dim=-1), args)
            scale = scale.reshape(tensor.shape[0], -1).to(tensor.dtype)
            parts = compressor.compress({"weight": tensor, "weight_scale": scale,
                                         "weight_zero_point": zero.reshape(scale.shape)}, scheme)
            prefix = name.removesuffix("weight")
            tensors.update({prefix + part: value.contiguous() for part, value in parts.items()})
            if index is not None:
                index["weight_map"].pop(name)
                index["weight_map"].update({prefix + part: shard.name for part in parts})
        save_file(tensors, str(shard), metadata={"format": "pt"})
    if index is not None:
        index["metadata"]["total_size"] = sum(_tensor_bytes(s) for s in path.glob("*.safetensors"))
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        index_file.write_text(json.dumps(index, indent=2))
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                                ignore=["lm_head", "re:.*mlp.gate$"])
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {**json.loads(config.model_dump_json(exclude_none=True)),
                                  "quant_method": "compressed-tensors"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
