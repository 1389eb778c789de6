"""The pipeline's verbs as Python functions: profile -> plan -> apply (prune does all three), recover, evaluate.

Each takes what the previous one wrote (a profile directory, a mask file) or the object itself, so a
notebook and the CLI run the same code::

    from moeprune import api
    prof = api.profile("Qwen/Qwen1.5-MoE-A2.7B", ["wikitext2", "c4"], "prof/")
    mask = api.plan(prof, "tb-coverage", 0.5, model="Qwen/Qwen1.5-MoE-A2.7B")
    api.apply("Qwen/Qwen1.5-MoE-A2.7B", mask, "qwen-50/")
    results = api.evaluate("Qwen/Qwen1.5-MoE-A2.7B", mask)   # or the written checkpoint "qwen-50/"

A verb's model is a path, a hub id, ``bundled``, a loaded model or a :class:`~moeprune.loading.ModelSource`
(which carries dtype, device, trust_remote_code and the tokenizer: ``ModelSource.of("M", device="cpu")``).
Settings are resolved once, here at the door: every options object (``Calibration``, ``ReconstructionOptions``,
``RecoveryOptions``, ``EvalSettings``; a dict of their fields works too) is filled from the model source's preset
and checked (the window rule, types) before anything loads; the stages below take resolved values only.

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

from moeprune.data.corpora import LOCAL_KINDS, CorpusSpec, corpus_fingerprint, corpus_spec_from_record, parse_corpus
from moeprune.data.sampling import calibration_windows
from moeprune.errors import MoePruneError
from moeprune.evaluation.perplexity import held_out_nll, perplexity
from moeprune.evaluation.runner import evaluate_model
from moeprune.io import check_output_dir, output_root, write_json_atomic
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
from moeprune.options import Calibration, EvalSettings, ReconstructionOptions, check_path, check_switches, plain
from moeprune.planning import auto_budget, candidate_needed, paper_protect_budget, registry
from moeprune.planning import plan as plan_from_profile
from moeprune.planning.fit import check_mask_for_config, check_mask_layers
from moeprune.planning.mask import ExpertMask, kept_count
from moeprune.planning.request import PlanRequest
from moeprune.preflight import (
    check_dequantize,
    check_eval_out,
    check_evaluation,
    check_model,
    check_profile,
    check_recovery,
    check_something_to_measure,
    input_files,
    recovery_options,
)
from moeprune.presets import PAPER, PRESETS, is_bundled, preset_for  # noqa: F401 (re-export)
from moeprune.profiling.runner import SEQUENTIAL_ONE_PROCESS, is_distributed, profile_model, weights_fingerprint
from moeprune.profiling.stats import Profile
from moeprune.reconstruction import SearchSettings, WorkDir, reconstruction_selection, reconstruction_selection_streamed
from moeprune.recovery import Recovery, RecoveryOptions, recovery_corpora
from moeprune.recovery import recover as recover_loaded
from moeprune.streaming.memory import available_memory, gib
from moeprune.streaming.parked import spill_into
from moeprune.surgery import ExportOptions, export_pruned
from moeprune.surgery.export import STREAMED_DEQUANTIZE, export_streamed

log = logging.getLogger("moeprune")

# The reconstruction candidate is fitted on C4 in the paper; without C4 we use the last profiled corpus.
RECONSTRUCTION_CORPUS = "c4"


def source_of(model: Any) -> ModelSource:
    """The verb's model as a :class:`ModelSource` (a string, a path, a loaded model or a source)."""
    return ModelSource.of(model)


def _typed(value: Any, cls: type, what: str) -> Any:
    """``value`` as a ``cls`` (itself, None: all defaults, or a dict of its fields); anything else is one line."""
    if value is None or isinstance(value, cls | Mapping):
        return cls.coerce(value)
    raise MoePruneError(f"{what} must be a {cls.__name__} or a dict of its fields, not {type(value).__name__}.")


