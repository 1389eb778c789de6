"""A tiny DeepSeek-MoE checkpoint in the hub's format, written without moeprune, and a reference forward.

``write_checkpoint`` writes what a deepseek-ai/deepseek-moe-16b-base folder holds: a config.json with exactly
the hub's field names (small sizes), weights under the hub's key names in safetensors, and
``configuration_deepseek.py``/``modeling_deepseek.py`` named by ``auto_map``. Those two files are the
poison stand-ins in tests/remote_code/, which raise if anything imports them: the real ones fail on
transformers 5, and moeprune must never run them.

``reference_logits`` is the published architecture in plain torch, written from the paper and the hub
code's structure (not from moeprune's port): embeddings; per layer RMSNorm, rotary multi-head attention
with a causal mask, residual, RMSNorm, then a dense SwiGLU MLP below ``first_k_dense_replace`` or an MoE
(softmax router, greedy top-k, renormalised only if ``norm_topk_prob``, plus the shared experts);
final RMSNorm and ``lm_head``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from benchmarks.paper_scale import DEEPSEEK_MOE_16B_PUBLISHED

REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"
REMOTE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")

# deepseek-ai/deepseek-moe-16b-base's config.json, every field as published (auto_map included): the one
# copy lives with the paper-scale benchmark, which builds the full-width model from it. See
# tests/test_published_configs.py and docs/benchmarks.md ("Which config values were checked").
DEEPSEEK_MOE_16B_CONFIG = DEEPSEEK_MOE_16B_PUBLISHED
AUTO_MAP = DEEPSEEK_MOE_16B_CONFIG["auto_map"]


def hub_config(
    num_experts: int = 8, top_k: int = 2, vocab_size: int = 128, norm_topk_prob: bool = False
) -> dict:
    """deepseek-moe-16b-base's config.json, field for field, at tiny sizes (fp32, token ids in the vocabulary)."""
    return json.loads(json.dumps({
        **DEEPSEEK_MOE_16B_CONFIG,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_size": 32,
        "intermediate_size": 48,
        "max_position_embeddings": 128,
        "moe_intermediate_size": 16,
        "n_routed_experts": num_experts,
        "norm_topk_prob": norm_topk_prob,
        "num_attention_heads": 4,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
    }))  # a deep copy: callers may edit it


