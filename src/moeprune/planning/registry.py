"""The methods as data: one :class:`MethodSpec` row per planning method.

A row says everything the rest of moeprune asks about a method (its label in reports, the paper it comes
from, whether it reads the seed, protects experts, needs the model, ranks on one corpus, and which
candidate it starts from), so no other module branches on a method's name. Adding a method is one module
with a ``select`` function and one :func:`register` call (docs/methods.md, "Adding a method").

:func:`check_request` is the one check of a (method, B, candidate) request: the planner, the API and the
CLI preflight all call it, naming the options as their caller spells them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from moeprune.errors import MoePruneError
from moeprune.planning import aggregate, frequency, reap, tb_coverage
from moeprune.planning import random_method as random_
from moeprune.planning.base import Method, select_precomputed


@dataclass(frozen=True)
class MethodSpec:
    name: str  # as given to --method / plan(method=...)
    select: Method  # (ctx, row, experts) -> LayerMask, see planning.base
    label: str  # as reports print it
    paper: str = ""  # where the method comes from
    seeded: bool = False  # the result depends on the seed
    protects: bool = False  # takes a protect budget B and starts from a candidate method's mask
    needs_model: bool = False  # chooses with the model: api plans it and hands planning its selections
    one_corpus: bool = False  # can rank on one named profiled corpus (score_corpus) instead of the pool
    default_candidate: str | None = None  # protects: the candidate used when none is named


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (a new name only: replacing a method silently would change every plan that names it)."""
    if spec.name in REGISTRY:
        raise MoePruneError(f"A planning method named {spec.name!r} is already registered; pick another name.")
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def method_spec(method: str) -> MethodSpec:
    """The row of ``method``; an unknown name fails listing the known ones."""
    if method not in REGISTRY:
        raise MoePruneError(f"Unknown planning method {method!r}; known methods: {', '.join(REGISTRY)}.")
    return REGISTRY[method]


def names() -> list[str]:
    return list(REGISTRY)


def protecting() -> list[str]:
    return [name for name, spec in REGISTRY.items() if spec.protects]


def candidates() -> list[str]:
    """The methods a protecting method can start from (any that does not protect itself)."""
    return [name for name, spec in REGISTRY.items() if not spec.protects]


def label(method: str) -> str:
    """The report label of ``method`` (an unregistered name, e.g. an old result's, prints as itself)."""
    spec = REGISTRY.get(method)
    return spec.label if spec is not None else method


def candidate_of(method: str, candidate: str | None) -> str | None:
    """The candidate a protecting method starts from: the one named, else its default; None for the others."""
    spec = method_spec(method)
    if not spec.protects:
        return None
    return candidate or spec.default_candidate


def needs_model(method: str, candidate: str | None = None) -> bool:
    """Whether planning ``method`` (with ``candidate``, or its default) chooses with the model."""
    spec = method_spec(method)
    chosen = candidate_of(method, candidate)
    return spec.needs_model or (chosen is not None and chosen in REGISTRY and REGISTRY[chosen].needs_model)


CLI_NAMES = {"protect_budget": "-B", "candidate": "--candidate", "candidate_masks": "candidate_masks"}


def check_request(
    method: str,
    protect_budget: object = None,
    candidate: str | None = None,
    *,
    candidate_masks: Mapping | None = None,
    spelled: Mapping[str, str] | None = None,
) -> MethodSpec:
    """A known method; B/candidate only for a protecting method; a known, non-protecting candidate.

    ``spelled`` names the options as the caller's user types them (:data:`CLI_NAMES` for the CLI);
    by default they are the Python keywords."""
    spec = method_spec(method)
    spelled = dict(spelled or {})
    if not spec.protects:
        given = [spelled.get(name, name) for name, value in
                 (("protect_budget", protect_budget), ("candidate", candidate), ("candidate_masks", candidate_masks))
                 if value is not None]
        if given:
            them = "it" if len(given) == 1 else "them"
            raise MoePruneError(
                f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to "
                f"{', '.join(protecting())}; drop {them} for {method!r}."
            )
    elif candidate is not None and candidate not in candidates():
        raise MoePruneError(
            f"Unknown candidate method {candidate!r} for {method}; use one of: {', '.join(candidates())}."
        )
    return spec


PAPER = "Generic TB-Coverage (arXiv 2607.01710)"
for _spec in (
    MethodSpec("random", random_.select, "Random", PAPER + ", baseline", seeded=True),
    MethodSpec("frequency", frequency.select, "Frequency", PAPER + ", baseline"),
    MethodSpec("reap", reap.select, "REAP", "REAP (arXiv 2510.13999)", one_corpus=True),
    MethodSpec("mean-score", aggregate.mean_score, "Mean-score", PAPER + ", ablation"),
    MethodSpec("max-score", aggregate.max_score, "Max-score", PAPER + ", ablation"),
    MethodSpec(
        "tb-coverage", tb_coverage.select, "TB-Coverage", PAPER, protects=True, default_candidate="expert-sparsity"
    ),
    # Chooses with the model (layerwise reconstruction); its selections arrive as plan(..., precomputed=...).
    MethodSpec("expert-sparsity", select_precomputed, "ExpertSparsity", "NAEE (arXiv 2402.14800)", needs_model=True),
):
    register(_spec)
