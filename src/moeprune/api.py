"""The pipeline's verbs as Python functions: profile -> plan -> apply (prune does all three), evaluate.

Each takes what the previous one wrote (a profile directory, a mask file) or the object itself, so a
notebook and the CLI run the same code::

    from moeprune import api
    prof = api.profile("Qwen/Qwen1.5-MoE-A2.7B", ["wikitext2", "c4"], "prof/")
    mask = api.plan(prof, "tb-coverage", 0.5, model="Qwen/Qwen1.5-MoE-A2.7B")
    api.apply("Qwen/Qwen1.5-MoE-A2.7B", mask, "qwen-50/")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moeprune.data.corpora import CorpusSpec, parse_corpus
from moeprune.errors import MoePruneError
from moeprune.loading import load_model, load_tokenizer, model_name, resolve_model_path
from moeprune.planning import METHODS
from moeprune.planning import plan as plan_from_profile
from moeprune.planning.mask import ExpertMask, kept_count
from moeprune.profiling.runner import ProfileSettings, profile_model
from moeprune.profiling.stats import Profile

log = logging.getLogger("moeprune")

DEFAULT_CORPORA = ("wikitext2", "c4")
# The reconstruction candidate is fitted on C4 in the paper; without C4 we use the last profiled corpus.
RECONSTRUCTION_CORPUS = "c4"
NEEDS_MODEL = {"expert-sparsity"}


def profile(
    model: Any,
    corpora: Sequence[str | CorpusSpec] = DEFAULT_CORPORA,
    out: str | Path = "profile",
    *,
    samples: int = 512,
    seq_len: int = 1024,
    batch_size: int = 4,
    seed: int = 0,
    checkpoint_every: int = 16,
    dtype: str = "auto",
    device: str | None = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Profile:
    """Profile ``model`` (a loaded model, a local path or a hub id) on each corpus into ``out``."""
    model = _model(model, dtype, device, trust_remote_code)
    tokenizer = _tokenizer(tokenizer, model, trust_remote_code)
    specs = [c if isinstance(c, CorpusSpec) else parse_corpus(c) for c in corpora]
    settings = ProfileSettings(
        num_samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every
    )
    return profile_model(model, tokenizer, specs, out, settings, progress=progress)


def plan(
    profile: Profile | str | Path,
    method: str = "tb-coverage",
    retain: float = 0.5,
    *,
    seed: int = 0,
    protect_budget: int | None = None,
    candidate: str | None = None,
    model: Any = None,
    reconstruction: dict[str, Any] | None = None,
    progress: bool = True,
) -> ExpertMask:
    """One mask; see :func:`plan_many` for several retain ratios sharing one reconstruction."""
    return plan_many(
        profile,
        method,
        [retain],
        seed=seed,
        protect_budget=protect_budget,
        candidate=candidate,
        model=model,
        reconstruction=reconstruction,
        progress=progress,
    )[0]


def plan_many(
    profile: Profile | str | Path,
    method: str,
    retains: Sequence[float],
    *,
    seed: int = 0,
    protect_budget: int | None = None,
    candidate: str | None = None,
    model: Any = None,
    reconstruction: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[ExpertMask]:
    """Masks for every retain ratio. Methods that need the model (expert-sparsity, and tb-coverage with
    that candidate) load it from ``model`` or from the path recorded in the profile."""
    workdir = Path(profile) if isinstance(profile, (str, Path)) else None
    prof = Profile.load(profile) if workdir is not None else profile
    if method not in METHODS:
        plan_from_profile(prof, method, 1.0)  # raises the registry's "unknown method" error
    candidate = _candidate(method, candidate)
    kept = [kept_count(r, prof.num_experts, prof.meta.get("top_k")) for r in retains]
    selections = None
    if method in NEEDS_MODEL or candidate in NEEDS_MODEL:
        selections = _reconstruct(prof, kept, model, workdir, reconstruction or {}, progress)
    masks = []
    for retain, k in zip(retains, kept, strict=True):
        chosen = None if selections is None else {layer: kept for layer, (kept, _) in selections[k].items()}
        kwargs: dict[str, Any] = {"seed": seed}
        if method == "tb-coverage":
            kwargs.update(protect_budget=protect_budget, candidate=candidate, candidate_masks=chosen)
        elif method in NEEDS_MODEL:
            kwargs["precomputed"] = chosen
        mask = plan_from_profile(prof, method, retain, **kwargs)
        if selections is not None:
            for layer, (_, loss) in selections[k].items():
                mask.layers[layer].extra.setdefault("reconstruction_loss", loss)
        masks.append(mask)
    return masks


def mask_filename(mask: ExpertMask) -> str:
    seed = f"-seed{mask.seed}" if mask.seed is not None else ""
    return f"{mask.method}-{mask.retain:.2f}{seed}.json"


def apply(
    model: Any,
    mask: ExpertMask | str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
) -> Path:
    """Write the pruned checkpoint to ``out`` (atomically, verified against the in-memory masked model)."""
    from moeprune.surgery import export_pruned

    mask = mask if isinstance(mask, ExpertMask) else ExpertMask.load(mask)
    if isinstance(model, str | Path):
        model = resolve_model_path(model)
    return export_pruned(
        model,
        mask,
        out,
        tokenizer=tokenizer,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        verify=verify,
        progress=progress,
    )


def prune(
    model: Any,
    retain: float,
    out: str | Path,
    *,
    method: str = "tb-coverage",
    corpora: Sequence[str] = DEFAULT_CORPORA,
    workdir: str | Path | None = None,
    samples: int = 512,
    seq_len: int = 1024,
    batch_size: int = 4,
    seed: int = 0,
    protect_budget: int | None = None,
    candidate: str | None = None,
    reconstruction: dict[str, Any] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Profile, plan and apply in one call; the profile is kept in ``workdir`` (default ``OUT.work``)."""
    workdir = Path(workdir) if workdir else Path(str(out).rstrip("/") + ".work")
    loaded = _model(model, dtype, device, trust_remote_code)
    tokenizer = _tokenizer(None, loaded, trust_remote_code)
    profile(
        loaded,
        corpora,
        workdir,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        tokenizer=tokenizer,
        progress=progress,
    )
    mask = plan(
        workdir,
        method,
        retain,
        seed=seed,
        protect_budget=protect_budget,
        candidate=candidate,
        model=loaded,
        reconstruction=reconstruction,
        progress=progress,
    )
    mask.save(workdir / mask_filename(mask))
    return apply(loaded, mask, out, tokenizer=tokenizer, overwrite=overwrite, progress=progress)


