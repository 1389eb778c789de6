"""The adapter table and duck typing: unknown MoEs of the common shape work, anything else is refused clearly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from moeprune.arch import ARCHITECTURES, moe_layers, spec_for
from moeprune.errors import MoePruneError
from moeprune.planning.mask import ExpertMask, LayerMask
from moeprune.profiling.instrument import StatsRecorder
from moeprune.surgery import export_pruned
from tests.tiny_models import ARCH_NAMES, build_model


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_tiny_architecture_has_a_table_row(arch):
    model = build_model(arch)
    spec = spec_for(model.config)
    assert spec is ARCHITECTURES[arch]
    assert getattr(model.config, spec.num_experts_key) == 8


def test_unknown_model_type_of_the_common_shape_works_by_duck_typing(tmp_path):
    model = build_model("qwen3_moe")
    model.config.model_type = "acme_moe"  # not in the table
    spec = spec_for(model.config)
    assert spec.name == "generic:acme_moe" and spec.num_experts_key == "num_experts"
    layers = moe_layers(model)
    assert [layer.index for layer in layers] == [0, 1, 2] and layers[0].spec.layout == "fused"
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        recorder = StatsRecorder(layers)
        with recorder.installed():
            observed = model(ids).logits
    torch.testing.assert_close(observed, reference, rtol=0, atol=1e-5)
    assert recorder.take().count.sum() == 2 * 10 * 2 * 3  # tokens x top-2 x 3 layers
    mask = ExpertMask("acme", "random", 0.5, 8, 4, {i: LayerMask([0, 2, 5, 7]) for i in range(3)})
    model.config.model_type = "qwen3_moe"  # so transformers can reload the export it verifies against
    model.name_or_path = str(tmp_path)  # a local source without a tokenizer: no lookup on the hub
    export_pruned(model, mask, tmp_path / "out", progress=False)


def _dense_config() -> Qwen2Config:
    """A tiny dense (non-MoE) decoder config."""
    return Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )


def test_config_without_an_expert_count_is_not_a_moe():
    config = _dense_config()
    with pytest.raises(MoePruneError, match="not a supported MoE.*expert-count keys"):
        spec_for(config)


def test_expert_count_but_no_recognisable_blocks_names_what_was_missing():
    config = _dense_config()
    model = AutoModelForCausalLM.from_config(config)
    model.config.num_experts = 8  # claims to be an MoE, but its MLPs have no router or experts
    with pytest.raises(MoePruneError, match=r"no MoE layer.*router \['gate', 'router'\].*experts"):
        moe_layers(model)
