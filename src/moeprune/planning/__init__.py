"""Planning: turn a profile into an :class:`ExpertMask` (which experts each MoE layer keeps).

Every method is one module with a function ``(ctx, row, experts) -> LayerMask`` (see
:mod:`moeprune.planning.base`) and one :class:`~moeprune.planning.registry.MethodSpec` row in
:mod:`moeprune.planning.registry`. :func:`plan` validates the request up
front, splits grouped-routing layers into their groups, runs the method and assembles the mask.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.planning.base import Method, PlanContext, Selections
from moeprune.planning.groups import expert_groups, split_budget
from moeprune.planning.mask import ExpertMask, LayerMask, kept_count, record_protection
from moeprune.planning.registry import REGISTRY, MethodSpec, check_request, method_spec
from moeprune.planning.request import PlanRequest
from moeprune.profiling.stats import Profile

# The registry itself (name -> MethodSpec): `name in METHODS` and `list(METHODS)` read as before.
METHODS = REGISTRY

# Paper settings (arXiv 2607.01710): B=20 of N=60 experts, B=24 of N=64.
PAPER_PROTECT_BUDGETS = {60: 20, 64: 24}

__all__ = ["METHODS", "MethodSpec", "PlanContext", "PlanRequest", "candidate_needed", "default_protect_budget", "plan"]


def paper_protect_budget(num_experts: int) -> int:
    """The paper's B for N=60 (20) and N=64 (24); otherwise round(N/3), the same ~1/3 ratio."""
    return PAPER_PROTECT_BUDGETS.get(num_experts, round(num_experts / 3))


def default_protect_budget(num_experts: int, kept: int) -> int:
    """:func:`paper_protect_budget`, at most K (B > K is clamped to K)."""
    return min(paper_protect_budget(num_experts), kept)


def candidate_needed(num_experts: int, kept: int, protect_budget: int | None) -> bool:
    """Whether TB-Coverage at K=``kept`` uses its candidate: only while B < K (B >= K protects all K)."""
    budget = paper_protect_budget(num_experts) if protect_budget is None else protect_budget
    return budget < kept


def plan(
    profile: Profile,
    request: PlanRequest | str,
    retain: float | None = None,
    *,
    candidate_masks: Selections | None = None,
    precomputed: Selections | None = None,
) -> ExpertMask:
    """Keep K = floor(retain * N) experts in every MoE layer of ``profile`` as ``request`` asks: a
    :class:`~moeprune.planning.request.PlanRequest` of one retain ratio (or ``retain`` picks the one to plan), or a
    method name with ``retain`` (the request's other fields at their defaults).

    The request's ``protect_budget`` (B, default :func:`default_protect_budget`), ``candidate`` (a method name,
    default the method's ``MethodSpec.default_candidate``: expert-sparsity for tb-coverage, which needs the model,
    so without ``candidate_masks`` name a profile-only one, e.g. ``candidate="reap"``) and ``candidate_masks``
    ({decoder layer: kept ids}, a candidate made elsewhere; ``candidate`` then only labels it) apply to
    tb-coverage. ``precomputed`` carries the selections of a method that needs the model, e.g. expert-sparsity.
    The request's ``score_corpus`` (reap only) ranks on that profiled corpus alone instead of the pooled corpora;
    the mask's variant is then ``reap@<corpus>``.
    """
    req = _one_request(request, retain)
    method, retain, seed = req.method, req.retains[0], req.plan_seed
    protect_budget, candidate, score_corpus = req.protect_budget, req.candidate, req.score_corpus
    spec = check_request(method, protect_budget, candidate, candidate_masks=candidate_masks)
    _check_score_corpus(profile, spec, score_corpus)
    meta, num_experts = profile.meta, profile.num_experts
    kept = kept_count(retain, num_experts, meta.get("top_k"))
    groups = expert_groups(meta, num_experts, kept)
    requested = paper_protect_budget(num_experts) if protect_budget is None else protect_budget
    budget, candidate = _protection(spec, kept, protect_budget, candidate, candidate_masks, num_experts)
    computes = None if candidate_masks is not None or candidate is None else method_spec(candidate)
    seeded = spec.seeded or (computes is not None and computes.seeded)
    if seeded and (not isinstance(seed, int) or seed < 0):
        raise MoePruneError(f"Seed {seed!r} must be a non-negative integer.")
    ctx = PlanContext(
        profile=profile,
        method=method,
        kept_per_layer=kept,
        seed=seed,
        protect_budget=budget or 0,
        candidate=candidate,
        candidate_masks=_normalise(candidate_masks),
        precomputed=_normalise(precomputed),
        score_corpus=score_corpus,
        candidate_select=None if computes is None else computes.select,
    )
    layers = {ctx.layer(row): _plan_layer(spec.select, ctx, row, groups) for row in range(len(profile.layer_ids))}
    extra: dict[str, Any] = {"corpora": profile.names}
    if score_corpus is not None:
        extra.update(corpora=[score_corpus], score_corpus=score_corpus, variant=f"{method}@{score_corpus}")
    if meta.get("config_hash"):
        extra["config_hash"] = meta["config_hash"]
    extra["profile_sha256"] = profile.fingerprint()  # which profile: a grid replans when it changes
    mask = ExpertMask(
        model=str(meta.get("model", "")),
        method=method,
        retain=retain,
        num_experts=num_experts,
        kept_per_layer=kept,
        layers=layers,
        protect_budget=budget,
        seed=seed if seeded else None,
        candidate=candidate,
        extra=extra,
    )
    if spec.protects:
        record_protection(mask, requested)
    return mask


