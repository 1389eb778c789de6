"""The Gram-formulated loss equals the real output difference of the physically pruned MoE block."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from moeprune.arch.view import MoELayer, moe_layers
from moeprune.reconstruction import LayerProblem, WorkDir, capture_moe_inputs
from tests.tiny_models import build_model

SAMPLES, SEQ_LEN = 4, 16


def windows(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def problems_for(arch: str, workdir: Path, num_experts: int = 8, top_k: int = 2):
    """(model, captured inputs per layer, LayerProblem per layer) of a tiny model of ``arch``."""
    model = build_model(arch, num_experts=num_experts, top_k=top_k)
    capture_moe_inputs(model, windows(model.config.vocab_size), workdir, "test", batch_size=2, progress=False)
    work = WorkDir(workdir, "test")
    inputs = {layer.index: work.load_layer(layer.index) for layer in moe_layers(model)}
    problems = {layer.index: LayerProblem.build(layer, model.config, inputs[layer.index], token_chunk=24)
                for layer in moe_layers(model)}
    return model, inputs, problems


def sliced_block(layer: MoELayer, kept: list[int]) -> nn.Module:
    """A deep copy of the MoE block with only ``kept`` routed experts, as physical pruning leaves it."""
    block = copy.deepcopy(layer.block)
    ids = torch.tensor(kept)
    router = getattr(block, layer.spec.router_attr)
    router.weight = nn.Parameter(router.weight.detach()[ids].clone())
    if hasattr(router, "e_score_correction_bias"):
        router.e_score_correction_bias = router.e_score_correction_bias[ids].clone()
    experts = getattr(block, layer.spec.experts_attr)
    if isinstance(experts, nn.ModuleList):
        setattr(block, layer.spec.experts_attr, nn.ModuleList([experts[i] for i in kept]))
    else:
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[ids].clone())
        experts.down_proj = nn.Parameter(experts.down_proj.detach()[ids].clone())
    for module in (router, experts):
        for name in ("num_experts", "n_routed_experts"):
            if hasattr(module, name):
                setattr(module, name, len(kept))
    return block


CASES = [
    ("qwen2_moe", [[0, 3, 4, 6], [1, 2, 7]]),  # shared expert with a sigmoid gate
    ("mixtral", [[0, 3, 4, 6], [2, 5, 6]]),
    ("deepseek_v3", [[1, 3, 4, 6], [0, 1, 3, 4, 5, 7]]),  # two groups of four: K/2 per group
    ("deepseek", [[0, 3, 4, 6], [1, 5, 6]]),  # remote code, ModuleList experts
]


@pytest.mark.parametrize(("arch", "masks"), CASES)
def test_loss_equals_real_difference(arch: str, masks: list[list[int]], tmp_path: Path) -> None:
    model, inputs, problems = problems_for(arch, tmp_path)
    for layer in moe_layers(model):
        hidden = inputs[layer.index].view(SAMPLES, SEQ_LEN, -1)
        with torch.no_grad():
            dense = layer.block(hidden)
            for kept in masks:
                pruned = sliced_block(layer, kept)(hidden)
                real = float((dense - pruned).double().norm())
                assert real > 0.1
                assert problems[layer.index].loss(kept) == pytest.approx(real, rel=1e-4), (layer.index, kept)


def test_batched_losses_match_single_and_full_mask_is_free(tmp_path: Path) -> None:
    _, _, problems = problems_for("olmoe", tmp_path)
    problem = next(iter(problems.values()))
    masks = [[0, 1, 2], [2, 5, 7], [1, 4, 6], [3, 6, 7]]
    batched = problem.losses(masks)
    singles = torch.tensor([problem.loss(m) for m in masks], dtype=torch.float64)
    torch.testing.assert_close(batched, singles)
    assert problem.loss(range(8)) == pytest.approx(0.0, abs=1e-6 * float(problem.dense_energy.sum().sqrt()))


def test_per_batch_loss_is_the_sum_of_each_batch_norm(tmp_path: Path) -> None:
    """NAEE's loss: sum over calibration batches (here 2 windows each) of ||Z_b - Z_kept,b||_F, by hand."""
    model, inputs, global_problems = problems_for("qwen2_moe", tmp_path)
    for layer in moe_layers(model):
        problem = LayerProblem.build(layer, model.config, inputs[layer.index], batch_tokens=2 * SEQ_LEN)
        hidden = inputs[layer.index].view(SAMPLES, SEQ_LEN, -1)
        for kept in ([0, 3, 4, 6], [1, 2, 7]):
            with torch.no_grad():
                diff = (layer.block(hidden) - sliced_block(layer, kept)(hidden)).double()
            by_hand = float(diff[:2].norm() + diff[2:].norm())
            assert problem.loss(kept) == pytest.approx(by_hand, rel=1e-4)
            assert global_problems[layer.index].loss(kept) == pytest.approx(float(diff.norm()), rel=1e-4)
            assert by_hand > float(diff.norm()) * 1.01  # the two losses differ
        singles = torch.tensor([problem.loss([0, 1, 2]), problem.loss([2, 5, 7])], dtype=torch.float64)
        torch.testing.assert_close(problem.losses([[0, 1, 2], [2, 5, 7]]), singles)
