"""The routing guard: expert-sparsity runs only where moeprune's routing rule reproduces the model's router."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeprune.arch import adapters
from moeprune.errors import MoePruneError
from moeprune.reconstruction import WorkDir, check_routing, reconstruction_selection
from tests import arch_sweep
from tests.tiny_models import ARCH_NAMES, build_model

TOKENS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(5))
FIX = "plan with another method, or TB-Coverage with --candidate reap"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_guard_passes_on_the_table_rows(arch: str) -> None:
    check_routing(build_model(arch), TOKENS)  # raises on any disagreement


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_guard_passes_on_a_bf16_model_at_bf16_resolution(arch: str) -> None:
    check_routing(build_model(arch).to(torch.bfloat16), TOKENS)


def test_a_wrong_renormalisation_is_refused(monkeypatch) -> None:
    # Qwen1.5-MoE keeps softmax weights unnormalised (norm_topk_prob=False): renormalising changes the weights only.
    model = build_model("qwen2_moe")
    assert model.config.norm_topk_prob is False
    wrong = dataclasses.replace(adapters.ARCHITECTURES["qwen2_moe"], routing="softmax_topk_renorm")
    monkeypatch.setitem(adapters.ARCHITECTURES, "qwen2_moe", wrong)
    with pytest.raises(MoePruneError, match=r"cannot re-route qwen2_moe's router exactly .*routing weights differ"):
        check_routing(model, TOKENS)


def test_a_sigmoid_router_on_the_softmax_rule_is_refused_before_any_capture(monkeypatch, tmp_path) -> None:
    model = arch_sweep.build_model("glm4_moe")
    check_routing(model, TOKENS)  # its row maps it to the DeepSeek-V3 rule: exact
    monkeypatch.delitem(adapters.ROUTING_RULES, "glm4_moe")  # back to the softmax_topk fallback
    with pytest.raises(MoePruneError, match=rf"cannot re-route glm4_moe's router exactly .*other experts.*{FIX}"):
        reconstruction_selection(model, TOKENS, 4, WorkDir(tmp_path, "k"), progress=False)
    assert not (tmp_path / "reconstruction").exists()  # refused before the capture pass


def test_a_block_that_transforms_the_routed_output_is_refused() -> None:
    # A.X-K1 = DeepSeek-V3's router (exact) + an RMSNorm over the block output: the Gram loss is not the block's.
    with pytest.raises(MoePruneError, match=rf"cannot reconstruct axk1's MoE output exactly .*norm.*{FIX}"):
        check_routing(arch_sweep.build_model("axk1"), TOKENS)


def test_routing_rules_name_known_rules_only() -> None:
    from moeprune.arch.routing import RULES

    assert set(adapters.ROUTING_RULES.values()) <= set(RULES)
    assert not set(adapters.ROUTING_RULES) & set(adapters.ARCHITECTURES)  # a row's own rule wins: no duplicates


def test_a_router_with_float32_logits_is_told_apart_in_bf16(monkeypatch) -> None:
    # Lara-Mini's softmax router computes its logits in float32: in a bf16 model only its row's fp32_logits
    # makes the rule's weights the model's; without it the guard sees the bf16 rounding (several bf16 ulps).
    model = arch_sweep.build_model("lara_mini").to(torch.bfloat16)
    check_routing(model, TOKENS)
    monkeypatch.setattr(adapters, "FP32_LOGITS", frozenset())
    with pytest.raises(MoePruneError, match=r"cannot re-route lara_mini's router exactly .*routing weights differ"):
        check_routing(model, TOKENS)