def profile(
    model: Any,
    corpora: Sequence[str | CorpusSpec] | None = None,
    out: str | Path = "profile",
    *,
    calibration: Calibration | Mapping[str, Any] | None = None,
    sequential: bool | None = None,
    progress: bool = True,
    stream: bool | None = None,
) -> Profile:
    """Profile ``model`` (a path, hub id, ``bundled``, a loaded model or a :class:`ModelSource`) on each corpus
    into ``out``. ``corpora`` (names or specs) override ``calibration.corpora``; unset calibration fields are the
    model's preset.

    A model given by name loads where :meth:`ModelSource.load` places it (on the GPU when there is one).
    ``sequential=True`` keeps the weights on the CPU and runs one decoder layer at a time on the source's
    device; ``None`` (default) does so only when a model given by name does not fit in the free GPU memory.
    ``stream=True`` (or the source's ``stream``) reads the weights from the checkpoint's safetensors shards one
    decoder layer at a time (never the whole model in memory); ``None`` does so when the weights do not fit in the
    memory available to the process (see :meth:`ModelSource.placement`), ``False`` never.
    """
    check_path(out, "out")
    check_switches(sequential=sequential, progress=progress, stream=stream)
    source = ModelSource.of(source_of(model), stream=stream)
    settings = _typed(calibration, Calibration, "calibration")
    if corpora is not None:
        if isinstance(corpora, str | CorpusSpec) or not isinstance(corpora, Sequence):
            raise MoePruneError(f"corpora must be a list of corpus specs, not {type(corpora).__name__} "
                                "(e.g. ['wiki', 'web']).")
        settings = replace(settings, corpora=tuple(corpora))
    if sequential is not None and not isinstance(sequential, bool):
        raise MoePruneError(f"sequential must be True, False or None, not {sequential!r}.")
    streamed = source.placement() == "stream"
    if sequential is None and not source.is_loaded and not streamed:
        sequential = not fits_on_gpus(source.name, source.dtype, source.device, source.trust_remote_code)
    if (sequential or streamed) and settings.checkpoint_every is not None:
        raise MoePruneError(f"--checkpoint-every does not apply to {'--stream' if streamed else '--sequential'} (a "
                            "layer-by-layer run finishes each layer for all windows; a killed run starts the corpus "
                            "over); drop it.")
    if sequential and is_distributed():
        raise MoePruneError(SEQUENTIAL_ONE_PROCESS)
    # before loading: never over the model or a corpus; readable corpora; windows within the model's positions
    settings = check_profile(source, settings, out)
    specs = [c if isinstance(c, CorpusSpec) else parse_corpus(c) for c in settings.corpora]
    if streamed:
        layers = source.open_stream()
        tokenizer = source.load_tokenizer(layers.model)
        with spill_into(out):  # parked activations above the budget: a temporary file in the profile folder
            return profile_model(layers, tokenizer, specs, out, settings, progress=progress)
    sequential_device = None
    if sequential:
        sequential_device = source.device or ("cuda" if torch.cuda.is_available() else "cpu")
        source = ModelSource.of(source, device="cpu", dtype=_sequential_dtype(source, sequential_device))
    loaded = source.load()
    tokenizer = source.load_tokenizer(loaded)
    with spill_into(out):  # --sequential parks its activations as a streamed run does
        return profile_model(loaded, tokenizer, specs, out, settings, progress=progress,
                             sequential_device=sequential_device)


def plan(
    profile: Profile | str | Path,
    method: str | PlanRequest = "tb-coverage",
    retain: float | None = None,
    *,
    model: Any = None,
    reconstruction: ReconstructionOptions | Mapping[str, Any] | None = None,
    progress: bool = True,
    **request: Any,
) -> ExpertMask:
    """One mask; see :func:`plan_many` for several retain ratios sharing one reconstruction (and for planning on
    some corpora of a profile folder). ``request``: the :class:`~moeprune.planning.request.PlanRequest` fields
    (seed, protect_budget, candidate, score_corpus)."""
    retain, request = plain(retain), {name: plain(v) for name, v in request.items()}
    if retain is not None and (isinstance(retain, bool) or not isinstance(retain, int | float)):
        raise MoePruneError(f"Retain ratio {retain!r} must be a number in (0, 1], e.g. 0.5 to keep half.")
    return plan_many(profile, method, None if retain is None else [retain], model=model,
                     reconstruction=reconstruction, progress=progress, **request)[0]


