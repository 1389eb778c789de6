"""Synthetic profiles for the planning tests: hand-made sums, no model."""

from __future__ import annotations

from typing import Any

import torch

from moeprune.profiling.stats import ExpertStats, Profile

# TB-Coverage's default candidate (expert-sparsity) needs the model; tests that plan from a profile alone
# name a profile-only one.
PROFILE_ONLY_CANDIDATE = {"candidate": "reap"}


def profile_only(method: str) -> dict[str, str]:
    """The extra plan() keywords ``method`` needs to plan from a profile alone."""
    return PROFILE_ONLY_CANDIDATE if method == "tb-coverage" else {}


def make_profile(
    scores: Any,
    counts: Any = None,
    *,
    layers: list[int] | None = None,
    top_k: int = 1,
    names: list[str] | None = None,
    **meta: Any,
) -> Profile:
    """A profile whose corpus c has REAP score ``scores[c][row][e]`` and routed count ``counts[c][row][e]``.

    ``scores`` is [C, L, N] (or [C, N] for one layer); counts default to 10 everywhere, and reap_sum is
    set to score * count so that ``reap_score()`` gives back ``scores`` exactly for these values.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() == 2:
        scores = scores.unsqueeze(1)
    counts = torch.full_like(scores, 10.0) if counts is None else torch.as_tensor(counts, dtype=torch.float64)
    counts = counts.reshape(scores.shape)
    num_corpora, num_layers, num_experts = scores.shape
    layers = layers if layers is not None else [2 * i + 1 for i in range(num_layers)]  # decoder ids != rows
    names = names or [f"corpus{c}" for c in range(num_corpora)]
    meta = {
        "model": "test/tiny-moe",
        "config_hash": "abc",
        "num_experts": num_experts,
        "top_k": top_k,
        **meta,
    }
    corpora = {}
    for c, name in enumerate(names):
        stats = ExpertStats.zeros(layers, num_experts, meta)
        stats.count = counts[c].clone()
        stats.reap_sum = scores[c] * counts[c]
        stats.gate_sum = counts[c] * 0.5
        stats.norm_sum = scores[c] * counts[c] * 2
        corpora[name] = stats
    return Profile(corpora)


def random_profile(
    num_corpora: int, num_layers: int, num_experts: int, seed: int = 0, **meta: Any
) -> Profile:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_corpora, num_layers, num_experts)
    scores = torch.rand(shape, generator=gen, dtype=torch.float64)
    counts = torch.randint(1, 100, shape, generator=gen).to(torch.float64)
    return make_profile(scores, counts, **meta)
