"""Every MoE causal LM of the installed transformers is pruned exactly, or refused with its reason.

Each case builds a tiny random model, profiles, plans (REAP, half the experts), exports and reloads it,
and compares the reloaded logits with the dense model whose removed experts are taken out of routing
(see tests/arch_sweep.py). A new transformers release that adds, changes or drops an architecture
fails here, and docs/support_matrix.md (scripts/support_matrix.py) shows the new state.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moeprune.arch.adapters import REFUSED as ADAPTER_REFUSALS
from moeprune.arch.adapters import routing_groups
from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from moeprune.profiling.instrument import StatsRecorder
from moeprune.profiling.runner import model_meta
from moeprune.surgery import apply_mask, masked
from tests.arch_sweep import (
    build_model,
    check_model,
    moe_model_types,
    run_case,
    run_reconstruction_case,
    run_stream_case,
)
from tests.surgery import make_mask

# Refused architectures and a pattern their refusal message must match (the reason, never a traceback).
REFUSED = {
    "deepseek_v4": r"fixed token -> expert table \(tid2eid\).*cannot lose an expert that its table uses",
    "doge": r"product-key embeddings",
    "jetmoe": r"attention is a mixture of experts too",
}
MODEL_TYPES = moe_model_types()

# Architectures whose router (or MoE output) expert-sparsity's routing rules do not reproduce: the guard
# refuses them with the fix (docs/expert_sparsity.md lists them with the reason).
RECON_REFUSED = {
    "axk1", "beam", "deepseek_v4", "ernie4_5_moe", "flint", "gemma4_text", "inkling2_loop_text", "inkling2_text",
    "inkling_text", "kolibri1", "kolibri1_1", "laguna", "llama4_text", "longcat_flash", "minimax_m3_vl_text", "phimoe",
    "zaya",
}
RECON_FIX = "plan with another method, or TB-Coverage with --candidate reap"


def test_sweep_sees_the_installed_moe_models() -> None:
    assert len(MODEL_TYPES) >= 55, MODEL_TYPES
    assert set(REFUSED) <= set(MODEL_TYPES)
    assert set(ADAPTER_REFUSALS) <= set(REFUSED)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_architecture_is_exact_or_refused_with_reason(model_type: str, tmp_path: Path) -> None:
    result = run_case(model_type, tmp_path)
    if model_type in REFUSED:
        assert result.status == "refused", result
        assert re.search(REFUSED[model_type], result.reason), result.reason
    else:
        assert result.status == "exact", f"{model_type}: {result.status}: {result.reason}"


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if t not in ADAPTER_REFUSALS])
def test_expert_sparsity_is_exact_or_refused_by_the_routing_guard(model_type: str, tmp_path: Path) -> None:
    # "exact": the guard passes and every layer's reconstruction loss (cached logits + Gram) equals the norm of
    # the model's own MoE block output change when the removed experts leave routing, to 1e-4 relative.
    result = run_reconstruction_case(model_type, tmp_path)
    if model_type in RECON_REFUSED:
        assert result.status == "refused" and RECON_FIX in result.reason, result
        assert re.search(rf"cannot (re-route|reconstruct) {model_type}'s", result.reason), result.reason
    else:
        assert result.status == "exact", f"{model_type}: {result.status}: {result.reason}"


def test_hash_routed_layer_keeps_exact_when_its_table_uses_only_kept_experts(tmp_path: Path) -> None:
    # DeepSeek-V4's layer 0 routes by a token -> experts table; if the table only names experts 1, 3, 5, 6,
    # REAP keeps exactly those there, and the table is renumbered to the kept experts' new ids.
    model = build_model("deepseek_v4")
    table = moe_layers(model)[0].router.tid2eid
    table.copy_(torch.tensor([1, 3, 5, 6])[torch.randint(0, 4, table.shape)])
    assert check_model(model, tmp_path) <= 1e-5


def test_llama4_profile_observes_the_routers_top_k_without_changing_the_output() -> None:
    # Llama 4's experts run on score-scaled inputs, so profiling observes the router instead of replacing
    # the experts' call: the logits stay the model's own and every token's top-k pairs are counted.
    model = build_model("llama4_text")
    tokens = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        recorder = StatsRecorder(moe_layers(model))
        with recorder.installed():
            observed = model(input_ids=tokens).logits
    stats = recorder.take()
    assert torch.equal(observed, expected)
    assert stats.count.sum(dim=1).tolist() == [2 * 16 * model.config.num_experts_per_tok] * len(stats.layer_ids)
    assert bool((stats.reap_sum > 0).any())


@pytest.mark.parametrize(("model_type", "groups"), [("glm4_moe", (2, 2)), ("kimi_linear", (2, 2)), ("mixtral", None)])
def test_routing_groups_come_from_the_config_whatever_the_row(model_type: str, groups) -> None:
    model = build_model(model_type)
    meta = model_meta(model)
    assert (meta["n_group"], meta["topk_group"]) == (groups or (None, None))
    assert routing_groups(model.config) == groups


def test_masked_restores_a_nested_config_count() -> None:
    model = build_model("dbrx")
    with masked(model, make_mask(model)):
        assert model.config.ffn_config.moe_num_experts == 4
        assert moe_layers(model)[0].experts.mlp.w1.shape[0] == 4 * 16
    assert model.config.ffn_config.moe_num_experts == 8
    assert moe_layers(model)[0].experts.mlp.w1.shape[0] == 8 * 16


@pytest.mark.parametrize("model_type", ["nemotron_h", "dbrx", "llama4_text", "qwen3_moe"])
def test_expert_forward_is_the_experts_own_computation(model_type: str) -> None:
    # f_e(h) run alone must equal the routed computation with the token sent to e alone at weight 1.
    layer = moe_layers(build_model(model_type))[0]
    hidden = torch.randn(5, 32)  # the sweep's tiny hidden size
    index = torch.full((5, 1), 3, dtype=torch.long)
    with torch.no_grad():
        alone = layer.expert_forward(3, hidden)
        routed = layer.unweighted_pairs(hidden, index).reshape(5, -1)
    assert alone.shape == (5, hidden.shape[1]) and torch.allclose(alone, routed, atol=1e-6)


def test_per_expert_tensor_that_cannot_be_placed_is_refused() -> None:
    model = build_model("qwen3_moe")
    block = moe_layers(model)[0].block
    block.register_buffer("expert_table", torch.zeros(8, 3))  # per-expert rows outside router and experts
    with pytest.raises(MoePruneError, match=r"mlp.expert_table|expert_table \(8, 3\) looks per-expert"):
        apply_mask(model, make_mask(model))


def test_ergo_expert_output_includes_its_per_expert_post_norm() -> None:
    # Ergo normalises each route with its expert's own RMSNorm row before the router weight multiplies it, so
    # f_e = norm_e(relu2(h @ up_e) @ down_e): REAP's |w| * ||f_e|| and the reconstruction Gram need the norm in f_e.
    layer = moe_layers(build_model("ergo"))[1]
    experts, hidden = layer.experts, torch.randn(5, 32)
    norm = experts.post_expert_norm
    assert norm.weight.shape == (8, 32) and not torch.allclose(norm.weight[3], norm.weight[4])
    projected = torch.relu(hidden @ experts.up_proj[3]).square() @ experts.down_proj[3]
    expected = torch.nn.functional.rms_norm(projected, (32,), eps=norm.eps) * norm.weight[3]
    with torch.no_grad():
        assert torch.allclose(layer.expert_forward(3, hidden), expected, atol=1e-6)


def test_ergo_router_logits_round_the_weight_as_the_model_does() -> None:
    # In bf16 Ergo keeps its router weight in float32 but multiplies bf16-rounded operands into float32 logits;
    # its choice bias sits on gate, around the gate.linear that holds the weight.
    from moeprune.arch.routing import router_bias, router_logits

    layer = moe_layers(build_model("ergo").to(torch.bfloat16))[1]
    gate = layer.router_owner
    gate.linear.weight.data = torch.randn(8, 32)  # float32, as the checkpoint loads (keep_in_fp32_modules_strict)
    hidden = torch.randn(16, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        own = gate(hidden)[0]
        unrounded = torch.nn.functional.linear(hidden.float(), gate.linear.weight)
        assert torch.equal(router_logits(layer, hidden), own) and not torch.equal(unrounded, own)
    assert torch.equal(router_bias(layer), gate.e_score_correction_bias.float())


def test_ergo_is_refused_by_model_free_apply_whose_name_rules_miss_its_post_norm(tmp_path: Path) -> None:
    # gate.linear.weight is no router name the shard rules know, so the unsliced experts.post_expert_norm.weight
    # can never be written: plain apply (above, in the sweep) is the way.
    from moeprune.surgery.shards import prune_checkpoint_files

    model = build_model("ergo")
    model.save_pretrained(tmp_path / "source")
    with pytest.raises(MoePruneError, match=r"no router weight .* Use plain `moeprune apply`"):
        prune_checkpoint_files(tmp_path / "source", make_mask(model), tmp_path / "out", progress=False)


# Architectures that do not stream, and why: their decoder layers hand the next one more than the hidden states
# (a residual or mixer state, extra positional inputs), or moeprune cannot profile them at all.
STREAM_REFUSED = {
    "doge": r"product-key embeddings",
    "jetmoe": r"attention is a mixture of experts too",
    "gemma4_text": r"more than the hidden states positionally",
    "inkling2_loop_text": r"more than the hidden states positionally",
    "inkling2_text": r"more than the hidden states positionally",
    "glm_moe_dsa": r"hand the next layer more than their hidden states",
    "hy_v4": r"hand the next layer more than their hidden states",
    "kolibri1_1": r"hand the next layer more than their hidden states",
    "zaya": r"hand the next layer more than their hidden states",
}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_streaming_is_exact_or_refused_with_reason(model_type: str, tmp_path: Path) -> None:
    """Saved and streamed back one decoder layer at a time (docs/streaming.md): the in-memory profile and logits,
    or a refusal naming the reason (the support matrix's *stream* column)."""
    result = run_stream_case(model_type, tmp_path)
    if model_type in STREAM_REFUSED:
        assert result.status == "refused", result
        assert re.search(STREAM_REFUSED[model_type], result.reason), result.reason
    else:
        assert result.status == "exact", f"{model_type}: {result.status}: {result.reason}"
