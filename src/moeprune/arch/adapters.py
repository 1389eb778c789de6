"""Supported MoE architectures, described as data.

Every supported model is a decoder whose MoE blocks hold a *router* (a module with a
``[rows, hidden]`` weight, rows >= the routed-expert count) and routed *experts* in one of these layouts:

- ``fused``: 3D tensors with the expert on dim 0 (transformers-native ``experts.gate_up_proj [E, 2I, H]``
  and ``experts.down_proj [E, H, I]``, or ungated ``up_proj``), called as
  ``experts(hidden, top_k_index, top_k_weights)``;
- ``modulelist``: ``experts`` is an ``nn.ModuleList`` of MLPs with ``gate_proj/up_proj/down_proj``,
  as in DeepSeek-MoE-16B's remote code, whose block routes through ``block.moe_infer(x,
  flat_expert_indices, flat_expert_weights)``;
- ``scaled_inputs`` (Llama 4): 3D tensors, every expert run on score-scaled inputs ``experts(score * h)``;
- ``flat`` (DBRX): ``[E * I, H]`` matrices, expert e owning rows ``e*I .. (e+1)*I - 1``.

Adding an architecture is one :class:`ArchSpec` row in :data:`ARCHITECTURES`. A model type not in
the table is still accepted when it has the common shape (see :func:`spec_for` and
:mod:`moeprune.arch.view`); :data:`REFUSED` names the ones that cannot be pruned exactly, with why.
docs/support_matrix.md lists every MoE causal LM of transformers and its status.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from moeprune.errors import BrokenConfig, MoePruneError

# Config keys that hold the routed-expert count, in the order we look for them.
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "moe_topk", "moe_k", "top_k_experts", "top_k")
BLOCK_ATTRS = ("mlp", "block_sparse_moe", "moe", "feed_forward", "mixer", "ffn")
# Names of the base model's list of decoder layers (DBRX: transformer.blocks).
DECODER_LISTS = ("layers", "blocks")
ROUTER_ATTRS = ("gate", "router")
# A router module without its own weight holds the [N, hidden] linear under one of these (dotted) names
# (HunYuan gate.wg, AFMoE router.gate, LongCat router.classifier, Gemma 4 router.proj, ZAYA's router MLP,
# Ergo gate.linear).
ROUTER_LINEARS = ("wg", "gate", "classifier", "proj", "layer", "router_mlp.out_proj", "linear")
# Buffers of hash-routed layers: a frozen token id -> expert ids table (DeepSeek-V4 hash_moe layers).
HASH_TABLES = ("tid2eid",)
# Config keys of group-limited routing (DeepSeek-V3 and its many relatives: GLM-4.5, dots1, Kimi, ...).
GROUP_KEYS = ("n_group", "num_expert_group")
TOPK_GROUP_KEYS = ("topk_group",)


@dataclass(frozen=True)
class ArchSpec:
    """How to find and edit the routed experts of one architecture."""

    name: str
    num_experts_key: str  # the config key written when the expert count changes
    routing: str  # rule name in moeprune.arch.routing, used to re-route with cached logits
    # "fused" | "modulelist" | "scaled_inputs" (Llama 4) | "flat" (DBRX: [N * I, H] matrices, fused otherwise)
    layout: str = "fused"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    top_k_key: str = "num_experts_per_tok"
    # Per-expert router vectors (documentation: surgery slices every per-expert vector of the block).
    router_vectors: tuple[str, ...] = ("bias",)
    # Config keys with routing groups (DeepSeek): the kept count must split evenly over them.
    group_key: str | None = None
    topk_group_key: str | None = None
    # Submodules that are not routed experts and are never scored or pruned (documentation).
    shared: tuple[str, ...] = ()
    # Slots per (token, expert) pair when profiling calls the fused experts: 2 adds a zero-weight slot for
    # experts forwards that squeeze a single slot away (LongCat-Flash).
    call_slots: int = 1
    # Router logits computed in float32 whatever the model dtype (the DeepSeek rules always do; see routing.py).
    fp32_logits: bool = False
    # The router weight is rounded to the model dtype before that float32 product (Ergo keeps it in float32 but
    # multiplies bf16-rounded operands, accumulating in float32).
    round_router_weight: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        # Qwen1.5-MoE: 60 experts top-4, shared expert with a sigmoid gate, norm_topk_prob false.
        ArchSpec("qwen2_moe", "num_experts", "softmax_topk", shared=("shared_expert", "shared_expert_gate")),
        ArchSpec("qwen3_moe", "num_experts", "softmax_topk"),
        ArchSpec("olmoe", "num_experts", "softmax_topk"),
        # Mixtral renormalises the top-k weights unconditionally.
        ArchSpec("mixtral", "num_local_experts", "softmax_topk_renorm"),
        ArchSpec(
            "deepseek_v2",
            "n_routed_experts",
            "deepseek_v2",
            group_key="n_group",
            topk_group_key="topk_group",
            shared=("shared_experts",),
        ),
        # Sigmoid scores, e_score_correction_bias, group-limited top-k over n_group groups.
        ArchSpec(
            "deepseek_v3",
            "n_routed_experts",
            "deepseek_v3",
            router_vectors=("bias", "e_score_correction_bias"),
            group_key="n_group",
            topk_group_key="topk_group",
            shared=("shared_experts",),
        ),
        # Llama 4: every expert runs on score-scaled inputs (experts(score * h)); profiling observes the router.
        # No reconstruction routing rule ("llama4" is unknown to moeprune.arch.routing).
        ArchSpec("llama4_text", "num_local_experts", "llama4", layout="scaled_inputs", router_attr="router"),
        # DBRX: blocks[i].ffn.{router.layer, experts.mlp.w1/v1/w2 [N * I, H]}; counts nested in ffn_config.
        # Top-k weights divided by their p-norm, p = moe_normalize_expert_weights (1 in DBRX: renormalised).
        ArchSpec("dbrx", "ffn_config.moe_num_experts", "softmax_topk_renorm", layout="flat", router_attr="router",
                 top_k_key="ffn_config.moe_top_k"),
        # Zero-compute (identity) experts sit in router rows N..N+Z-1 and are never pruned.
        ArchSpec("longcat_flash", "n_routed_experts", "softmax_topk", router_attr="router", call_slots=2),
        # Ergo: sigmoid router gate.linear (float32 output of bf16-rounded operands) with gate.e_score_correction_bias,
        # renormalised, times moe_routed_scaling_factor; ungated transposed experts (up_proj [E, H, I], down_proj
        # [E, I, H]) followed by a per-expert RMSNorm (experts.post_expert_norm.weight [E, H], part of f_e: it acts on
        # each route before the router weight); a shared expert.
        ArchSpec("ergo", "num_experts", "sigmoid_topk_renorm", router_vectors=("e_score_correction_bias",),
                 shared=("shared_experts",), fp32_logits=True, round_router_weight=True),
        # DeepSeek-MoE-16B (trust_remote_code): ModuleList experts routed by block.moe_infer.
        ArchSpec("deepseek", "n_routed_experts", "deepseek_moe", layout="modulelist", shared=("shared_experts",)),
    )
}


# Routing rule (moeprune.arch.routing) of model types without their own row, found exact by the
# reconstruction guard (moeprune.reconstruction.guard) on tiny models, group-limited routing included
# (topk_group < n_group). A duck-typed type not listed gets softmax_topk; the guard refuses
# expert-sparsity wherever that is not its router (docs/expert_sparsity.md lists which).
_SIGMOID_BIASED = (  # DeepSeek-V3's router: sigmoid, e_score_correction_bias, top-2-sum groups, renorm, scale
    "axk1", "axk2", "bailing_hybrid", "deepseek_v32", "dots1", "dots3_note_text", "exaone_moe", "glm4_moe",
    "glm4_moe_lite", "glm_moe_dsa", "hy_v4", "kimi_linear", "lfm2_moe", "mimo_v2_flash", "minicpm5_moe", "nemotron_h",
    "param2moe", "sarvam_mla", "sarvam_moe", "solar_open",
)
# The same without groups, always renormalised, scaled by routed_scaling_factor/router_scaling_factor/route_scale.
_SIGMOID_RENORMALISED = ("afmoe", "hy_v3", "minimax_m2")
_RENORMALISED = (  # softmax, top-k, always renormalised (or top-k logits then softmax: the same weights)
    "aria_text", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe",
    "minimax", "qwen3_5_moe_text",
    "gpt_oss",  # top-k of the (biased) logits, then softmax over those k: the same weights
)
ROUTING_RULES: dict[str, str] = {
    **dict.fromkeys(_SIGMOID_BIASED, "deepseek_v3"),
    **dict.fromkeys(_RENORMALISED, "softmax_topk_renorm"),
    **dict.fromkeys(_SIGMOID_RENORMALISED, "sigmoid_topk_renorm"),
}
# Softmax routers that compute their logits in float32 in a bf16/fp16 model (the guard tells them apart in bf16).
FP32_LOGITS = frozenset({"lara_mini", "hy_v3"})


# MoE model types moeprune refuses, each with the reason (tests/test_architecture_sweep.py holds the list
# to what the installed transformers builds; docs/support_matrix.md shows it).
REFUSED: dict[str, str] = {
    "jetmoe": (
        "JetMoE's attention is a mixture of experts too (MoA) and shares config.num_local_experts with the MLP "
        "experts, so one config count cannot describe a model whose MLP experts were pruned"
    ),
    "doge": (
        "Doge's experts are product-key embeddings (down_embed/up_embed rows chosen through a sqrt(N) x sqrt(N) "
        "key grid), not routed expert MLPs: removing one expert breaks the key grid"
    ),
}


def spec_for(config) -> ArchSpec:
    """The table row for ``config.model_type``, or a duck-typed row for an unknown MoE of the common shape."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise MoePruneError(f"moeprune cannot prune {model_type} exactly: {REFUSED[model_type]}. Use another model.")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    key = next((k for k in NUM_EXPERTS_KEYS if isinstance(getattr(config, k, None), int)), None)
    if key is None:
        raise MoePruneError(
            f"Model type {model_type!r} is not a supported MoE: its config has none of the expert-count keys "
            f"{list(NUM_EXPERTS_KEYS)}. If it is an MoE, add an ArchSpec row to moeprune.arch.adapters.ARCHITECTURES."
        )
    top_k_key = next((k for k in TOP_K_KEYS if isinstance(getattr(config, k, None), int)), TOP_K_KEYS[0])
    # softmax_topk honours config.norm_topk_prob, the common switch among such models.
    rule = ROUTING_RULES.get(model_type, "softmax_topk")
    group_key = next((k for k in GROUP_KEYS if isinstance(getattr(config, k, None), int)), None)
    return ArchSpec(f"generic:{model_type}", key, rule, top_k_key=top_k_key,
                    group_key=group_key if rule == "deepseek_v3" else None, fp32_logits=model_type in FP32_LOGITS)


