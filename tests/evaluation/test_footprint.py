"""Footprint counts routed-expert parameters by hand-checkable formulas."""

from __future__ import annotations

import pytest

from moeprune.evaluation.footprint import compare_footprints, footprint
from tests.tiny_models import COMMON, build_model


def fused_expert_params(num_experts: int, hidden: int, inter: int) -> int:
    return num_experts * (2 * inter * hidden + hidden * inter)  # gate_up [E, 2I, H] + down [E, H, I]


def test_qwen2_moe_counts():
    model = build_model("qwen2_moe", num_experts=8)
    got = footprint(model)
    moe_layers = COMMON["num_hidden_layers"] - 1  # layer 1 is dense (mlp_only_layers=[1])
    assert got["params_routed_experts"] == moe_layers * fused_expert_params(8, COMMON["hidden_size"], 16)
    assert got["params_total"] == sum(p.numel() for p in model.parameters())
    assert got["bytes"] == 4 * got["params_total"]  # fp32


def test_mixtral_counts_every_layer():
    got = footprint(build_model("mixtral", num_experts=4))
    hidden, inter = COMMON["hidden_size"], COMMON["intermediate_size"]
    assert got["params_routed_experts"] == COMMON["num_hidden_layers"] * fused_expert_params(4, hidden, inter)


def test_compare_halved_experts():
    dense, pruned = footprint(build_model("olmoe", num_experts=8)), footprint(build_model("olmoe", num_experts=4))
    ratio = compare_footprints(dense, pruned)
    assert ratio["params_routed_experts_ratio"] == pytest.approx(0.5)
    assert 0.5 < ratio["params_total_ratio"] < 1.0
    assert ratio["dense"] == dense and ratio["pruned"] == pruned