def _candidate(method: str, candidate: str | None) -> str | None:
    if method != "tb-coverage":
        return candidate
    from moeprune.planning.tb_coverage import DEFAULT_CANDIDATE

    return candidate or DEFAULT_CANDIDATE


def _reconstruct(
    prof: Profile, kept: list[int], model: Any, workdir: Path | None, options: dict[str, Any], progress: bool
) -> dict[int, dict[int, tuple[list[int], float]]]:
    """ExpertSparsity selections for each K, from activations captured once into the work directory."""
    from moeprune.data.sampling import calibration_windows
    from moeprune.reconstruction import reconstruction_selection

    if model is None:
        model = prof.meta.get("model")
        if not model:
            raise MoePruneError("expert-sparsity needs the model: pass --model (the profile records none).")
    loaded = _model(model, options.get("dtype", "auto"), options.get("device"), options.get("trust_remote_code", False))
    spec = _reconstruction_corpus(prof, options.get("corpus"))
    windows = calibration_windows(
        spec,
        _tokenizer(None, loaded, options.get("trust_remote_code", False)),
        options.get("samples", 64),
        options.get("seq_len", 1024),
        options.get("seed", 0),
    )
    workdir = Path(options.get("workdir") or workdir or "moeprune-work")
    key = f"{spec.name}-{windows.shape[0]}x{windows.shape[1]}-seed{options.get('seed', 0)}"
    return reconstruction_selection(loaded, windows, kept, workdir, key, progress=progress)


def _reconstruction_corpus(prof: Profile, name: str | None) -> CorpusSpec:
    if name is not None:
        return parse_corpus(name)
    chosen = RECONSTRUCTION_CORPUS if RECONSTRUCTION_CORPUS in prof.names else prof.names[-1]
    recorded = prof.corpora[chosen].meta.get("corpus")
    return CorpusSpec(**recorded) if recorded else parse_corpus(chosen)


def _model(model: Any, dtype: str, device: str | None, trust_remote_code: bool):
    if isinstance(model, torch.nn.Module):
        return model
    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _tokenizer(tokenizer: Any, model: Any, trust_remote_code: bool):
    if tokenizer is None or isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer or model_name(model), trust_remote_code)
    return tokenizer
