"""The expert mask: which routed experts each MoE layer keeps, in a stable JSON format.

```
{"format": "moeprune.mask/1", "model": ..., "method": ..., "retain": rho, "num_experts": N,
 "kept_per_layer": K, "protect_budget": B | null, "seed": ..., "candidate": ...,
 "layers": {"<decoder layer index>": {"kept": [sorted original ids], "protected": [ids]}}}
```

Protecting methods (tb-coverage) also write ``protect_budget_requested`` (the B asked for, or "auto"),
``candidate_used`` (false when B >= K: every kept expert is protected, the candidate is not computed)
and ``notes`` (sentences saying so). ``protect_budget`` is always the B actually used.

Extra per-layer fields (e.g. a reconstruction loss) and top-level fields (``extra``) are allowed;
readers ignore what they do not know. A saved mask carries ``sha256``, a seal of its content
(:func:`moeprune.io.sealed`): a mask edited by hand (or written by another tool) loads, but is not reused
from a cache nor replaced without ``--overwrite``. ``method`` and ``extra.variant`` become file names, so
they follow :data:`moeprune.io.PLAIN_NAME`; what ``extra`` says about how a checkpoint was made
(``recovery``) is never carried into an export that did not do it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.io import check_plain_name, check_replaceable_file, read_json, seal_intact, sealed, write_json_atomic

MASK_FORMAT = "moeprune.mask/1"


def kept_count(retain: float, num_experts: int, top_k: int | None = None) -> int:
    """K = floor(rho * N), validated: rho in (0, 1] and K >= top-k (the router must still find k experts)."""
    if not 0.0 < retain <= 1.0:
        raise MoePruneError(f"Retain ratio {retain} is outside (0, 1]; pass e.g. --retain 0.5 to keep half.")
    # The epsilon keeps 0.3 * 10 (= 2.9999999999999996 in floats) at 3, as a reader expects.
    k = math.floor(retain * num_experts + 1e-9)
    if k < 1:
        raise MoePruneError(f"Retain ratio {retain} keeps no expert out of {num_experts}; raise --retain.")
    if top_k is not None and k < top_k:
        raise MoePruneError(
            f"Retain ratio {retain} keeps K={k} of {num_experts} experts, fewer than the router's top-k={top_k}; "
            f"the pruned model could not route. Use --retain >= {math.ceil(top_k / num_experts * 1000) / 1000}."
        )
    return k


@dataclass
class LayerMask:
    kept: list[int]
    protected: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kept": sorted(int(e) for e in self.kept), "protected": [int(e) for e in self.protected], **self.extra}


@dataclass
class ExpertMask:
    model: str
    method: str
    retain: float
    num_experts: int
    kept_per_layer: int
    layers: dict[int, LayerMask]
    protect_budget: int | None = None
    seed: int | None = None
    candidate: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    protect_budget_requested: int | str | None = None  # B as asked ("auto" or a number, maybe > K)
    candidate_used: bool | None = None  # False when B >= K: the candidate played no part
    notes: list[str] = field(default_factory=list)
    # Loaded from a file whose seal matches (moeprune wrote it, nobody edited it since); False for a mask made in
    # memory until saved. Caches reuse only intact masks.
    intact: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every layer keeps exactly K distinct valid ids, and protects only kept ones."""
        for layer, lm in self.layers.items():
            ids = list(lm.kept)
            if len(set(ids)) != len(ids):
                raise MoePruneError(f"Mask layer {layer} lists an expert twice: {ids}.")
            if len(ids) != self.kept_per_layer:
                raise MoePruneError(f"Mask layer {layer} keeps {len(ids)} experts, expected {self.kept_per_layer}.")
            bad = [e for e in ids if not 0 <= e < self.num_experts]
            if bad:
                raise MoePruneError(f"Mask layer {layer} keeps experts {bad} outside 0..{self.num_experts - 1}.")
            unkept = set(lm.protected) - set(ids)
            if unkept:
                raise MoePruneError(f"Mask layer {layer} protects experts {sorted(unkept)} that it does not keep.")

    @property
    def variant(self) -> str:
        """The method as grids and tables tell its variants apart: ``extra["variant"]`` when set (e.g.
        ``reap@code`` for REAP ranked on one corpus, ``tb-coverage@B4`` in a protect-budget sweep)."""
        return str(self.extra.get("variant") or self.method)

    @property
    def identity(self) -> str:
        """A short hash of what the mask keeps (expert count and kept ids per layer): what a recovery made for
        this mask records, so that a Recovery made for another mask of the same K is refused."""
        kept = {str(layer): sorted(int(e) for e in self.kept(layer)) for layer in sorted(self.layers)}
        blob = json.dumps({"num_experts": self.num_experts, "kept": kept}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def kept(self, layer: int) -> list[int]:
        return sorted(self.layers[layer].kept)

    def check_model(self, model_layers: list[int], num_experts: int, model_name: str | None = None) -> None:
        """Fail with a clear message when this mask was made for a different model."""
        where = f" (mask made for {self.model!r})" if self.model else ""
        if num_experts != self.num_experts:
            raise MoePruneError(
                f"The mask is for a model with {self.num_experts} experts per layer{where}, but "
                f"{model_name or 'this model'} has {num_experts}. Plan a mask from a profile of this model."
            )
        if sorted(self.layers) != sorted(model_layers):
            raise MoePruneError(
                f"The mask covers MoE layers {sorted(self.layers)}{where}, but {model_name or 'this model'} has MoE "
                f"layers {sorted(model_layers)}. Plan a mask from a profile of this model."
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MASK_FORMAT,
            "model": self.model,
            "method": self.method,
            "retain": self.retain,
            "num_experts": self.num_experts,
            "kept_per_layer": self.kept_per_layer,
            "protect_budget": self.protect_budget,
            "seed": self.seed,
            "candidate": self.candidate,
            **self._protection_json(),
            "layers": {str(layer): self.layers[layer].to_json() for layer in sorted(self.layers)},
            **({"extra": self.extra} if self.extra else {}),
        }

    def _protection_json(self) -> dict[str, Any]:
        # Only protecting methods write these, so other masks keep their old shape.
        if self.protect_budget_requested is None and self.candidate_used is None and not self.notes:
            return {}
        return {
            "protect_budget_requested": self.protect_budget_requested,
            "candidate_used": self.candidate_used,
            "notes": list(self.notes),
        }

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, sealed(self.to_json()))
        self.intact = True

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ExpertMask:
        """A mask from its JSON object, every field type-checked (an id 1.5 or "3" is refused, not rounded)."""
        if not isinstance(obj, dict):
            raise MoePruneError(f"Not a moeprune mask: a JSON {type(obj).__name__}, expected an object.")
        if obj.get("format") != MASK_FORMAT:
            raise MoePruneError(f"Not a moeprune mask (format {obj.get('format')!r}, expected {MASK_FORMAT!r}).")
        _check_fields(obj)
        layers = {}
        for key, entry in obj["layers"].items():  # keys are canonical (_check_fields): one key per layer
            extra = {k: v for k, v in entry.items() if k not in ("kept", "protected")}
            layers[int(key)] = LayerMask(list(entry["kept"]), list(entry.get("protected", [])), extra)
        return cls(
            model=obj.get("model") or "",
            method=obj["method"],
            retain=float(obj["retain"]),
            num_experts=obj["num_experts"],
            kept_per_layer=obj["kept_per_layer"],
            layers=layers,
            protect_budget=obj.get("protect_budget"),
            seed=obj.get("seed"),
            candidate=obj.get("candidate"),
            extra=obj.get("extra", {}),
            protect_budget_requested=obj.get("protect_budget_requested"),
            candidate_used=obj.get("candidate_used"),
            notes=list(obj.get("notes", [])),
            intact=seal_intact(obj),
        )

    @classmethod
    def load(cls, path: str | Path) -> ExpertMask:
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise MoePruneError(f"Mask file {path} not found; create one with `moeprune plan`.")
        obj = read_json(path, "Mask file", "re-create it with `moeprune plan`")
        try:
            return cls.from_json(obj)
        except MoePruneError as err:
            raise MoePruneError(f"Mask file {path}: {err}") from err


