"""Exact search equals brute force computed the slow way; greedy+swap is sound; groups are respected."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from moeprune.arch.routing import route
from moeprune.arch.view import moe_layers
from moeprune.reconstruction.search import (
    elimination_path,
    exact_search,
    greedy_elimination,
    greedy_swap_search,
    mask_count,
    search_layer,
    search_layer_many,
    swap_refinement,
)
from tests.reconstruction.test_reconstruction_loss import problems_for


def slow_losses(layer, config, hidden: torch.Tensor, masks: list[tuple[int, ...]]) -> dict:
    """||Z - Z_kept|| from every expert's output and route(), no Gram: sum_j w_j f_{e_j}(x) per token."""
    with torch.no_grad():
        outputs = torch.stack([layer.expert_forward(e, hidden) for e in range(layer.num_experts)], dim=1)
        logits = torch.nn.functional.linear(hidden, layer.router.weight).float()
        rows = torch.arange(hidden.shape[0])[:, None]

        def routed(ids):
            index, weights = route(layer, config, logits, ids)
            return (outputs[rows, index] * weights[..., None]).sum(dim=1)

        dense = routed(None)
        return {m: float((dense - routed(list(m))).double().norm()) for m in masks}


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_exact_search_equals_brute_force(arch: str, tmp_path: Path) -> None:
    model, inputs, problems = problems_for(arch, tmp_path)
    layer = moe_layers(model)[0]
    problem = problems[layer.index]
    for k in range(2, 7):
        brute = slow_losses(layer, model.config, inputs[layer.index], list(itertools.combinations(range(8), k)))
        best = min(brute, key=lambda m: (brute[m], m))
        result = exact_search(problem, k)
        assert result.evaluations == len(brute)
        assert result.loss == pytest.approx(brute[best], rel=1e-4)
        # The argmin itself, unless a different mask is within rounding of the optimum.
        runner_up = min(v for m, v in brute.items() if m != best)
        if runner_up > brute[best] * (1 + 1e-4):
            assert tuple(result.kept) == best


def test_greedy_swap_sound_and_exact_on_easy_case(tmp_path: Path) -> None:
    model, _, problems = problems_for("mixtral", tmp_path)
    for problem in problems.values():
        for k in (2, 4, 6):
            exact = exact_search(problem, k)
            _, greedy_loss, _ = greedy_elimination(problem, k)
            refined = greedy_swap_search(problem, k)
            assert exact.loss <= refined.loss * (1 + 1e-9)
            assert refined.loss <= greedy_loss * (1 + 1e-9)
            assert refined.loss == pytest.approx(problem.loss(refined.kept), rel=1e-9)
    # Keeping all but one expert: greedy elimination tries every single removal, so it is exact.
    problem = next(iter(problems.values()))
    assert greedy_swap_search(problem, 7).kept == exact_search(problem, 7).kept


def test_swap_refinement_improves_a_bad_start_to_the_optimum_on_n8(tmp_path: Path) -> None:
    _, _, problems = problems_for("olmoe", tmp_path)
    problem = next(iter(problems.values()))
    losses = {m: float(v) for m, v in zip(itertools.combinations(range(8), 4),
                                            problem.losses(list(itertools.combinations(range(8), 4))), strict=True)}
    worst = max(losses, key=losses.get)
    kept, loss, swaps, _ = swap_refinement(problem, list(worst), losses[worst])
    assert swaps >= 1 and loss < losses[worst]
    assert loss == pytest.approx(problem.loss(kept), rel=1e-9)


def test_search_layer_switches_to_greedy_above_limit(tmp_path: Path) -> None:
    _, _, problems = problems_for("qwen3_moe", tmp_path)
    problem = next(iter(problems.values()))
    assert search_layer(problem, 4).search == "exact"
    limited = search_layer(problem, 4, exact_limit=mask_count(8, 4) - 1)
    assert limited.search == "greedy+swap" and len(limited.kept) == 4


def test_grouped_search_keeps_k_per_group(tmp_path: Path) -> None:
    _, _, problems = problems_for("deepseek_v3", tmp_path)
    for problem in problems.values():
        assert problem.num_groups == 2
        for k in (4, 6):
            exact = exact_search(problem, k)
            assert exact.evaluations == mask_count(8, k, 2)
            refined = greedy_swap_search(problem, k)
            for result in (exact, refined):
                assert sum(e < 4 for e in result.kept) == k // 2
            assert exact.loss <= refined.loss * (1 + 1e-9)


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])  # ungrouped: one shared path; grouped: one per K
def test_shared_elimination_path_equals_separate_greedy_per_k(arch: str, tmp_path: Path) -> None:
    _, _, problems = problems_for(arch, tmp_path)
    problem = next(iter(problems.values()))
    ks = [2, 4, 7] if problem.num_groups == 1 else [4, 6]
    shared = search_layer_many(problem, ks, exact_limit=0)  # greedy+swap for every K
    for k in ks:
        separate = greedy_swap_search(problem, k)
        assert shared[k] == separate, k  # same mask, loss, evaluations and swaps
        assert shared[k].search == "greedy+swap"
    mixed = search_layer_many(problem, ks, exact_limit=mask_count(8, ks[-1], problem.num_groups))
    assert mixed[ks[-1]] == exact_search(problem, ks[-1]) and mixed[ks[0]] == shared[ks[0]]


def test_elimination_path_passes_through_every_size(tmp_path: Path) -> None:
    _, _, problems = problems_for("mixtral", tmp_path)
    problem = next(iter(problems.values()))
    path = elimination_path(problem, 2)
    assert sorted(path) == list(range(2, 9))
    for size in range(2, 8):  # each step removes one expert of the previous set
        assert set(path[size][0]) < set(path[size + 1][0]) and len(path[size][0]) == size
        assert path[size][:2] == greedy_elimination(problem, size)[:2]
