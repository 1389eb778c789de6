"""The hard-coded "published" configs agree with the published files that could be read, and with each other.

No hub is reachable here. The values below were read from stored copies of public files (see
docs/benchmarks.md, "Which config values were checked"); each constant names its source. Where a field could
not be checked against a copy of the real file, the test says so instead of asserting it.
"""

from __future__ import annotations

import pytest
from transformers import Qwen2MoeConfig

from benchmarks.paper_scale import DEEPSEEK_MOE_16B, QWEN15_MOE_A27B
from moeprune.models.deepseek_moe import DeepseekConfig
from tests.deepseek_checkpoint import DEEPSEEK_MOE_16B_CONFIG

# Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4's config.json (the released sibling of the base model: same
# architecture, chat weights quantised), every field as a stored verbatim dump of it shows them, without its
# quantization_config. Source: a stored markdown dump titled "Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4 / model
# config" (code-search index file id 11134031260; the index did not report its repository).
QWEN15_MOE_A27B_CHAT_GPTQ_INT4 = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "decoder_sparse_step": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.39.0.dev0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# Fields where the base and the chat/GPTQ checkpoints differ by construction, so the sibling cannot check
# them. max_position_embeddings 8192 for the base is corroborated by a model table that cites the base
# config.json (hidden 2048, 60 experts top-4, max_model_len 8*1024, sliding_window 32*1024); eos_token_id,
# torch_dtype and transformers_version of the base file were found in no stored copy.
BASE_ONLY_FIELDS = {"eos_token_id", "max_position_embeddings", "torch_dtype", "transformers_version"}

# The keys of deepseek-ai/deepseek-moe-16b-base's config.json, from a verbatim paste of that file (auto_map,
# torch_dtype and transformers_version 4.36.0 included) in BudEcosystem/simulator
# BudSimulator/model_param_test.py @ f4880392a25783611a749ed6fe87170708879f8f (test_deepseek_v3_counting);
# every value there equals DEEPSEEK_MOE_16B_CONFIG's. The file has no aux_loss_alpha and no seq_aux: those
# come from configuration_deepseek.py's defaults (0.001, True).
PUBLISHED_16B_KEYS = {
    "architectures", "attention_bias", "attention_dropout", "auto_map", "bos_token_id", "eos_token_id",
    "first_k_dense_replace", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
    "max_position_embeddings", "model_type", "moe_intermediate_size", "moe_layer_freq", "n_routed_experts",
    "n_shared_experts", "norm_topk_prob", "num_attention_heads", "num_experts_per_tok", "num_hidden_layers",
    "num_key_value_heads", "pretraining_tp", "rms_norm_eps", "rope_scaling", "rope_theta", "scoring_func",
    "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache", "vocab_size",
}  # fmt: skip

# The defaults of the hub's configuration_deepseek.py (DeepseekConfig.__init__, "lines 107-149"), as quoted
# by a stored analysis of deepseek-ai/DeepSeek-MoE (code-search index file id 42455407270). The port's
# DeepseekConfig must have the same defaults: a config.json that omits a field means the default.
HUB_DEEPSEEK_CONFIG_DEFAULTS = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "num_experts_per_tok": None,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
}


def test_qwen_config_matches_its_published_sibling_outside_the_base_only_fields() -> None:
    assert set(QWEN15_MOE_A27B) == set(QWEN15_MOE_A27B_CHAT_GPTQ_INT4)
    differing = {k for k in QWEN15_MOE_A27B if QWEN15_MOE_A27B[k] != QWEN15_MOE_A27B_CHAT_GPTQ_INT4[k]}
    assert differing == BASE_ONLY_FIELDS
    assert QWEN15_MOE_A27B["max_position_embeddings"] == 8192


def test_qwen_window_fields_do_not_change_the_model_transformers_builds() -> None:
    """use_sliding_window is false, so max_window_layers and sliding_window select no sliding layer: every
    layer attends fully and every layer is sparse (decoder_sparse_step 1, no mlp_only_layers)."""
    metadata = ("architectures", "model_type", "transformers_version")
    fields = {k: v for k, v in QWEN15_MOE_A27B.items() if k not in metadata}
    config = Qwen2MoeConfig(**fields)
    assert config.layer_types == ["full_attention"] * 24
    assert config.mlp_only_layers == [] and config.decoder_sparse_step == 1
    assert config.rope_parameters["rope_theta"] == 1_000_000.0


def test_deepseek_16b_config_has_exactly_the_published_keys() -> None:
    """A key the real file lacks (aux_loss_alpha, seq_aux were here) would let a reader that needs it pass."""
    assert set(DEEPSEEK_MOE_16B_CONFIG) == PUBLISHED_16B_KEYS


def test_the_benchmark_builds_the_published_16b_config_without_remote_code() -> None:
    """paper_scale writes a folder without code files: the published config less its auto_map."""
    assert DEEPSEEK_MOE_16B == {k: v for k, v in DEEPSEEK_MOE_16B_CONFIG.items() if k != "auto_map"}


@pytest.mark.parametrize("field", sorted(HUB_DEEPSEEK_CONFIG_DEFAULTS))
def test_port_config_defaults_are_the_hub_configuration_defaults(field: str) -> None:
    written = DeepseekConfig().to_dict()
    value = written.get(field, getattr(DeepseekConfig(), field, None))
    assert value == HUB_DEEPSEEK_CONFIG_DEFAULTS[field], field


def test_published_16b_config_survives_the_port_field_for_field() -> None:
    """Read and written back by the port's DeepseekConfig, every published field keeps its value."""
    written = DeepseekConfig.from_dict(DEEPSEEK_MOE_16B_CONFIG).to_dict()
    changed = {k for k, v in DEEPSEEK_MOE_16B_CONFIG.items() if written.get(k) != v}
    assert changed == {"transformers_version"}