def _one_request(request: PlanRequest | str, retain: float | None) -> PlanRequest:
    """The request for one mask: a method name with ``retain``, or a request narrowed to ``retain``."""
    if not isinstance(request, PlanRequest):
        return PlanRequest.of(request, None if retain is None else [retain])
    if retain is not None:
        return replace(request, retains=(retain,))
    if len(request.retains) != 1:
        raise MoePruneError(f"plan makes one mask and the request has {len(request.retains)} retain ratios; pass "
                            "retain=, or plan them all with moeprune.api.plan_many.")
    return request


def _check_score_corpus(profile: Profile, spec: MethodSpec, corpus: str | None) -> None:
    if corpus is None:
        return
    if not spec.one_corpus:
        one = ", ".join(name for name, row in REGISTRY.items() if row.one_corpus)
        raise MoePruneError(f"A REAP corpus (--reap-corpus) only applies to {one}; drop it for {spec.name!r}.")
    if corpus not in profile.names:
        raise MoePruneError(
            f"REAP corpus {corpus!r} is not in the profile (it holds {', '.join(profile.names)}). Profile it first, "
            f"e.g. `moeprune profile MODEL --corpus {corpus}=SPEC --out PROFILE_DIR`, and plan from that profile."
        )


def _protection(
    spec: MethodSpec,
    kept: int,
    budget: int | str | None,
    candidate: str | None,
    candidate_masks: Selections | None,
    num_experts: int,
) -> tuple[int | None, str | None]:
    """Validated (B, candidate name) for a protecting method (check_request has vetted the names); (None, None)
    for the others."""
    if not spec.protects:
        return None, None
    if budget is None:
        budget = default_protect_budget(num_experts, kept)
    if budget == "auto":
        raise MoePruneError(
            "B='auto' scores budgets with the model on held-out calibration windows: plan with moeprune.api.plan "
            "or `moeprune plan`/`experiment -B auto`, which load the model, or give B as a number."
        )
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise MoePruneError(f"Protect budget B={budget!r} must be a whole number; pass e.g. -B 20.")
    if budget < 0:
        raise MoePruneError(f"Protect budget B={budget} is negative; use 0 (keep the candidate) or more.")
    # Protected experts must all be kept: B > K is clamped to K (recorded in the mask, see record_protection).
    budget = min(budget, kept)
    if candidate_masks is not None:
        return budget, candidate or "precomputed"
    candidate = candidate or spec.default_candidate
    if budget < kept and method_spec(candidate).needs_model:
        # Only planned when B < K: with B >= K round-robin alone fills the mask and no candidate is computed.
        raise MoePruneError(
            f"{spec.name}'s candidate {candidate!r} selects experts with the model, which planning from a profile "
            "never loads: plan with moeprune.api.plan(..., model=...) or `moeprune plan`, pass its selections as "
            "candidate_masks={decoder_layer: [kept ids]}, or name a profile-only candidate, e.g. candidate='reap'."
        )
    return budget, candidate


def _normalise(selections: Selections | None) -> Selections | None:
    """Integer keys and ids, whether the selections came from Python or from JSON (string keys)."""
    if selections is None:
        return None
    return {int(layer): [int(e) for e in ids] for layer, ids in selections.items()}


def _plan_layer(fn: Method, ctx: PlanContext, row: int, groups: list[list[int]]) -> LayerMask:
    """Run the method in each routing group with its share of K and B, and join the groups' masks."""
    if len(groups) == 1:
        return _checked(fn(ctx, row, groups[0]), ctx, row, groups[0])
    per_group = ctx.kept_per_layer // len(groups)
    parts = []
    for experts, budget in zip(groups, split_budget(ctx.protect_budget, len(groups)), strict=True):
        group_ctx = replace(ctx, kept_per_layer=per_group, protect_budget=budget)
        parts.append(_checked(fn(group_ctx, row, experts), group_ctx, row, experts))
    extra: dict[str, Any] = {}
    for part in parts:
        for key, value in part.extra.items():
            extra.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    return LayerMask(
        kept=[e for part in parts for e in part.kept],
        protected=[e for part in parts for e in part.protected],
        extra=extra,
    )


def _checked(mask: LayerMask, ctx: PlanContext, row: int, experts: list[int]) -> LayerMask:
    # A method that breaks the contract is a bug; say which method and layer rather than fail later.
    stray = sorted(set(mask.kept) - set(experts))
    if len(set(mask.kept)) != ctx.kept_per_layer or stray:
        raise MoePruneError(
            f"Method {ctx.method!r} kept {sorted(mask.kept)} in MoE layer {ctx.layer(row)}; expected "
            f"{ctx.kept_per_layer} distinct experts among {experts[0]}..{experts[-1]}."
        )
    return mask
