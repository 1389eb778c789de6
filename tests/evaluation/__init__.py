"""Helpers for the evaluation tests: a tiny random qwen2_moe sized for the bundled tokenizer."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeConfig

from moeprune.bundled import bundled_model_path


def bundled_tokenizer():
    """The bundled testbed tokenizer (its files ship even before the trained model does)."""
    return AutoTokenizer.from_pretrained(bundled_model_path())


def tiny_lm(vocab_size: int, max_positions: int = 256, seed: int = 0):
    """A 2-layer, 4-expert random qwen2_moe in fp32 eval mode, with the tokenizer's vocabulary size."""
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
