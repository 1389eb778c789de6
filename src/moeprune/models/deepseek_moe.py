"""DeepSeek-MoE (``model_type: deepseek``, e.g. deepseek-ai/deepseek-moe-16b-base) written for transformers 5.

The hub ships this architecture only as remote code written for transformers 4.36, which no longer runs
(see docs/deepseek_moe.md). This port is moeprune's own implementation of the published architecture:

- a Llama decoder (transformers' ``LlamaAttention``, ``LlamaRMSNorm``, ``LlamaRotaryEmbedding`` and the
  ``LlamaModel``/``LlamaForCausalLM`` forward, so attention backends, caches and generation are transformers');
- the first ``first_k_dense_replace`` layers (and layers off ``moe_layer_freq``) keep a dense SwiGLU MLP;
- the others a :class:`DeepseekMoE` block: a softmax router (:class:`MoEGate`), greedy top-k, weights
  renormalised only if ``norm_topk_prob``, routed SwiGLU experts in an ``nn.ModuleList`` and the
  ``n_shared_experts`` shared experts as one MLP of width ``n_shared_experts * moe_intermediate_size``.

Module and parameter names are those of the hub checkpoints (``mlp.gate.weight``,
``mlp.experts.{j}.gate_proj.weight``, ``mlp.shared_experts.*``, ...), so hub weights load unchanged and a
saved model loads again with the original code. The config serialises in the original format
(``rope_theta``, ``rope_scaling``, ``torch_dtype``), which transformers 4.x and vLLM read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedConfig
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

# The RoPE variants the original code implements (rope_scaling["type"]); transformers computes each of them.
LEGACY_ROPE_TYPES = ("default", "linear", "dynamic")


class DeepseekConfig(PreTrainedConfig):
    """The fields (and defaults) of the hub's ``configuration_deepseek.DeepseekConfig``."""

    model_type = "deepseek"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 10_000.0

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    # Read from the legacy ``rope_theta``/``rope_scaling`` keys by transformers and written back as them.
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | None = 0.0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.scoring_func != "softmax":
            raise ValueError(f"DeepseekConfig: scoring_func {self.scoring_func!r} is not supported; use 'softmax'.")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in LEGACY_ROPE_TYPES:
            raise ValueError(
                f"DeepseekConfig: rope_scaling type {rope_type!r} is not one the original code supports "
                f"{list(LEGACY_ROPE_TYPES)[1:]}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The original config.json format: ``rope_theta``/``rope_scaling``/``torch_dtype`` instead of
        transformers 5's ``rope_parameters``/``dtype``, so the original code and vLLM read the same model."""
        output = super().to_dict()
        rope = dict(output.pop("rope_parameters", None) or {})
        output["rope_theta"] = rope.pop("rope_theta", self.default_theta)
        rope_type = rope.pop("rope_type", "default")
        rope.pop("type", None)
        output["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
        dtype = output.pop("dtype", None)
        if dtype is not None:
            output["torch_dtype"] = dtype
        if output.get("pad_token_id", 0) is None:  # the hub config has no pad token
            del output["pad_token_id"]
        return output


class DeepseekMLP(nn.Module):
    """SwiGLU feed-forward: the dense layers, each routed expert and the shared experts."""

    def __init__(self, config: DeepseekConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, size, bias=False)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Softmax router: ``[batch, seq, hidden]`` -> (expert index ``[T, k]``, weight ``[T, k]``, aux loss None).

    Logits and softmax run in the model's dtype, as in the original; top-k is greedy over all experts.
    """

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        logits = F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]), self.weight)
        scores = logits.softmax(dim=-1)
        weights, index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return index, weights, None


class DeepseekMoE(nn.Module):
    """Routed experts plus always-on shared experts. Routing goes through :meth:`moe_infer`, the seam
    moeprune's profiler replaces (the original block has the same method and signature)."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.num_experts_per_tok = config.num_experts_per_tok
        self.experts = nn.ModuleList(
            [DeepseekMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)]
        )
        self.gate = MoEGate(config)
        self.shared_experts = (
            DeepseekMLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        index, weights, _ = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = self.moe_infer(flat, index.reshape(-1), weights.reshape(-1, 1)).view(hidden_states.shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out

    def moe_infer(
        self, x: torch.Tensor, flat_expert_indices: torch.Tensor, flat_expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """Sum over (token, slot) pairs of weight * expert(token); pair ``p`` belongs to token ``p // k``."""
        out = torch.zeros_like(x)
        order = torch.argsort(flat_expert_indices, stable=True)
        counts = torch.bincount(flat_expert_indices, minlength=len(self.experts)).tolist()  # one host sync
        start = 0
        for expert, count in enumerate(counts):
            if count:
                pairs = order[start : start + count]
                tokens = pairs // self.num_experts_per_tok
                routed = self.experts[expert](x[tokens]) * flat_expert_weights[pairs]
                out.index_add_(0, tokens, routed.to(out.dtype))
                start += count
        return out


def is_moe_layer(config: DeepseekConfig, layer_idx: int) -> bool:
    """The original rule: MoE from layer ``first_k_dense_replace`` on, every ``moe_layer_freq``-th layer."""
    return (
        config.n_routed_experts is not None
        and layer_idx >= config.first_k_dense_replace
        and layer_idx % config.moe_layer_freq == 0
    )


class DeepseekDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer (pre-norm attention + feed-forward, same forward) whose MLP may be an MoE."""

    def __init__(self, config: DeepseekConfig, layer_idx: int) -> None:
        super(LlamaDecoderLayer, self).__init__()  # build our own submodules instead of Llama's MLP
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = DeepseekMoE(config) if is_moe_layer(config, layer_idx) else DeepseekMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DeepseekPreTrainedModel(LlamaPreTrainedModel):
    config: DeepseekConfig
    config_class = DeepseekConfig
    _no_split_modules = ["DeepseekDecoderLayer"]
    _can_record_outputs = {"hidden_states": DeepseekDecoderLayer, "attentions": LlamaAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MoEGate):  # a bare Parameter, which the generic initialiser does not know
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class DeepseekModel(DeepseekPreTrainedModel, LlamaModel):
    """``LlamaModel`` (its forward: embeddings, causal mask, rotary, layers, final norm) with DeepSeek layers."""

    def __init__(self, config: DeepseekConfig) -> None:
        DeepseekPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DeepseekForCausalLM(DeepseekPreTrainedModel, LlamaForCausalLM):
    """``LlamaForCausalLM`` (forward, loss, generation) over :class:`DeepseekModel`."""

    def __init__(self, config: DeepseekConfig) -> None:
        DeepseekPreTrainedModel.__init__(self, config)
        self.model = DeepseekModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