def random_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the hub's key names; router rows scaled up so routing is decisive."""
    generator = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]

    def rand(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def mlp(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.gate_proj.weight": rand(width, hidden),
            f"{prefix}.up_proj.weight": rand(width, hidden),
            f"{prefix}.down_proj.weight": rand(hidden, width),
        }

    state = {"model.embed_tokens.weight": rand(vocab, hidden, std=0.5), "lm_head.weight": rand(vocab, hidden)}
    state["model.norm.weight"] = 1 + rand(hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{p}.self_attn.{name}.weight"] = rand(hidden, hidden, std=0.3)
        state[f"{p}.input_layernorm.weight"] = 1 + rand(hidden)
        state[f"{p}.post_attention_layernorm.weight"] = 1 + rand(hidden)
        if i < config["first_k_dense_replace"]:
            state.update(mlp(f"{p}.mlp", config["intermediate_size"]))
            continue
        state[f"{p}.mlp.gate.weight"] = rand(config["n_routed_experts"], hidden, std=0.5)
        for j in range(config["n_routed_experts"]):
            state.update(mlp(f"{p}.mlp.experts.{j}", config["moe_intermediate_size"]))
        shared = config["moe_intermediate_size"] * config["n_shared_experts"]
        state.update(mlp(f"{p}.mlp.shared_experts", shared))
    return state


def write_checkpoint(path: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """The hub folder layout: config.json, model.safetensors and the auto_map code files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), {"format": "pt"})
    copy_remote_code(path)
    return path


def copy_remote_code(path: Path) -> None:
    for name in REMOTE_FILES:
        shutil.copy(REMOTE_CODE_DIR / name, path / name)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    gate, up = F.linear(x, state[f"{prefix}.gate_proj.weight"]), F.linear(x, state[f"{prefix}.up_proj.weight"])
    return F.linear(F.silu(gate) * up, state[f"{prefix}.down_proj.weight"])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention(x: torch.Tensor, state: dict, prefix: str, config: dict) -> torch.Tensor:
    batch, seq, hidden = x.shape
    heads = config["num_attention_heads"]
    dim = hidden // heads

    def split(name: str) -> torch.Tensor:
        return (x @ state[f"{prefix}.{name}.weight"].T).view(batch, seq, heads, dim).transpose(1, 2)

    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, dim, 2).double() / dim))
    scaling = config["rope_scaling"] or {"type": None}
    assert scaling["type"] in (None, "linear"), "the reference implements no other RoPE scaling"
    positions = torch.arange(seq).double() / scaling.get("factor", 1.0)  # linear scaling divides positions
    angles = torch.outer(positions, inv_freq)
    cos, sin = torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float()
    q, k, v = _rotate(split("q_proj"), cos, sin), _rotate(split("k_proj"), cos, sin), split("v_proj")
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, hidden)
    return out @ state[f"{prefix}.o_proj.weight"].T


def _moe(x: torch.Tensor, state: dict, prefix: str, config: dict, kept: list[int] | None) -> torch.Tensor:
    """Softmax over the (kept) experts' router logits, greedy top-k, optional renormalisation, shared experts."""
    experts = list(range(config["n_routed_experts"])) if kept is None else list(kept)
    logits = x @ state[f"{prefix}.gate.weight"][experts].T  # [B, S, K]
    weights, slots = logits.softmax(-1).topk(config["num_experts_per_tok"], dim=-1)
    if config["norm_topk_prob"] and config["num_experts_per_tok"] > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    outputs = torch.stack([_swiglu(x, state, f"{prefix}.experts.{e}") for e in experts], dim=-2)  # [B, S, K, H]
    chosen = outputs.gather(-2, slots[..., None].expand(*slots.shape, x.shape[-1]))
    return (weights[..., None] * chosen).sum(-2) + _swiglu(x, state, f"{prefix}.shared_experts")


@torch.no_grad()
def moe_block_reference(x: torch.Tensor, state: dict, prefix: str, config: dict) -> torch.Tensor:
    """One MoE block with the hub code's inference arithmetic, in ``x``'s dtype throughout (bf16 included).

    As the hub's ``MoEGate`` and ``DeepseekMoE.moe_infer`` (4.36-era modeling_deepseek.py) do it: router
    logits and their softmax in the input dtype (no float32 upcast), greedy top-k, optional renormalisation;
    each routed expert's output times its weight, added into a zero tensor one expert at a time in ascending
    id order; the shared experts added last. Equal to the port bit for bit, so a change of accumulation
    dtype or summation order in the port shows here.
    """
    flat = x.reshape(-1, x.shape[-1])
    scores = F.linear(flat, state[f"{prefix}.gate.weight"]).softmax(dim=-1)
    weights, slots = torch.topk(scores, config["num_experts_per_tok"], dim=-1, sorted=False)
    if config["norm_topk_prob"] and config["num_experts_per_tok"] > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    routed = torch.zeros_like(flat)
    for expert in range(config["n_routed_experts"]):
        rows, slot = (slots == expert).nonzero(as_tuple=True)
        if rows.numel():
            out = _swiglu(flat[rows], state, f"{prefix}.experts.{expert}") * weights[rows, slot, None]
            routed[rows] = routed[rows] + out  # each token at most once per expert
    return routed.view_as(x) + _swiglu(x, state, f"{prefix}.shared_experts")


@torch.no_grad()
def reference_logits(
    state: dict[str, torch.Tensor], config: dict, ids: torch.Tensor, kept: dict[int, list[int]] | None = None
) -> torch.Tensor:
    """Logits of the published architecture; ``kept`` restricts layer i's router to those experts (pruning)."""
    eps = config["rms_norm_eps"]
    h = state["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = h + _attention(_rms(h, state[f"{p}.input_layernorm.weight"], eps), state, f"{p}.self_attn", config)
        x = _rms(h, state[f"{p}.post_attention_layernorm.weight"], eps)
        dense = i < config["first_k_dense_replace"] or i % config["moe_layer_freq"] != 0
        h = h + (_swiglu(x, state, f"{p}.mlp") if dense else _moe(x, state, f"{p}.mlp", config, (kept or {}).get(i)))
    return _rms(h, state["model.norm.weight"], eps) @ state["lm_head.weight"].T
