"""Tiny random MoE models of every supported architecture, built from configs (no download).

Router weights are scaled up so routing is decisive and varied, which makes wrong indices show
up as large logit differences instead of hiding in near-uniform routing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from tests.deepseek_checkpoint import copy_remote_code, hub_config

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _configs(num_experts: int = 8, top_k: int = 2, vocab_size: int = 128) -> dict:
    common = {**COMMON, "vocab_size": vocab_size}
    return {
        "qwen2_moe": Qwen2MoeConfig(
            **common,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],  # one dense layer: layers must be found by module, not index
        ),
        "qwen3_moe": Qwen3MoeConfig(
            **common,
            head_dim=8,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=16,
            norm_topk_prob=True,
        ),
        "mixtral": MixtralConfig(**common, num_local_experts=num_experts, num_experts_per_tok=top_k),
        "olmoe": OlmoeConfig(
            **common,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=False,
        ),
        "deepseek_v2": DeepseekV2Config(
            **{**common, "num_key_value_heads": 4},
            n_routed_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            topk_method="greedy",
            routed_scaling_factor=1.0,
        ),
        "deepseek_v3": DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            n_routed_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_group=2,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    }


ARCH_NAMES = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "deepseek"]


def build_model(arch: str, num_experts: int = 8, top_k: int = 2, seed: int = 0, vocab_size: int = 128):
    """A tiny random fp32 model of ``arch`` in eval mode, with decisive, varied routing."""
    torch.manual_seed(seed)
    if arch == "deepseek":  # DeepSeek-MoE-16B's hub config fields at tiny sizes, built by moeprune's port
        from moeprune.models.deepseek_moe import DeepseekConfig, DeepseekForCausalLM

        config = DeepseekConfig.from_dict(hub_config(num_experts, top_k, vocab_size))
        model = DeepseekForCausalLM(config)
    else:
        config = _configs(num_experts, top_k, vocab_size)[arch]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_weights(model)
    return model.eval()


def save_model(model, path: Path) -> Path:
    """save_pretrained; a DeepSeek-MoE folder also gets the auto_map code files, as on the hub (stand-ins that
    raise if executed: see tests/deepseek_checkpoint.py)."""
    path = Path(path)
    model.save_pretrained(path)
    if model.config.model_type == "deepseek":
        copy_remote_code(path)
    return path


@torch.no_grad()
def _spread_weights(model) -> None:
    for name, param in model.named_parameters():
        if "norm" in name:
            continue
        std = 0.5 if name.endswith("gate.weight") and param.shape[0] > 1 else 0.1
        param.normal_(0.0, std)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(0.0, 0.05)