def routing_groups(config) -> tuple[int, int] | None:
    """(n_group, topk_group) when the router picks groups of experts first, else None.

    Read from the config whatever the table row says: group-limited routing appears in many families
    beyond DeepSeek (glm4_moe, dots1, kimi_linear, ...). DeepSeek-V2's ``topk_method="greedy"`` ignores
    its groups.
    """
    n_group = next((getattr(config, k) for k in GROUP_KEYS if isinstance(getattr(config, k, None), int)), 1)
    if n_group <= 1 or getattr(config, "topk_method", None) == "greedy":
        return None
    topk_group = next((getattr(config, k) for k in TOPK_GROUP_KEYS if isinstance(getattr(config, k, None), int)),
                      n_group)
    return n_group, topk_group


def routing_meta(config: Any) -> dict[str, Any]:
    """Expert count, top-k and routing groups from a config (an object or a config.json dict)."""
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    spec = spec_for(config)
    top_k = config_value(config, spec.top_k_key)
    groups = routing_groups(config)  # any family's n_group/topk_group; None for DeepSeek-V2's greedy top-k
    _check_counts(config_value(config, spec.num_experts_key), top_k, spec)
    return {
        "num_experts_key": spec.num_experts_key,
        "num_experts": config_value(config, spec.num_experts_key),
        "top_k": top_k if isinstance(top_k, int) else None,
        "n_group": groups[0] if groups else None,
        "topk_group": groups[1] if groups else None,
        "model_type": getattr(config, "model_type", None),
    }