def plan_many(
    profile: Profile | str | Path,
    method: str | PlanRequest,
    retains: Sequence[float] | None = None,
    *,
    model: Any = None,
    reconstruction: ReconstructionOptions | Mapping[str, Any] | None = None,
    corpora: Sequence[str] | None = None,
    candidate_masks: Mapping[float, ExpertMask] | None = None,
    progress: bool = True,
    **request: Any,
) -> list[ExpertMask]:
    """Masks for every retain ratio of the request (``method`` a :class:`PlanRequest`, or a method name with
    ``retains`` and the request's other fields by name: seed, protect_budget, candidate, score_corpus).

    Methods that need the model (expert-sparsity, tb-coverage with that candidate, tb-coverage with
    ``protect_budget="auto"``) load it from ``model`` (a name, a loaded model or a :class:`ModelSource`) or
    from the path recorded in the profile. ``score_corpus`` ranks reap on that profiled corpus alone.
    ``candidate_masks`` ({retain: a planned mask of the candidate method}, e.g. an experiment's expert-sparsity
    masks) gives a protecting method its candidate instead of computing it again; their reconstruction losses
    are recorded as for a candidate computed here. ``corpora`` (names) plans on those corpora of a profile
    folder only, not on every corpus profiled there."""
    req = PlanRequest.of(method, plain(list(retains)) if isinstance(retains, list | tuple) else retains,
                         {name: plain(v) for name, v in request.items()})
    spec = req.spec
    if candidate_masks is not None:
        registry.check_request(req.method, candidate_masks=candidate_masks)
    options = _typed(reconstruction, ReconstructionOptions, "reconstruction")
    workdir = Path(profile) if isinstance(profile, (str, Path)) else None
    if workdir is None and not isinstance(profile, Profile):
        raise MoePruneError(f"profile must be a profile directory or a Profile, not {type(profile).__name__}.")
    prof = Profile.load(profile, list(corpora) if corpora else None) if workdir is not None else profile
    candidate = registry.candidate_of(req.method, req.candidate)
    kept = [kept_count(r, prof.num_experts, prof.meta.get("top_k")) for r in req.retains]
    selections = None
    source = _planning_source(prof, model, req, candidate_masks)
    held_out = None
    if req.auto:  # loaded once, shared with the reconstruction below
        source, held_out = _auto_budget_setup(prof, source)
    # TB-Coverage with B >= K protects all K experts: its candidate is not needed there (issue 9).
    needed = [
        k for k in kept
        if spec.needs_model or req.auto or candidate_needed(prof.num_experts, k, req.protect_budget)
    ]
    given = _given_candidates(spec, candidate_masks, req.retains)
    if needed and given is None and registry.needs_model(req.method, req.candidate):
        selections = _reconstruct(prof, needed, source, workdir, options, progress)
    masks = []
    for retain, k in zip(req.retains, kept, strict=True):
        chosen, losses = given[retain] if given is not None else _found(selections, k)

        def plan_with(budget: int | str | None, retain: float = retain, chosen: Any = chosen) -> ExpertMask:
            one = replace(req, retains=(retain,), protect_budget=budget, candidate=candidate) if spec.protects \
                else replace(req, retains=(retain,))
            return plan_from_profile(
                prof, one,
                candidate_masks=chosen if spec.protects else None,
                precomputed=chosen if spec.needs_model and not spec.protects else None,
            )

        if req.auto:
            loaded = source.model
            mask = auto_budget.choose(plan_with, k, paper_protect_budget(prof.num_experts),
                                      lambda m, model=loaded: held_out_nll(model, m, held_out), held_out)
        else:
            mask = plan_with(req.protect_budget)
        if losses is not None and mask.candidate_used is not False:
            # For tb-coverage the loss is its candidate's, not the final mask's: say so in the name.
            prefix = "" if spec.needs_model else "candidate_"
            for layer, extra in losses.items():
                for key in ("reconstruction_loss", "search"):
                    if key in extra:
                        mask.layers[layer].extra[prefix + key] = extra[key]
        masks.append(mask)
    return masks


