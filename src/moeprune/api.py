"""The pipeline's verbs as Python functions: profile -> plan -> apply (prune does all three), evaluate.

Each takes what the previous one wrote (a profile directory, a mask file) or the object itself, so a
notebook and the CLI run the same code::

    from moeprune import api
    prof = api.profile("Qwen/Qwen1.5-MoE-A2.7B", ["wikitext2", "c4"], "prof/")
    mask = api.plan(prof, "tb-coverage", 0.5, model="Qwen/Qwen1.5-MoE-A2.7B")
    api.apply("Qwen/Qwen1.5-MoE-A2.7B", mask, "qwen-50/")
    results = api.evaluate("Qwen/Qwen1.5-MoE-A2.7B", mask)   # or the written checkpoint "qwen-50/"

Measurement (``moeprune.evaluation``) sits below this module and orchestration (the experiment grid,
``moeprune.experiment``) above it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moeprune.data.corpora import CorpusSpec, parse_corpus
from moeprune.data.sampling import calibration_windows
from moeprune.errors import MoePruneError
from moeprune.evaluation.perplexity import held_out_nll, perplexity
from moeprune.evaluation.runner import evaluate_model
from moeprune.io import check_output_dir, write_json_atomic
from moeprune.loading import (  # noqa: F401 (re-export)
    ModelSource,
    checked_model,
    checked_tokenizer,
    checkpoint_dtype,
    config_hash,
    fits_on_gpus,
    load_config,
    load_model,
    load_tokenizer,
    model_name,
    resolve_model_path,
)
from moeprune.options import Calibration, EvalSettings, ReconstructionOptions
from moeprune.planning import auto_budget, candidate_needed, paper_protect_budget, registry
from moeprune.planning import plan as plan_from_profile
from moeprune.planning.fit import check_mask_for_config
from moeprune.planning.mask import ExpertMask, kept_count
from moeprune.presets import PAPER, PRESETS, is_bundled, preset_for  # noqa: F401 (re-export)
from moeprune.profiling.runner import ProfileSettings, profile_model
from moeprune.profiling.stats import Profile
from moeprune.reconstruction import reconstruction_selection, reconstruction_selection_streamed
from moeprune.recovery import Recovery, RecoveryOptions, check_mergeable_config, check_prunes, recovery_corpora
from moeprune.recovery import recover as recover_loaded
from moeprune.streaming.memory import available_memory, gib
from moeprune.surgery import export_pruned
from moeprune.surgery.export import export_streamed
from moeprune.validation import check_profile_out, check_seq_len, model_config

log = logging.getLogger("moeprune")

DEFAULT_CORPORA = PRESETS[PAPER].corpora


# The reconstruction candidate is fitted on C4 in the paper; without C4 we use the last profiled corpus.
RECONSTRUCTION_CORPUS = "c4"


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
    sequential: bool | None = None,
    dtype: str = "auto",
    device: str | None = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    stream: bool | None = None,
) -> Profile:
    """Profile ``model`` (a loaded model, a local path or a hub id) on each corpus into ``out``.

    A model given by name loads like :func:`moeprune.loading.load_model` places it (on the GPU when there
    is one). ``sequential=True`` keeps the weights on the CPU and runs one decoder layer at a time on
    ``device``; ``None`` (default) does so only when a model given by name does not fit in the free GPU
    memory (of ``device``, or of all visible GPUs). ``stream=True`` reads the weights from the checkpoint's
    safetensors shards one decoder layer at a time (never the whole model in memory); ``None`` does so when the
    weights do not fit in the memory available to the process (see :meth:`ModelSource.placement`), ``False`` never.
    """
    Calibration(tuple(corpora), samples, seq_len, batch_size)  # the CLI's rules, before the model loads
    source = ModelSource.of(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, stream=stream)
    if source.placement() == "stream":
        specs = [c if isinstance(c, CorpusSpec) else parse_corpus(c) for c in corpora]
        check_profile_out(out, model, specs, tokenizer)
        layers = source.open_stream()
        tokenizer = checked_tokenizer(tokenizer, layers.model, trust_remote_code)
        settings = ProfileSettings(num_samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                   checkpoint_every=checkpoint_every)
        return profile_model(layers, tokenizer, specs, out, settings, progress=progress)
    sequential_device = None
    if sequential is None and not isinstance(model, torch.nn.Module):
        sequential = not _fits(model, device, dtype, trust_remote_code)
    if sequential:
        sequential_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        device, dtype = "cpu", _sequential_dtype(model, dtype, sequential_device, trust_remote_code)

    specs = [c if isinstance(c, CorpusSpec) else parse_corpus(c) for c in corpora]
    check_profile_out(out, model, specs, tokenizer)  # before loading: never over the model or a corpus file
    model = checked_model(model, dtype, device, trust_remote_code)
    tokenizer = checked_tokenizer(tokenizer, model, trust_remote_code)
    settings = ProfileSettings(
        num_samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        checkpoint_every=checkpoint_every,
        sequential_device=sequential_device,
    )
    return profile_model(model, tokenizer, specs, out, settings, progress=progress)


def plan(
    profile: Profile | str | Path,
    method: str = "tb-coverage",
    retain: float = 0.5,
    *,
    seed: int = 0,
    protect_budget: int | str | None = None,
    candidate: str | None = None,
    model: Any = None,
    reconstruction: ReconstructionOptions | Mapping[str, Any] | None = None,
    score_corpus: str | None = None,
    progress: bool = True,
    corpora: Sequence[str] | None = None,
) -> ExpertMask:
    """One mask; see :func:`plan_many` for several retain ratios sharing one reconstruction."""
    return plan_many(
        profile,
        method,
        [retain],
        corpora=corpora,
        seed=seed,
        protect_budget=protect_budget,
        candidate=candidate,
        model=model,
        reconstruction=reconstruction,
        score_corpus=score_corpus,
        progress=progress,
    )[0]


def plan_many(
    profile: Profile | str | Path,
    method: str,
    retains: Sequence[float],
    *,
    seed: int = 0,
    protect_budget: int | str | None = None,
    candidate: str | None = None,
    model: Any = None,
    reconstruction: ReconstructionOptions | Mapping[str, Any] | None = None,
    score_corpus: str | None = None,
    progress: bool = True,
    candidate_masks: Mapping[float, ExpertMask] | None = None,
    corpora: Sequence[str] | None = None,
) -> list[ExpertMask]:
    """Masks for every retain ratio. Methods that need the model (expert-sparsity, tb-coverage with that
    candidate, tb-coverage with ``protect_budget="auto"``) load it from ``model`` or from the path recorded
    in the profile. ``score_corpus`` ranks reap on that profiled corpus alone. ``candidate_masks``
    ({retain: a planned mask of the candidate method}, e.g. an experiment's expert-sparsity masks) gives a
    protecting method its candidate instead of computing it again; their reconstruction losses are recorded
    as for a candidate computed here. ``corpora`` (names) plans on
    those corpora of a profile folder only, not on every corpus profiled there."""
    spec = registry.check_request(method, protect_budget, candidate)  # B/candidate the method would ignore fail here
    options = ReconstructionOptions.coerce(reconstruction)
    workdir = Path(profile) if isinstance(profile, (str, Path)) else None
    prof = Profile.load(profile, list(corpora) if corpora else None) if workdir is not None else profile
    candidate = registry.candidate_of(method, candidate)
    kept = [kept_count(r, prof.num_experts, prof.meta.get("top_k")) for r in retains]
    selections = None
    auto = spec.protects and protect_budget == auto_budget.AUTO
    if auto:  # loaded once, shared with the reconstruction below
        model, held_out = _auto_budget_setup(prof, model, options)
    # TB-Coverage with B >= K protects all K experts: its candidate is not needed there (issue 9).
    needed = [
        k for k in kept if spec.needs_model or auto or candidate_needed(prof.num_experts, k, protect_budget)
    ]
    given = _given_candidates(spec, candidate_masks, retains)
    if needed and given is None and registry.needs_model(method, candidate):
        selections = _reconstruct(prof, needed, model, workdir, options, progress)
    masks = []
    for retain, k in zip(retains, kept, strict=True):
        chosen, losses = given[retain] if given is not None else _found(selections, k)
        kwargs: dict[str, Any] = {"seed": seed}
        if spec.protects:
            kwargs.update(protect_budget=protect_budget, candidate=candidate, candidate_masks=chosen)
        elif spec.needs_model:
            kwargs["precomputed"] = chosen
        if score_corpus is not None:
            kwargs["score_corpus"] = score_corpus
        if auto:
            def plan_with(budget: int, retain: float = retain, kwargs: dict = kwargs) -> ExpertMask:
                return plan_from_profile(prof, method, retain, **{**kwargs, "protect_budget": budget})

            mask = auto_budget.choose(plan_with, k, paper_protect_budget(prof.num_experts),
                                      lambda m, model=model: held_out_nll(model, m, held_out), held_out)
        else:
            mask = plan_from_profile(prof, method, retain, **kwargs)
        if losses is not None and mask.candidate_used is not False:
            # For tb-coverage the loss is its candidate's, not the final mask's: say so in the name.
            prefix = "" if spec.needs_model else "candidate_"
            for layer, extra in losses.items():
                for key in ("reconstruction_loss", "search"):
                    if key in extra:
                        mask.layers[layer].extra[prefix + key] = extra[key]
        masks.append(mask)
    return masks


Chosen = tuple[dict[int, list[int]] | None, dict[int, dict[str, Any]] | None]  # (selections, per-layer losses)


def _found(selections: dict[int, dict[int, Any]] | None, k: int) -> Chosen:
    """The reconstruction's selections and losses at K=``k``, or (None, None) when none ran for it."""
    found = None if selections is None else selections.get(k)
    if found is None:
        return None, None
    chosen = {layer: kept for layer, (kept, _) in found.items()}
    losses = {layer: {"reconstruction_loss": float(r.loss), "search": r.search} for layer, r in found.items()}
    return chosen, losses


def _given_candidates(
    spec: registry.MethodSpec, masks: Mapping[float, ExpertMask] | None, retains: Sequence[float]
) -> dict[float, Chosen] | None:
    """Precomputed candidate masks as (selections, losses) per retain ratio, checked to cover every one."""
    if masks is None:
        return None
    if not spec.protects:
        raise MoePruneError(f"candidate_masks only apply to {', '.join(registry.protecting())}; drop them.")
    missing = [r for r in retains if r not in masks]
    if missing:
        raise MoePruneError(f"candidate_masks has no mask for retain {missing}; give one per retain ratio.")
    return {
        r: ({layer: masks[r].kept(layer) for layer in masks[r].layers},
            {layer: lm.extra for layer, lm in masks[r].layers.items()})
        for r in retains
    }


def mask_filename(mask: ExpertMask) -> str:
    return variant_filename(mask.variant, mask.retain, mask.seed)


def variant_filename(variant: str, retain: float, seed: int | None = None) -> str:
    """``<variant>-<retain>[-seed<s>].json`` (the seed only for seeded methods); the ratio is exact, so no two
    ratios share a name (0.62 and 0.625 were both ``-0.62``): two decimals when they say it exactly (0.50),
    else the shortest exact form."""
    return f"{variant}-{retain_label(retain)}" + (f"-seed{seed}" if seed is not None else "") + ".json"


def retain_label(retain: float) -> str:
    short = f"{retain:.2f}"
    return short if float(short) == retain else repr(float(retain))


def apply(
    model: Any,
    mask: ExpertMask | str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    tokenizer: Any = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    force: bool = False,
    progress: bool = True,
    recover: RecoveryOptions | Recovery | None = None,
    stream: bool | None = None,
) -> Path:
    """Write the pruned checkpoint to ``out`` (atomically, verified against the in-memory masked model).

    ``stream`` (None: when the model does not fit in memory, see :meth:`ModelSource.placement`): the checkpoint is
    written shard by shard and verified layer by layer against the source streamed from disk
    (:func:`moeprune.surgery.export.export_streamed`); a recovery cannot stream and is refused before anything
    loads.

    A model given by name loads in its checkpoint dtype on the GPU when there is one (``device`` as in
    :func:`moeprune.loading.load_model`). ``force`` accepts a mask planned for a model with another config hash.
    ``recover``: :class:`~moeprune.recovery.RecoveryOptions` to compute a recovery first (router-kd, merge; on
    the model loaded as ``dtype``/``device`` place it, then freed before the export reloads it), or a
    :class:`~moeprune.recovery.Recovery` computed earlier (:func:`recover`); the export is verified against the
    recovered model."""
    mask_file = None if isinstance(mask, ExpertMask) else mask
    mask = mask if isinstance(mask, ExpertMask) else ExpertMask.load(mask)
    if isinstance(model, str | Path):
        model = resolve_model_path(model)
    config = model.config if isinstance(model, torch.nn.Module) else model_config(model, trust_remote_code)
    check_mask_for_config(mask, config, force=force)
    _check_output(out, model, overwrite, mask_file)
    if not isinstance(model, torch.nn.Module):
        source = ModelSource.of(model, dtype=checkpoint_dtype(config) if dtype == "auto" else dtype, device=device,
                                trust_remote_code=trust_remote_code, stream=stream)
        if source.placement() == "stream":
            active = isinstance(recover, Recovery) or (isinstance(recover, RecoveryOptions) and recover.active)
            if active:
                raise MoePruneError(recovery_not_streamed(source))
            return export_streamed(source.open_stream(), mask, out, overwrite=overwrite, verify=verify,
                                   progress=progress, force=force, trust_remote_code=trust_remote_code)
    recovery = recover
    if isinstance(recover, RecoveryOptions):
        recovery = _recovery(model, mask, recover, config, dtype, device, trust_remote_code, tokenizer, progress) \
            if recover.active else None
        _release_memory()  # the copy recovery loaded is gone before the export loads the checkpoint again
    return export_pruned(
        model,
        mask,
        out,
        tokenizer=tokenizer,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        verify=verify,
        progress=progress,
        recovery=recovery,
    )


def recovery_not_streamed(source: ModelSource) -> str:
    """The one-line refusal of a recovery on a model that only fits streamed (docs/recovery.md)."""
    dtype = str(source.compute_dtype).removeprefix("torch.")
    return (f"--recover needs the whole model in memory (its weights alone take {gib(source.compute_bytes())} in "
            f"{dtype}; {available_memory().describe()}), and {source.name} is streamed from disk here; apply "
            "without --recover, or recover on a machine that holds the model (--no-stream forces loading it).")


def recover(
    model: Any,
    mask: ExpertMask | str | Path,
    options: RecoveryOptions,
    *,
    tokenizer: Any = None,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Recovery:
    """The recovery ``options`` asks for (router-kd, merge, merge+router-kd) of ``model`` under ``mask``, as a
    :class:`~moeprune.recovery.Recovery` (delta + record) to pass to :func:`apply` or to apply in memory::

        rec = api.recover(model, mask, RecoveryOptions(kind="router-kd"))
        with masked(model, mask):
            apply_delta(model, rec.delta)   # the recovered model, until the block ends
    """
    mask = mask if isinstance(mask, ExpertMask) else ExpertMask.load(mask)
    config = model.config if isinstance(model, torch.nn.Module) else load_config(resolve_model_path(model),
                                                                                   trust_remote_code)
    if not isinstance(model, torch.nn.Module):
        source = ModelSource.of(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if source.placement() == "stream":
            raise MoePruneError(recovery_not_streamed(source))
    return _recovery(model, mask, options, config, dtype, device, trust_remote_code, tokenizer, progress)


def _recovery(model: Any, mask: ExpertMask, options: RecoveryOptions, config: Any, dtype: str, device: str | None,
              trust_remote_code: bool, tokenizer: Any, progress: bool) -> Recovery:
    """Checks first (nothing to merge, an unmergeable layout: before any weight loads), then the recovery on
    the model (loaded here when given by name, and freed again)."""
    check_prunes([options.kind], mask.kept_per_layer, mask.num_experts, "the mask")
    corpora = recovery_corpora(options, mask)
    if options.merge:
        check_mergeable_config(config, trust_remote_code)
    loaded = checked_model(model, dtype, device, trust_remote_code)
    tok = checked_tokenizer(tokenizer, loaded, trust_remote_code)
    options = options if options.corpora else replace(options, corpora=tuple(corpora))
    return recover_loaded(loaded, mask, options, tokenizer=tok, progress=progress)


def prune(
    model: Any,
    retain: float,
    out: str | Path,
    *,
    method: str = "tb-coverage",
    calibration: Calibration | None = None,
    workdir: str | Path | None = None,
    seed: int = 0,
    protect_budget: int | str | None = None,
    candidate: str | None = None,
    reconstruction: ReconstructionOptions | Mapping[str, Any] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    overwrite: bool = False,
    ppl_datasets: Sequence[str] | None = None,
    progress: bool = True,
    recover: RecoveryOptions | None = None,
    stream: bool | None = None,
) -> Path:
    """Profile, plan and apply in one call; the profile is kept in ``workdir`` (default ``OUT.work``).
    ``calibration``: the profiling corpora and windows (None: the model's preset, as on the CLI);
    ``recover``: a recovery computed on the loaded model before the export (see :func:`apply`); ``stream``: every
    stage reads the weights from disk one decoder layer at a time (None: when the model does not fit in memory).

    With ``ppl_datasets`` the dense model and the written checkpoint are scored on those held-out sets
    and a table is printed (and saved as ``workdir/perplexity.json``)."""
    calibration = calibration if calibration is not None else Calibration.from_preset(preset_for(model))
    recon = ReconstructionOptions.coerce(reconstruction)
    workdir = Path(workdir) if workdir else Path(str(out).rstrip("/") + ".work")
    _check_output(out, model, overwrite, workdir)  # before profiling, not after
    if not isinstance(model, torch.nn.Module):
        source = ModelSource.of(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                tokenizer=tokenizer, stream=stream)
        if source.placement() == "stream":
            if recover is not None and recover.active:
                raise MoePruneError(recovery_not_streamed(source))
            return _prune_streamed(source, retain, out, workdir, calibration, recon, method=method, seed=seed,
                                   protect_budget=protect_budget, candidate=candidate, overwrite=overwrite,
                                   ppl_datasets=ppl_datasets, progress=progress)
    loaded = checked_model(model, dtype, device, trust_remote_code)
    # apply gets what was asked for (a path, None: the model's own), not the loaded object, so that it copies
    # the tokenizer files byte for byte instead of re-saving them (see surgery/tokenizer_files.py)
    requested_tokenizer = tokenizer
    tokenizer = checked_tokenizer(tokenizer, loaded, trust_remote_code)
    profiled = profile(
        loaded,
        calibration.corpora,
        workdir,
        samples=calibration.samples,
        seq_len=calibration.seq_len,
        batch_size=calibration.batch_size,
        seed=seed,
        tokenizer=tokenizer,
        progress=progress,
    )
    mask = plan(
        workdir,
        method,
        retain,
        corpora=profiled.names,  # this run's corpora: a workdir profiled earlier with others must not pool them
        seed=seed,
        protect_budget=protect_budget,
        candidate=candidate,
        model=loaded,
        reconstruction=replace(recon, tokenizer=tokenizer),
        progress=progress,
    )
    mask.save(workdir / mask_filename(mask))
    ppl_seq_len = preset_for(model)["ppl_seq_len"]
    dense_ppl = _perplexities(loaded, tokenizer, ppl_datasets, ppl_seq_len, progress) if ppl_datasets else None
    recovery = None
    if recover is not None and recover.active:  # on the model already loaded, before it is freed below
        recovery = _recovery(loaded, mask, recover, loaded.config, dtype, device, trust_remote_code, tokenizer,
                             progress)
    # Exported from the checkpoint itself when we have one, so the output keeps its dtype (on a CPU the
    # loaded copy is float32, see loading.load_model).
    source = loaded if isinstance(model, torch.nn.Module) else model
    if not isinstance(model, torch.nn.Module):
        del loaded  # apply reloads the checkpoint: never hold two dense copies (GPU or CPU) at once
    written = apply(
        source,
        mask,
        out,
        dtype=dtype,
        tokenizer=requested_tokenizer,
        device=device,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        progress=progress,
        recover=recovery,
    )
    if dense_ppl is not None:
        pruned = load_model(written, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        pruned_ppl = _perplexities(pruned, tokenizer, ppl_datasets, ppl_seq_len, progress)
        _report_perplexity(dense_ppl, pruned_ppl, mask, workdir)
    return written


def _prune_streamed(source: ModelSource, retain: float, out: str | Path, workdir: Path, calibration: Calibration,
                    recon: ReconstructionOptions, *, method: str, seed: int, protect_budget: int | str | None,
                    candidate: str | None, overwrite: bool, ppl_datasets: Sequence[str] | None,
                    progress: bool) -> Path:
    """:func:`prune` with every stage streamed from disk: each reads the layers again, nothing is held whole."""
    settings = dict(dtype=source.dtype, device=source.device, trust_remote_code=source.trust_remote_code)
    profiled = profile(source.name, calibration.corpora, workdir, samples=calibration.samples,
                       seq_len=calibration.seq_len, batch_size=calibration.batch_size, seed=seed,
                       tokenizer=source.tokenizer, progress=progress, stream=True, **settings)
    mask = plan(workdir, method, retain, corpora=profiled.names, seed=seed, protect_budget=protect_budget,
                candidate=candidate, model=source.name, progress=progress,
                reconstruction=replace(recon, tokenizer=source.tokenizer, stream=True, **settings))
    mask.save(workdir / mask_filename(mask))
    written = apply(source.name, mask, out, tokenizer=source.tokenizer, overwrite=overwrite, progress=progress,
                    stream=True, **settings)
    if ppl_datasets:
        seq_len = preset_for(source.name)["ppl_seq_len"]
        dense = source.open_stream()
        tokenizer = checked_tokenizer(source.tokenizer, dense.model, source.trust_remote_code)
        dense_ppl = _perplexities(dense, tokenizer, ppl_datasets, seq_len, progress)
        pruned = source.with_model(str(written)).open_stream()
        _report_perplexity(dense_ppl, _perplexities(pruned, tokenizer, ppl_datasets, seq_len, progress), mask,
                           workdir)
    return written


def evaluate(
    model: Any,
    mask: ExpertMask | str | Path | None = None,
    settings: EvalSettings | None = None,
    *,
    out: str | Path | None = None,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    progress: bool = True,
    stream: bool | None = None,
) -> dict[str, Any]:
    """Perplexity and zero-shot accuracy of ``model`` (a path, hub id, "bundled", a pruned checkpoint or a loaded
    model), under ``mask`` (applied in memory, restored afterwards) when given; written atomically to ``out``.

    ``settings``: what to measure (:class:`~moeprune.options.EvalSettings`); None is the model's preset: the
    bundled testbed's six domains and held-out tasks, else wikitext2, c4 and the six tasks of Common Avg.
    Returns the result dict with its ``summary`` (docs/experiments.md)."""
    return evaluate_model(model, mask=mask, settings=settings, dtype=dtype, device=device,
                          trust_remote_code=trust_remote_code, out=out, tokenizer=tokenizer, progress=progress,
                          stream=stream)


def _perplexities(model: Any, tokenizer: Any, datasets: Sequence[str], seq_len: int, progress: bool) -> dict[str, dict]:
    seq_len = min(seq_len, int(getattr(model.config, "max_position_embeddings", seq_len) or seq_len))
    return {name: perplexity(model, tokenizer, name, seq_len=seq_len, progress=progress) for name in datasets}


def _report_perplexity(dense: dict[str, dict], pruned: dict[str, dict], mask: ExpertMask, workdir: Path) -> None:
    print(f"\nheld-out perplexity, {mask.method} keeping {mask.kept_per_layer} of {mask.num_experts} experts per layer")
    print(f"{'dataset':<12}{'dense':>10}{'pruned':>10}{'ratio':>8}")
    for name in dense:
        a, b = dense[name]["ppl"], pruned[name]["ppl"]
        print(f"{name:<12}{a:>10.2f}{b:>10.2f}{b / a:>8.2f}")
    write_json_atomic(workdir / "perplexity.json", {"dense": dense, "pruned": pruned, "mask": mask.to_json()})


def _release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fits(model: Any, device: str | None, dtype: str = "auto", trust_remote_code: bool = False) -> bool:
    """Whether the weights (in ``dtype``) fit in the free memory of the GPU(s) they would load on."""
    return fits_on_gpus(model, dtype, device, trust_remote_code)


def _sequential_dtype(model: Any, dtype: str, run_on: str, trust_remote_code: bool) -> str | torch.dtype:
    """Weights parked on the CPU for a layer-sequential run keep the checkpoint's dtype when the layers
    run on an accelerator ("auto" would mean fp32 for CPU-loaded weights, see loading.load_model)."""
    if dtype != "auto" or str(run_on).startswith("cpu") or isinstance(model, torch.nn.Module):
        return dtype
    return checkpoint_dtype(load_config(model, trust_remote_code))


def _auto_budget_setup(
    prof: Profile, model: Any, options: ReconstructionOptions
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The loaded model and the held-out calibration windows that ``-B auto`` scores budgets on."""
    model = model if model is not None else prof.meta.get("model")
    if not model:
        raise MoePruneError("-B auto needs the model: pass --model (the profile records none).")
    loaded = checked_model(model, options.dtype, options.device, options.trust_remote_code)
    _check_same_model(prof, loaded)
    return loaded, auto_budget.held_out_sets(prof, checked_tokenizer(None, loaded, options.trust_remote_code))


def _reconstruct(
    prof: Profile, kept: list[int], model: Any, workdir: Path | None, options: ReconstructionOptions, progress: bool
) -> dict[int, dict[int, tuple[list[int], float]]]:
    """ExpertSparsity selections for each K, from activations captured once into the work directory
    (``options``: see :class:`~moeprune.options.ReconstructionOptions`; unset ones come from the model's preset)."""
    if model is None:
        model = prof.meta.get("model")
        if not model:
            raise MoePruneError("expert-sparsity needs the model: pass --model (the profile records none).")
    opts = options.resolved(preset_for(model))
    source = ModelSource.of(model, dtype=opts.dtype, device=opts.device, trust_remote_code=opts.trust_remote_code,
                            stream=opts.stream)
    streamed = source.open_stream() if source.placement() == "stream" else None
    loaded = streamed.model if streamed is not None else checked_model(model, opts.dtype, opts.device,
                                                                       opts.trust_remote_code)
    _check_same_model(prof, loaded)
    spec = _reconstruction_corpus(prof, opts.corpus)
    check_seq_len(loaded.config, opts.seq_len, "--recon-seq-len")  # as prune refuses it, for plan and experiment too
    tokenizer = checked_tokenizer(opts.tokenizer, loaded, opts.trust_remote_code)
    windows = calibration_windows(spec, tokenizer, opts.windows, opts.seq_len, opts.seed)
    if streamed is not None:
        return reconstruction_selection_streamed(streamed, windows, kept, progress=progress, loss=opts.loss,
                                                 token_budget=opts.tokens)
    workdir = Path(opts.workdir or workdir or "moeprune-work")
    key = f"{spec.name}-{windows.shape[0]}x{windows.shape[1]}-seed{opts.seed}"
    return reconstruction_selection(
        loaded, windows, kept, workdir, key, corpus=spec.name, progress=progress,
        loss=opts.loss, token_budget=opts.tokens,
    )


def _check_same_model(prof: Profile, model: Any) -> None:
    """A profile is only meaningful for the model it was made from: refuse any other."""
    recorded, actual = prof.meta.get("config_hash"), config_hash(model.config)
    if recorded and recorded != actual:
        raise MoePruneError(
            f"The profile was made from {prof.meta.get('model')!r} (config hash {recorded}), but the model given "
            f"for planning, {model_name(model)!r}, has config hash {actual}. Profile this model first, or pass "
            "the profiled model with --model."
        )


def _reconstruction_corpus(prof: Profile, name: str | None) -> CorpusSpec:
    if name is not None:
        return parse_corpus(name)
    chosen = RECONSTRUCTION_CORPUS if RECONSTRUCTION_CORPUS in prof.names else prof.names[-1]
    recorded = prof.corpora[chosen].meta.get("corpus")
    return CorpusSpec(**recorded) if recorded else parse_corpus(chosen)


def _check_output(out: str | Path, model: Any, overwrite: bool, *other_sources: Any) -> None:
    """The output directory must not overlap the model (or the other sources), nor exist without overwrite."""
    source = resolve_model_path(model) if isinstance(model, str | Path) else None
    check_output_dir(out, sources=[source, *other_sources], overwrite=overwrite)
