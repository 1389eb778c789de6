"""A plan request: what to plan (method, retain ratios, seed, protect budget, candidate, score corpus), valid when
built. The API's ``plan``/``plan_many``/``prune`` and the CLI's ``plan``/``prune`` build one; the experiment grid
builds one per row. Every rule of a request lives here and in :func:`moeprune.planning.registry.check_request`
(B and --candidate only for a protecting method), so both doors refuse the same things with the same line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.options import budget_arg, check_retain, check_seed, flag, given_flags, non_negative
from moeprune.planning import registry
from moeprune.planning.auto_budget import AUTO


@dataclass(frozen=True)
class PlanRequest:
    """``method`` at each of ``retains``; ``seed`` (None: 0) only for a seeded method (random, or tb-coverage
    with a random candidate); ``protect_budget`` (B: a whole number, "auto", None: the paper's) and
    ``candidate`` only for a protecting method; ``score_corpus`` only for a method that ranks on one corpus."""

    method: str = field(default="tb-coverage", metadata=flag("--method", "one of: " + ", ".join(registry.names())))
    retains: tuple[float, ...] = field(default=(0.5,), metadata=flag(
        "--retain", "retain ratios rho in (0, 1]", dest="retain", type=float, nargs="+", required=True))
    seed: int | None = field(default=None, metadata=flag(
        "--plan-seed", "seed of the random method (default: --seed or 0)", type=int))
    protect_budget: int | str | None = field(default=None, metadata=flag(
        "--protect-budget", "TB-Coverage's protected experts per layer, or 'auto' (picked per ratio on held-out "
        "calibration windows); default: 20 for N=60, 24 for N=64, else N/3; B > K is clamped to K and noted in the "
        "mask", aliases=("-B",), type=budget_arg, metavar="B"))
    candidate: str | None = field(default=None, metadata=flag(
        "--candidate", "TB-Coverage's candidate method (default: expert-sparsity)"))
    score_corpus: str | None = field(default=None, metadata=flag(
        "--reap-corpus", "reap: rank on this profiled corpus alone instead of all corpora pooled (e.g. a code "
        "corpus)", metavar="NAME"))

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise MoePruneError(f"method must be a method name, not {type(self.method).__name__}; known methods: "
                                f"{', '.join(registry.names())}.")
        retains = self.retains
        if isinstance(retains, int | float) and not isinstance(retains, bool):
            retains = (retains,)
        if isinstance(retains, str | bytes) or not isinstance(retains, Sequence):
            raise MoePruneError(f"Retain ratio(s) {retains!r} must be numbers in (0, 1], e.g. 0.5 to keep half.")
        object.__setattr__(self, "retains", tuple(retains))
        if not self.retains:
            raise MoePruneError("Plan at least one retain ratio (--retain R ...).")
        for retain in self.retains:
            check_retain(retain)
        spec = registry.check_request(self.method, self.protect_budget, self.candidate)
        budget = self.protect_budget
        if isinstance(budget, str) and budget.strip().lower() == AUTO:
            object.__setattr__(self, "protect_budget", AUTO)
        elif budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int):
                raise MoePruneError(f"-B (protect_budget) must be a whole number or 'auto', not {budget!r}.")
            if budget < 0:
                raise non_negative("--protect-budget (-B)", budget)
        if self.seed is not None:
            check_seed(self.seed, "--plan-seed")
            if not self.seeded:
                raise MoePruneError(
                    f"--plan-seed only applies to seeded methods (random, or tb-coverage with --candidate random); "
                    f"drop it for {self.method!r}."
                )
        if self.score_corpus is not None and not spec.one_corpus:
            ranked = [m for m in registry.names() if registry.method_spec(m).one_corpus]
            raise MoePruneError(f"--reap-corpus (score_corpus) only applies to {', '.join(ranked)}; drop it for "
                                f"{self.method!r}.")

    @property
    def spec(self) -> registry.MethodSpec:
        return registry.method_spec(self.method)

    @property
    def seeded(self) -> bool:
        """Whether the masks depend on the seed (the method's, or its candidate's)."""
        chosen = registry.candidate_of(self.method, self.candidate)
        return self.spec.seeded or (chosen is not None and registry.method_spec(chosen).seeded)

    @property
    def plan_seed(self) -> int:
        return 0 if self.seed is None else self.seed

    @property
    def auto(self) -> bool:
        return self.spec.protects and self.protect_budget == AUTO

    @classmethod
    def from_args(cls, args: Any) -> PlanRequest:
        """From --method/--retain/--plan-seed/-B/--candidate/--reap-corpus (plan, prune)."""
        given = given_flags(cls, args)
        retains = given.get("retains")
        if retains is not None and not isinstance(retains, list):
            given["retains"] = [retains]
        return cls(**given)

    @classmethod
    def of(cls, method: str | PlanRequest, retains: Any = None, fields_given: Mapping[str, Any] | None = None
           ) -> PlanRequest:
        """A request from itself, or from a method name, retain ratio(s) and its other fields by name."""
        given = dict(fields_given or {})
        if isinstance(method, PlanRequest):
            if retains is not None or given:
                raise MoePruneError("Pass either a PlanRequest or a method with its settings, not both.")
            return method
        known = {f.name for f in fields(cls)} - {"method", "retains"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise MoePruneError(f"Unknown plan option(s) {unknown}; known: {', '.join(sorted(known))}.")
        return cls(method, (0.5,) if retains is None else retains, **given)