def _planning_source(prof: Profile, model: Any, req: PlanRequest, candidate_masks: Any) -> ModelSource | None:
    """The model source planning runs (a method that chooses with the model, -B auto), else None."""
    if not (req.auto or (candidate_masks is None and registry.needs_model(req.method, req.candidate))):
        return None
    model = model if model is not None else prof.meta.get("model")
    if model is None or model == "":
        what = "-B auto" if req.auto else "expert-sparsity"
        raise MoePruneError(f"{what} needs the model: pass --model (the profile records none).")
    return source_of(model)


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
    overwrite: bool = False,
    verify: bool = True,
    force: bool = False,
    recover: RecoveryOptions | Recovery | Mapping[str, Any] | str | None = None,
    progress: bool = True,
    dequantize: bool = False,
) -> Path:
    """Write the pruned checkpoint to ``out`` (atomically, verified against the in-memory masked model).

    ``model``: a path, hub id, ``bundled``, a loaded model or a :class:`ModelSource` (a model given by name loads
    in its checkpoint dtype on the GPU when there is one). ``force`` accepts a mask planned for a model with
    another config hash. ``recover``: :class:`~moeprune.recovery.RecoveryOptions` (or a kind such as
    ``"router-kd"``, or a dict of its fields; unset fields are the model's preset) to compute a recovery first on
    the model, then freed before the export reloads it; or a :class:`~moeprune.recovery.Recovery` computed earlier
    for this mask (:func:`recover`); the export is verified against the recovered model. A quantized checkpoint is
    written in its own format (docs/apply.md, "Quantized checkpoints"); ``dequantize`` writes it dequantized
    instead, without ``quantization_config``.

    A model that streams (``stream=True`` on the source, or too large for the memory available, see
    :meth:`ModelSource.placement`) is written shard by shard and verified layer by layer against the source
    streamed from disk (:func:`moeprune.surgery.export.export_streamed`); a recovery is then refused before
    anything loads."""
    check_path(out, "out")
    check_switches(overwrite=overwrite, verify=verify, force=force, progress=progress, dequantize=dequantize)
    source = source_of(model)
    mask_file = None if isinstance(mask, ExpertMask) else mask
    mask = _mask(mask)
    check_model(source)
    check_mask_for_config(mask, source.config, force=force)
    check_mask_layers(mask, source.config, source.trust_remote_code)
    check_dequantize(source, dequantize)
    recovery = _recovery_request(recover)
    writing = ExportOptions(overwrite=overwrite, verify=verify, force=force, dequantize=dequantize)
    streamed = _streamed_apply_source(source)
    if streamed is not None:
        if isinstance(recovery, Recovery) or (isinstance(recovery, RecoveryOptions) and recovery.active):
            raise MoePruneError(recovery_not_streamed(streamed))
        if dequantize:
            raise MoePruneError(STREAMED_DEQUANTIZE)
        _check_output(out, source, overwrite, mask_file)
        with spill_into(Path(out).absolute().parent):  # beside the checkpoint being written
            return export_streamed(streamed.open_stream(), mask, out, writing, progress=progress)
    recovering = isinstance(recovery, Recovery) or (isinstance(recovery, RecoveryOptions) and recovery.active)
    if recovering and not dequantize and source.quantization:
        raise MoePruneError(
            f"{source.name} is quantized ({source.quantization.get('quant_method', '?')}) and a recovery changes "
            "float tensors that its format cannot hold as they are; pass --dequantize with --recover (then quantize "
            "the result again, docs/apply.md), or apply without --recover."
        )
    if isinstance(recovery, Recovery):
        recovery.check_mask(mask)
    elif recovery is not None:
        recovery = _resolved_recovery(source, mask, recovery)
    recover_corpora = recovery.corpora if isinstance(recovery, RecoveryOptions) else None
    _check_output(out, source, overwrite, mask_file, *input_files(None, recover_corpora))
    if isinstance(recovery, RecoveryOptions):
        recovery = _recovery(source, mask, recovery, progress) if recovery.active else None
        _release_memory()  # the copy recovery loaded is gone before the export loads the checkpoint again
    return export_pruned(source, mask, out, writing, recovery=recovery, progress=progress)


def _streamed_apply_source(source: ModelSource) -> ModelSource | None:
    """The source apply streams (in the checkpoint's dtype, as apply keeps it), or None when it loads the model."""
    if source.is_loaded:
        return None
    kept = ModelSource.of(source, dtype=checkpoint_dtype(source.config) if source.dtype == "auto" else None)
    return kept if kept.placement() == "stream" else None


def recovery_not_streamed(source: ModelSource) -> str:
    """The one-line refusal of a recovery on a model that only fits streamed (docs/recovery.md)."""
    dtype = str(source.compute_dtype).removeprefix("torch.")
    return (f"--recover needs the whole model in memory (its weights alone take {gib(source.compute_bytes())} in "
            f"{dtype}; {available_memory().describe()}), and {source.name} is streamed from disk here; apply "
            "without --recover, or recover on a machine that holds the model (--no-stream forces loading it).")