def check_replaceable_mask(path: str | Path, overwrite: bool = False) -> None:
    """An existing mask file at ``path`` is replaced only when moeprune wrote it and nobody edited it since (its
    seal matches), or with ``overwrite``: a hand-edited mask or a foreign file is never lost silently."""
    path = Path(path)
    ours = False
    if path.is_file() and not path.is_symlink():
        try:
            ours = seal_intact(read_json(path, "Mask file", "-"))
        except MoePruneError:
            ours = False
    check_replaceable_file(path, ours, overwrite)


_LAYER_KEY = re.compile(r"0|[1-9][0-9]{0,8}")


def _list(obj: dict[str, Any], key: str, fix: str) -> list[Any]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise MoePruneError(f"the mask's {key!r} is {value!r}, not a list; {fix}.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(obj: dict[str, Any]) -> None:
    """Types and structure of a mask's JSON, with the field named on failure."""
    fix = "re-create the mask with `moeprune plan`"
    for key, ok, kind in (
        ("method", lambda v: isinstance(v, str), "a string"),
        ("retain", lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
        ("num_experts", lambda v: _is_int(v) and v > 0, "a positive integer"),
        ("kept_per_layer", lambda v: _is_int(v) and v > 0, "a positive integer"),
        ("layers", lambda v: isinstance(v, dict) and v, "a non-empty object {layer: {\"kept\": [ids]}}"),
    ):
        if key not in obj:
            raise MoePruneError(f"the mask lacks the field {key!r}; {fix}.")
        if not ok(obj[key]):
            raise MoePruneError(f"the mask's {key!r} is {obj[key]!r}, not {kind}; {fix}.")
    for key, value, kind in (
        ("model", obj.get("model"), "a string"),
        ("candidate", obj.get("candidate"), "a string"),
        ("protect_budget", obj.get("protect_budget"), "a whole number"),
        ("seed", obj.get("seed"), "a whole number"),
    ):
        if value is not None and not (isinstance(value, str) if kind == "a string" else _is_int(value) and value >= 0):
            raise MoePruneError(f"the mask's {key!r} is {value!r}, not {kind} or null; {fix}.")
    if not all(isinstance(note, str) for note in _list(obj, "notes", fix)):
        raise MoePruneError(f"the mask's 'notes' must be a list of strings; {fix}.")
    check_plain_name(obj["method"], "the mask's method", fix)
    extra = obj.get("extra", {})
    if not isinstance(extra, dict):
        raise MoePruneError(f"the mask's 'extra' is {obj['extra']!r}, not an object; {fix}.")
    if extra.get("variant") is not None:
        check_plain_name(extra["variant"], "the mask's extra variant", fix)
    for key, ok, kind in (
        ("corpora", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of strings"),
        ("config_hash", lambda v: isinstance(v, str), "a string"),
        ("profile_sha256", lambda v: isinstance(v, str), "a string"),
        ("recovery", lambda v: isinstance(v, dict), "an object"),
    ):
        if extra.get(key) is not None and not ok(extra[key]):
            raise MoePruneError(f"the mask's extra {key!r} is {extra[key]!r}, not {kind}; {fix}.")
    retain, n, k = obj["retain"], obj["num_experts"], obj["kept_per_layer"]
    if not 0.0 < retain <= 1.0 or k > n or kept_count(retain, n) != k:
        raise MoePruneError(
            f"the mask's retain {retain!r} does not give its kept_per_layer K={k} of num_experts N={n} "
            f"(K = floor(retain * N)); a mask must say one ratio; {fix}."
        )
    for key, entry in obj["layers"].items():
        if not _LAYER_KEY.fullmatch(key):  # ASCII digits only: "²" is a digit to str.isdigit(), not to int()
            raise MoePruneError(
                f"the mask's layer key {key!r} is not a decoder-layer index in canonical form (0, 1, 12; not 00 or "
                f"+1); {fix}."
            )
        if not isinstance(entry, dict) or "kept" not in entry:
            raise MoePruneError(f"mask layer {key} is {entry!r}, not an object with a \"kept\" list; {fix}.")
        for field_name in ("kept", "protected"):
            ids = entry.get(field_name, [])
            if not isinstance(ids, list) or not all(_is_int(e) for e in ids):
                raise MoePruneError(
                    f"mask layer {key} {field_name!r} is {ids!r}; expert ids must be a list of integers; {fix}."
                )


CLAMP_NOTE_START = "TB-Coverage is round-robin alone"


def record_protection(mask: ExpertMask, requested: int | str) -> None:
    """Write B as requested, whether the candidate counted, and a note when B >= K made it irrelevant."""
    mask.protect_budget_requested = requested
    k, budget = mask.kept_per_layer, mask.protect_budget or 0
    mask.candidate_used = budget < k
    mask.notes = [n for n in mask.notes if not n.startswith(CLAMP_NOTE_START)]
    if not mask.candidate_used:
        clamped = isinstance(requested, int) and requested > k
        asked = f"B={requested} > K={k}, so B is clamped to K" if clamped else f"B = K = {k}"
        mask.notes.append(
            f"{CLAMP_NOTE_START}: {asked}; every kept expert is protected by round-robin over the corpus "
            f"rankings, and the candidate ({mask.candidate}) is not computed or used."
        )
