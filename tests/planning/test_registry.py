"""Methods as data: every trait is read from the registry, and a new method is one function plus one row
(the recipe of docs/methods.md, "Adding a method", followed here with a throw-away method)."""

from __future__ import annotations

import pytest
import torch

from moeprune import api
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.evaluation import report
from moeprune.planning import PlanRequest, plan, registry
from moeprune.planning.base import PlanContext, ranked
from moeprune.planning.mask import ExpertMask, LayerMask
from moeprune.planning.registry import MethodSpec

from . import make_profile, random_profile


def least_frequent(ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    """The recipe's example: keep the K experts the router chose least often."""
    return LayerMask(ranked(-ctx.pooled.count[row], experts)[: ctx.kept_per_layer])


@pytest.fixture
def throwaway():
    spec = registry.register(MethodSpec("least-frequent", least_frequent, "Least-frequent", "a test"))
    yield spec
    registry.unregister("least-frequent")
    assert "least-frequent" not in registry.names()


def test_one_row_is_all_a_method_needs(throwaway, tmp_path, capsys) -> None:
    # Each layer's counts are a permutation of the same values: the token totals agree across layers, as the
    # profile loader checks when the CLI reads the saved profile back.
    gen = torch.Generator().manual_seed(0)
    values = torch.arange(1, 9, dtype=torch.float64) * 7
    counts = torch.stack([torch.stack([values[torch.randperm(8, generator=gen)] for _ in range(2)]) for _ in range(2)])
    profile = make_profile(torch.rand(2, 2, 8, generator=gen, dtype=torch.float64), counts)
    mask = plan(profile, "least-frequent", 0.5)
    count = profile.pooled().count
    for row, layer in enumerate(profile.layer_ids):
        fewest = sorted(range(8), key=lambda e, r=row: (float(count[r, e]), e))[:4]
        assert mask.kept(layer) == sorted(fewest)
    assert mask.method == "least-frequent" and mask.seed is None and mask.protect_budget is None
    # The API, the CLI (plan, then inspect), the report and tb-coverage's candidate list all know it.
    assert api.plan(profile, "least-frequent", 0.5, progress=False).layers == mask.layers
    profile.save(tmp_path / "prof")
    out = tmp_path / "masks"
    argv = ["plan", str(tmp_path / "prof"), "--method", "least-frequent", "--retain", "0.5", "--out", str(out)]
    assert main(argv) == 0
    saved = ExpertMask.load(out / "least-frequent-0.50.json")
    assert all(saved.kept(layer) == mask.kept(layer) for layer in profile.layer_ids)
    assert main(["inspect", str(out / "least-frequent-0.50.json")]) == 0
    assert "method least-frequent" in capsys.readouterr().out
    assert report.method_label("least-frequent") == "Least-frequent"
    tb = plan(profile, PlanRequest("tb-coverage", 0.5, protect_budget=1, candidate="least-frequent"))
    assert all(set(tb.layers[layer].extra["candidate"]) == set(mask.kept(layer)) for layer in profile.layer_ids)
    # Its row's traits are the only thing that gates options: no protect budget for it.
    with pytest.raises(MoePruneError, match=r"protect_budget only applies to tb-coverage; drop it for 'least-freq"):
        plan(profile, PlanRequest("least-frequent", 0.5, protect_budget=1))


def test_gone_once_unregistered_and_names_are_unique(throwaway) -> None:
    with pytest.raises(MoePruneError, match="already registered"):
        registry.register(throwaway)
    registry.unregister("least-frequent")
    with pytest.raises(MoePruneError, match=r"Unknown planning method 'least-frequent'"):
        plan(random_profile(2, 1, 8), "least-frequent", 0.5)
    registry.register(throwaway)  # for the fixture to remove


def test_traits_come_from_the_rows() -> None:
    assert registry.protecting() == ["tb-coverage"]
    assert [n for n, s in registry.REGISTRY.items() if s.seeded] == ["random"]
    assert [n for n, s in registry.REGISTRY.items() if s.needs_model] == ["expert-sparsity"]
    assert [n for n, s in registry.REGISTRY.items() if s.one_corpus] == ["reap"]
    # One default candidate, the paper's, for planning.plan, api.plan and the CLI alike.
    assert registry.candidate_of("tb-coverage", None) == "expert-sparsity"
    assert registry.needs_model("tb-coverage") and not registry.needs_model("tb-coverage", "reap")
    assert registry.candidate_of("reap", None) is None
    assert report.method_label("expert-sparsity") == "ExpertSparsity"