def recover(
    model: Any,
    mask: ExpertMask | str | Path,
    options: RecoveryOptions | Mapping[str, Any] | str,
    *,
    progress: bool = True,
) -> Recovery:
    """The recovery ``options`` asks for (router-kd, merge, merge+router-kd; unset fields are the model's preset,
    windows no longer than the model's positions) of ``model`` under ``mask``, as a
    :class:`~moeprune.recovery.Recovery` (delta + record, which names the mask it was made for) to pass to
    :func:`apply` or to apply in memory::

        rec = api.recover(model, mask, RecoveryOptions(kind="router-kd"))
        with masked(model, mask):
            apply_delta(model, rec.delta)   # the recovered model, until the block ends
    """
    check_switches(progress=progress)
    source = source_of(model)
    mask = _mask(mask)
    options = _recovery_request(options)
    if not isinstance(options, RecoveryOptions):
        raise MoePruneError("recover() takes RecoveryOptions (or a kind such as 'router-kd'), not a Recovery.")
    if not source.is_loaded and source.placement() == "stream":
        raise MoePruneError(recovery_not_streamed(source))
    return _recovery(source, mask, _resolved_recovery(source, mask, options), progress)


def _mask(mask: Any) -> ExpertMask:
    if isinstance(mask, ExpertMask):
        return mask
    if isinstance(mask, str | Path):
        return ExpertMask.load(mask)
    raise MoePruneError(f"mask must be an ExpertMask or the path of a mask .json, not {type(mask).__name__}.")


def _recovery_request(value: Any) -> RecoveryOptions | Recovery | None:
    """``recover=`` as RecoveryOptions (a kind name or a dict of its fields works too) or a Recovery."""
    if value is None or isinstance(value, RecoveryOptions | Recovery):
        return value
    if isinstance(value, str):
        return RecoveryOptions(kind=value)
    if isinstance(value, Mapping):
        return _typed(dict(value), _RecoveryFields, "recover")
    raise MoePruneError(f"recover must be RecoveryOptions, a Recovery, a kind ('router-kd', 'merge', "
                        f"'merge+router-kd') or a dict of RecoveryOptions fields, not {type(value).__name__}.")


class _RecoveryFields:
    """RecoveryOptions built from a dict, with the one-line error for unknown keys."""

    @staticmethod
    def coerce(value: Mapping[str, Any]) -> RecoveryOptions:
        return recovery_options(value)


def _resolved_recovery(source: ModelSource, mask: ExpertMask, options: RecoveryOptions) -> RecoveryOptions:
    """The preset filled in and every check that needs no weights: something to merge, calibration text, a
    layout merge understands, windows within the model's positions."""
    if not options.active:
        return options.resolved(source)
    options = check_recovery(source, options, mask=mask)
    return options if options.corpora else replace(options, corpora=tuple(recovery_corpora(options, mask)))


def _recovery(source: ModelSource, mask: ExpertMask, options: RecoveryOptions, progress: bool) -> Recovery:
    """The recovery on the model (loaded here when given by name, and freed again)."""
    loaded = source.load()
    return recover_loaded(loaded, mask, options, tokenizer=source.load_tokenizer(loaded), progress=progress)