def check_routing_counts(config: Any) -> None:
    """For any config moeprune reads (loading.load_config): an MoE's expert count and top-k are possible (see
    _check_counts); configs that are no MoE moeprune knows are left to the checks that need one."""
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    try:
        spec = spec_for(config)
    except MoePruneError:
        return
    _check_counts(config_value(config, spec.num_experts_key), config_value(config, spec.top_k_key), spec)


def _check_counts(num_experts: Any, top_k: Any, spec: ArchSpec) -> None:
    """The config's expert count is a positive whole number and its top-k lies in 1..N: a router choosing 0
    experts, or more than there are, is a broken config (transformers would fail deep inside a forward)."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key, value in ((spec.num_experts_key, num_experts), (spec.top_k_key, top_k)):
        if value is not None and not whole(value):  # configs without transformers' typing (remote code, ports)
            raise BrokenConfig(f"The model's config.json says {key}={value!r}: it must be a whole number; fix "
                                "config.json (or re-download the checkpoint).")
    if whole(num_experts) and num_experts < 1:
        raise BrokenConfig(f"The model's config.json says {spec.num_experts_key}={num_experts}: no routed experts; "
                            "fix config.json (or re-download the checkpoint).")
    if whole(top_k) and whole(num_experts) and not 1 <= top_k <= num_experts:
        raise BrokenConfig(
            f"The model's config.json says {spec.top_k_key}={top_k} with {num_experts} experts; the router must "
            f"choose between 1 and {num_experts} experts per token. Fix config.json (or re-download the checkpoint)."
        )


def config_value(config, key: str):
    """``config.<key>``, where ``key`` may be dotted into a nested config (``ffn_config.moe_num_experts``)."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else getattr(config, part, None)
    return config


def set_config_value(config, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config[part] if isinstance(config, dict) else getattr(config, part)
    if isinstance(config, dict):
        config[last] = value
    else:
        setattr(config, last, value)