def prune(
    model: Any,
    retain: float | PlanRequest,
    out: str | Path,
    *,
    calibration: Calibration | Mapping[str, Any] | None = None,
    reconstruction: ReconstructionOptions | Mapping[str, Any] | None = None,
    recover: RecoveryOptions | Mapping[str, Any] | str | None = None,
    ppl_datasets: EvalSettings | Sequence[str] | None = None,
    workdir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Profile, plan and apply in one call; the profile is kept in ``workdir`` (default ``OUT.work``).
    ``retain``: a ratio in (0, 1], planned with tb-coverage and its defaults, or a
    :class:`~moeprune.planning.request.PlanRequest` of one ratio naming the method and its fields
    (``PlanRequest("random", 0.5, seed=1)``; a seeded method's seed defaults to ``calibration.seed``);
    ``calibration``: the profiling corpora and windows (unset fields: the model's preset, as on the CLI);
    ``recover``: a recovery computed on the loaded model before the export (see :func:`apply`).

    With ``ppl_datasets`` (names, or EvalSettings) the dense model and the written checkpoint are scored on
    those held-out sets and a table is printed (and saved as ``workdir/perplexity.json``)."""
    check_path(out, "out")
    if workdir is not None:
        check_path(workdir, "workdir")
    check_switches(overwrite=overwrite, progress=progress)
    retain = plain(retain)  # a numpy ratio; a PlanRequest as it is
    source = source_of(model)
    calibration = _typed(calibration, Calibration, "calibration")
    req = _one_plan(retain)
    if req.seed is None and req.seeded:  # a seeded method follows the calibration seed
        req = replace(req, seed=calibration.seed)
    recon = _typed(reconstruction, ReconstructionOptions, "reconstruction")
    options = _recovery_request(recover)  # every type checked before anything is read from the model
    if isinstance(options, Recovery):
        raise MoePruneError("prune computes its own recovery: pass RecoveryOptions (or a kind), not a Recovery.")
    calibration = calibration.resolved(source)
    if registry.needs_model(req.method, req.candidate):
        recon = recon.resolved(source)
    evaluation = None
    if ppl_datasets:
        evaluation = ppl_datasets if isinstance(ppl_datasets, EvalSettings) else EvalSettings(
            ppl_datasets=_names(ppl_datasets, "ppl_datasets"))
        evaluation = evaluation.resolved(source)
    workdir = Path(workdir) if workdir else Path(str(out).rstrip("/") + ".work")
    if options is not None and options.active and not options.corpora:
        # This run's own calibration corpora (specs), not names read back from the mask it plans (issue 27).
        options = replace(options, corpora=tuple(str(c) for c in calibration.corpora))
    ppl_files = [Path(p) for p in (evaluation.ppl_datasets if evaluation else ()) if Path(p).exists()]
    # before profiling, not after; every local input counts (an --overwrite must never delete one)
    _check_output(out, source, overwrite, workdir,
                  *input_files(None, calibration.corpora, options.corpora if options is not None else None), *ppl_files)
    if not source.is_loaded and source.placement() == "stream":
        if options is not None and options.active:
            raise MoePruneError(recovery_not_streamed(source))
        return _prune_streamed(source, req, out, workdir, calibration, recon, evaluation, overwrite, progress)
    loaded = source.load()
    # apply gets the tokenizer asked for (a path, None: the model's own), not the loaded object, so that it copies
    # the tokenizer files byte for byte instead of re-saving them (see surgery/tokenizer_files.py)
    tokenizer = source.load_tokenizer(loaded)
    running = ModelSource.of(source.with_model(loaded), tokenizer=tokenizer)
    profiled = profile(running, out=workdir, calibration=calibration, progress=progress)
    (mask,) = plan_many(
        workdir,
        req,
        corpora=profiled.names,  # this run's corpora: a workdir profiled earlier with others must not pool them
        model=running,
        reconstruction=recon,
        progress=progress,
    )
    mask.save(workdir / mask_filename(mask))
    dense_ppl = _perplexities(loaded, tokenizer, evaluation, progress) if evaluation else None
    recovery = None
    if options is not None and options.active:  # on the model already loaded, before it is freed below
        recovery = _recovery(running, mask, _resolved_recovery(source, mask, options), progress)
    # Exported from the checkpoint itself when we have one, so the output keeps its dtype (on a CPU the
    # loaded copy is float32, see loading.load_model).
    target = running if source.is_loaded else source
    if not source.is_loaded:
        del loaded, running  # apply reloads the checkpoint: never hold two dense copies (GPU or CPU) at once
    written = apply(target, mask, out, overwrite=overwrite, progress=progress, recover=recovery)
    if dense_ppl is not None:
        pruned = ModelSource.of(source.with_model(str(written)), tokenizer=None).load()
        pruned_ppl = _perplexities(pruned, tokenizer, evaluation, progress)
        _report_perplexity(dense_ppl, pruned_ppl, mask, workdir)
    return written


def _prune_streamed(source: ModelSource, req: PlanRequest, out: str | Path, workdir: Path, calibration: Calibration,
                    recon: ReconstructionOptions, evaluation: EvalSettings | None, overwrite: bool,
                    progress: bool) -> Path:
    """:func:`prune` with every stage streamed from disk: each reads the layers again, nothing is held whole."""
    source = ModelSource.of(source, stream=True)
    # a layer-by-layer run never checkpoints (the preset's --checkpoint-every does not apply)
    profiled = profile(source, out=workdir, calibration=replace(calibration, checkpoint_every=None), progress=progress)
    (mask,) = plan_many(workdir, req, corpora=profiled.names, model=source, reconstruction=recon, progress=progress)
    mask.save(workdir / mask_filename(mask))
    written = apply(source, mask, out, overwrite=overwrite, progress=progress)
    if evaluation is not None:
        _streamed_ppl_report(source, written, mask, evaluation, workdir, progress)
    return written


def _streamed_ppl_report(source: ModelSource, written: Path, mask: ExpertMask, evaluation: EvalSettings,
                         workdir: Path, progress: bool) -> None:
    """prune --ppl streamed: the dense source and the written checkpoint, each read layer by layer."""
    with spill_into(workdir):
        dense = source.open_stream()
        tokenizer = source.load_tokenizer(dense.model)
        dense_ppl = _perplexities(dense, tokenizer, evaluation, progress)
        pruned = ModelSource.of(source.with_model(str(written)), tokenizer=None).open_stream()
        _report_perplexity(dense_ppl, _perplexities(pruned, tokenizer, evaluation, progress), mask, workdir)


def _one_plan(retain: Any) -> PlanRequest:
    """prune's plan: tb-coverage at one ratio, or a PlanRequest of one ratio."""
    if not isinstance(retain, PlanRequest):
        return PlanRequest.of("tb-coverage", [retain])
    if len(retain.retains) != 1:
        raise MoePruneError(f"prune makes one mask: give a PlanRequest of one retain ratio, not {len(retain.retains)} "
                            f"({', '.join(map(str, retain.retains))}).")
    return retain


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise MoePruneError(f"{what} must be a list of names, not {type(value).__name__} (e.g. ['wiki', 'web']).")
    return tuple(value)


def evaluate(
    model: Any,
    mask: ExpertMask | str | Path | None = None,
    settings: EvalSettings | Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity and zero-shot accuracy of ``model`` (a path, hub id, "bundled", a pruned checkpoint, a loaded
    model or a :class:`ModelSource`), under ``mask`` (applied in memory, restored afterwards) when given; written
    atomically to ``out``. ``force`` accepts a mask planned for a model with another config hash.

    ``settings``: what to measure (:class:`~moeprune.options.EvalSettings` or a dict of its fields); unset fields
    are the model's preset: the bundled testbed's six domains and held-out tasks, else wikitext2, c4 and the six
    tasks of Common Avg. Returns the result dict with its ``summary`` (docs/experiments.md)."""
    if out is not None:
        check_path(out, "out")
    check_switches(overwrite=overwrite, force=force, progress=progress)
    if overwrite and out is None:  # as eval --overwrite without --out
        raise MoePruneError("overwrite=True has no effect here: it applies only with out; drop it.")
    if force and mask is None:
        raise MoePruneError("force=True has no effect here: it applies only with a mask; drop it.")
    source = source_of(model)
    settings = check_evaluation(source, _typed(settings, EvalSettings, "settings"))
    check_something_to_measure(settings.ppl_datasets, settings.tasks)
    check_model(source)
    if out is not None:  # as the CLI: never the mask, a file of the model or another input
        check_eval_out(out, source, mask, settings, overwrite)
    if mask is not None:
        mask_file = None if isinstance(mask, ExpertMask) else mask
        checked = _mask(mask)
        check_mask_for_config(checked, source.config, force=force)
        check_mask_layers(checked, source.config, source.trust_remote_code)
        mask = mask_file if mask_file is not None else checked
    with spill_into(None if out is None else Path(out).absolute().parent):  # streamed: parked activations' spill
        return evaluate_model(source, mask=mask, settings=settings, out=out, overwrite=overwrite, progress=progress)


def _perplexities(model: Any, tokenizer: Any, evaluation: EvalSettings, progress: bool) -> dict[str, dict]:
    return {name: perplexity(model, tokenizer, name, evaluation, progress=progress) for name in evaluation.ppl_datasets}


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


def _sequential_dtype(source: ModelSource, run_on: str) -> str | torch.dtype:
    """Weights parked on the CPU for a layer-sequential run keep the checkpoint's dtype when the layers
    run on an accelerator ("auto" would mean fp32 for CPU-loaded weights, see loading.load_model)."""
    if source.dtype != "auto" or str(run_on).startswith("cpu") or source.is_loaded:
        return source.dtype
    return checkpoint_dtype(source.config)


def _auto_budget_setup(prof: Profile, source: ModelSource) -> tuple[ModelSource, dict[str, torch.Tensor]]:
    """The loaded model (as a source) and the held-out calibration windows that ``-B auto`` scores budgets on."""
    if not source.is_loaded and source.placement() == "stream":
        raise MoePruneError("-B auto scores every budget on the model in memory, and this model streams from disk "
                            "here; pass a number (-B 20) or --no-stream on a machine that holds the model.")
    loaded = source.load()
    _check_same_model(prof, loaded)
    return source.with_model(loaded), auto_budget.held_out_sets(prof, source.load_tokenizer(loaded))


def _reconstruct(
    prof: Profile, kept: list[int], source: ModelSource, workdir: Path | None, options: ReconstructionOptions,
    progress: bool,
) -> dict[int, dict[int, tuple[list[int], float]]]:
    """ExpertSparsity selections for each K, from activations captured once into the work directory
    (``options``: see :class:`~moeprune.options.ReconstructionOptions`; unset ones are the model's preset)."""
    opts = options.resolved(source)  # the window rule, before the model loads
    streamed = source.open_stream() if not source.is_loaded and source.placement() == "stream" else None
    loaded = streamed.model if streamed is not None else source.load()
    _check_same_model(prof, loaded)
    spec = _reconstruction_corpus(prof, opts.corpus)
    tokenizer = source.load_tokenizer(loaded)
    windows = calibration_windows(spec, tokenizer, opts.windows, opts.seq_len, opts.seed)
    search = SearchSettings(loss=opts.loss, token_budget=opts.tokens)
    if streamed is not None:  # one layer-major pass, nothing captured (parked activations may spill there)
        with spill_into(opts.workdir or workdir):
            return reconstruction_selection_streamed(streamed, windows, kept, search, progress=progress)
    workdir = Path(opts.workdir or workdir or "moeprune-work")
    key = f"{spec.name}-{windows.shape[0]}x{windows.shape[1]}-seed{opts.seed}"
    with output_root(workdir):  # reconstruction/<key>/ below it: never through a link
        return reconstruction_selection(loaded, windows, kept, WorkDir(workdir, key), search, corpus=spec.name,
                                        progress=progress)


def _check_same_model(prof: Profile, model: Any) -> None:
    """A profile is only meaningful for the model it was made from: refuse any other, by config hash and, where
    both are known, by weights fingerprint (another checkpoint of one architecture, or weights changed since)."""
    recorded, actual = prof.meta.get("config_hash"), config_hash(model.config)
    if recorded and recorded != actual:
        raise MoePruneError(
            f"The profile was made from {prof.meta.get('model')!r} (config hash {recorded}), but the model given "
            f"for planning, {model_name(model)!r}, has config hash {actual}. Profile this model first, or pass "
            "the profiled model with --model."
        )
    weights, now = prof.meta.get("weights_sha256"), weights_fingerprint(model)
    if weights and now and weights != now:
        raise MoePruneError(
            f"The profile was made from other weights than {model_name(model)!r} has now (same config, another "
            "weights fingerprint: another checkpoint, or these weights changed since). Profile this model first, "
            "or pass the profiled model with --model."
        )


def _reconstruction_corpus(prof: Profile, name: str | None) -> CorpusSpec:
    if name is not None:
        return parse_corpus(name)
    chosen = RECONSTRUCTION_CORPUS if RECONSTRUCTION_CORPUS in prof.names else prof.names[-1]
    meta = prof.corpora[chosen].meta
    if not meta.get("corpus"):
        return parse_corpus(chosen)
    fix = "pass the corpus with --recon-corpus"
    spec = corpus_spec_from_record(meta["corpus"], f"The profile of {chosen}", fix)
    # A file a profile names is read only if it is the file that was profiled (a record from elsewhere could
    # name any file): its SHA-256 must be the one recorded.
    if spec.kind in LOCAL_KINDS and (not meta.get("corpus_sha256") or not Path(spec.source).is_file()
                                     or corpus_fingerprint(spec) != meta["corpus_sha256"]):
        raise MoePruneError(f"The profile of {chosen} names the corpus file {spec.source}, which is missing or not the "
                            f"file that was profiled (SHA-256 differs); {fix}.")
    return spec


def _check_output(out: str | Path, source: ModelSource, overwrite: bool, *other_sources: Any) -> None:
    """The output directory must not overlap the model, its tokenizer (or the other sources), nor exist without
    overwrite."""
    tokenizer = source.tokenizer if isinstance(source.tokenizer, str | Path) else None
    model = None if source.is_loaded else source.name
    check_output_dir(out, sources=[model, tokenizer, *other_sources], overwrite=overwrite)
