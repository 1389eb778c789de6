"""The paper's grid: every method x retain ratio (random once per seed), evaluated against the dense model.

``out_dir`` layout (every file written atomically, every stage resumable)::

    profile/            api.profile (finished corpora are reused)
    masks/<m>-<rho>[-seed<s>].json
    cells/<cell-id>.json   one evaluation each: "dense" or the mask's file stem; a finished cell is skipped
                           (a recovered cell: "<mask stem>+<recovery>", e.g. reap-0.50+router-kd)
    recovery/<cell-id>-<key>/  the recovery delta of that cell (delta.safetensors + recovery.json), keyed by a
                           hash of the mask, the recovery settings and the model: a rerun reuses it
    experiment.json     the settings; a rerun with different settings is refused (its cells would not compare)
    results.json, results.csv, report.md, plots/*.png

One model is loaded for everything: profiling, reconstruction and every cell (masks are applied in
memory with ``surgery.masked``, which restores the model afterwards). A model that streams (``--stream``, or too
large for the memory available) is never loaded whole: every stage reads its decoder layers from disk one at a
time (the profile, expert-sparsity's pass, and each cell's evaluation, its mask applied to each layer as it is
read), so streamed cells equal in-memory ones; recovery is refused up front there.

Orchestration only: this module sits above :mod:`moeprune.api` (profile, plan_many) and calls the
evaluation and recovery stages below it; nothing in the package imports it but the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moeprune import api
from moeprune.arch.adapters import routing_meta
from moeprune.data.corpora import corpus_fingerprint, parse_corpus
from moeprune.errors import MoePruneError
from moeprune.evaluation import footprint, report, runner
from moeprune.evaluation.coverage import DENSE
from moeprune.evaluation.runner import resolve_tasks
from moeprune.evaluation.zeroshot import reuse_lm_eval
from moeprune.io import (
    SEAL_KEY,
    check_own_folder,
    file_sha256,
    make_dirs,
    output_root,
    path_inside,
    read_json,
    remove_orphan_temp_files,
    seal_intact,
    sealed,
    without_file,
    write_json_atomic,
    write_text_atomic,
)
from moeprune.loading import ModelSource, config_hash, model_name
from moeprune.options import (
    Calibration,
    EvalSettings,
    GridOptions,
    PresetSource,
    ReconstructionOptions,
    check_path,
    check_switches,
)
from moeprune.planning import registry
from moeprune.planning.mask import ExpertMask, kept_count
from moeprune.planning.request import PlanRequest
from moeprune.profiling.runner import tokenizer_fingerprint, weights_fingerprint
from moeprune.profiling.stats import Profile
from moeprune.recovery import (
    KINDS,
    NONE,
    Recovery,
    RecoveryOptions,
    calibration_set,
    check_mergeable,
    check_prunes,
    recover,
    teacher_targets,
)
from moeprune.streaming.layers import DiskLayers

log = logging.getLogger(__name__)


REAP_PROFILE = "profile-reap"  # its own profile, so the generic methods never see the REAP corpus


def all_methods() -> list[str]:
    return registry.names()


def run_experiment(
    model: Any,
    out_dir: str | Path,
    *,
    grid: GridOptions | Mapping[str, Any] | None = None,
    calibration: Calibration | Mapping[str, Any] | None = None,
    reconstruction: ReconstructionOptions | Mapping[str, Any] | None = None,
    evaluation: EvalSettings | Mapping[str, Any] | None = None,
    recovery: RecoveryOptions | Mapping[str, Any] | None = None,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Profile once, plan every mask, evaluate dense + every mask, write results, report and plots.

    ``model``: a path, hub id, ``bundled``, a loaded model or a :class:`~moeprune.loading.ModelSource` (its
    ``preset_name`` is ``experiment --preset``). Each stage's options are typed (:mod:`moeprune.options`, or a
    dict of their fields); a field left unset is the model source's preset (the bundled testbed's fast one, else
    the paper's). ``grid``: the axes (retains x methods x seeds, the B sweep, REAP on its own corpus, the recovery
    kinds); ``recovery``: the settings every recovery kind of the grid shares (its kind is ignored), calibrated on
    the profiled corpora's train splits unless it names its own.

    Returns ``{"settings", "cells", "files"}``; ``cells[0]`` is the dense model."""
    check_path(out_dir, "out_dir")
    check_switches(plots=plots, progress=progress)
    out = Path(out_dir)
    source, settings = resolve_experiment(model, grid, calibration, reconstruction, evaluation, recovery)
    grid, calibration, recon = settings.grid, settings.calibration, settings.reconstruction
    evaluation, recovery, methods = settings.evaluation, settings.recovery, settings.methods
    streamed = not source.is_loaded and source.placement() == "stream"
    if streamed and any(k != NONE for k in grid.recover):  # before anything loads
        raise MoePruneError(api.recovery_not_streamed(source))
    # Streamed: a meta skeleton whose layers are read from disk for each pass (every cell), never the whole model.
    loaded = source.open_stream() if streamed else source.load()
    net = loaded.model if streamed else loaded
    tokenizer = source.load_tokenizer(net)
    record = {
        "model": model_name(net) if source.is_loaded else str(source.model),
        "retains": list(grid.retains),
        "methods": methods,
        "seeds": list(grid.seeds),
        "calibration": _calibration_record(calibration, grid, recon, methods),
        "evaluation": _evaluation_record(evaluation),
    }
    kinds = list(grid.recover)
    _check_recovery_axis(kinds, net, grid.retains)
    if any(k != "none" for k in kinds):  # recorded only when used, so older experiment.json files still match
        record["recovery"] = {"kinds": kinds, **{k: v for k, v in recovery.to_json().items() if k != "kind"}}
    check_own_folder(out, without_file("experiment.json"), "experiment")
    with output_root(out):  # no folder below --out (cells/, masks/, recovery/, profile/) is written through a link
        _check_settings(out, record)
        _remove_orphans(out)
        # Streamed, each stage reads the layers from disk again (profile, expert-sparsity's pass, every cell).
        running = ModelSource.of(source, stream=True) if streamed \
            else ModelSource.of(source.with_model(loaded), tokenizer=tokenizer)
        _profile(running, out, calibration, grid, methods, progress)
        masks = plan_grid(out, running, grid, methods, calibration, recon, progress)
        cells = evaluate_grid(CellRun(loaded, tokenizer, evaluation, progress), out, masks, kinds, recovery)
        files = write_outputs(out, record, cells, plots=plots)
    return {"settings": record, "cells": cells, "files": {k: str(v) for k, v in files.items()}}


# experiment.json's schema: the sections a rerun compares, each of its type (recovery only when used).
SETTINGS_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "retains": (list,), "methods": (list,), "seeds": (list,), "calibration": (dict,),
    "evaluation": (dict,), "recovery": (dict,),
}


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """An experiment's options, resolved against its model source (what the CLI's preflight checks)."""

    grid: GridOptions
    methods: list[str]
    calibration: Calibration
    reconstruction: ReconstructionOptions
    evaluation: EvalSettings
    recovery: RecoveryOptions


def resolve_experiment(
    model: Any,
    grid: GridOptions | Mapping[str, Any] | None = None,
    calibration: Calibration | Mapping[str, Any] | None = None,
    reconstruction: ReconstructionOptions | Mapping[str, Any] | None = None,
    evaluation: EvalSettings | Mapping[str, Any] | None = None,
    recovery: RecoveryOptions | Mapping[str, Any] | None = None,
) -> tuple[ModelSource, ExperimentSettings]:
    """The model source and every option of the grid filled from its preset and checked, before any weight
    loads: the window rule on every window the grid uses, wrong types as one line."""
    source = api.source_of(model)
    grid = _typed(grid, GridOptions, "grid")
    unknown = [m for m in grid.methods or () if m not in registry.REGISTRY]
    if unknown:
        raise MoePruneError(
            f"Unknown method(s) {unknown} in --methods; known methods: {', '.join(registry.names())}."
        )
    methods = list(grid.methods or all_methods())
    grid = grid.resolved(source, methods)
    recon = _typed(reconstruction, ReconstructionOptions, "reconstruction")
    if any(registry.needs_model(m, grid.candidate if registry.method_spec(m).protects else None) for m in methods):
        recon = recon.resolved(source)
    calibration = _typed(calibration, Calibration, "calibration").resolved(source)
    recovery = _typed(recovery, RecoveryOptions, "recovery")
    unknown_kinds = [k for k in grid.recover if k not in KINDS]
    if unknown_kinds:
        RecoveryOptions(kind=unknown_kinds[0])  # raises the one-line "unknown recovery" error
    if any(k != NONE for k in grid.recover):
        recovery.check_used_by([k for k in grid.recover if k != NONE])
        recovery = recovery.resolved(source)
    else:
        given = [f.name for f in dataclasses.fields(recovery)
                 if f.name != "kind" and getattr(recovery, f.name) != f.default]
        if given:
            raise MoePruneError(f"recovery settings {given} have no effect: the grid recovers nothing; add a kind to "
                                "grid.recover (--recover router-kd, merge, ...) or drop them.")
        recovery = recovery.resolved(PresetSource(source.preset))
    if recovery.corpora is None:
        recovery = dataclasses.replace(recovery, corpora=tuple(calibration.corpora))
    evaluation = _typed(evaluation, EvalSettings, "evaluation").resolved(source)
    return source, ExperimentSettings(grid, methods, calibration, recon, evaluation, recovery)


def _typed(value: Any, cls: type, what: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise MoePruneError(f"Unknown {what} option(s) {unknown}; known: {', '.join(sorted(known))}.")
        return cls(**value)
    raise MoePruneError(f"{what} must be a {cls.__name__} or a dict of its fields, not {type(value).__name__}.")


def _calibration_record(calibration: Calibration, grid: GridOptions, recon: ReconstructionOptions,
                        methods: Sequence[str]) -> dict[str, Any]:
    """What experiment.json records of the calibration (its keys as older experiment folders have them)."""
    # Every calibration field that shapes the windows (a new one is recorded without touching this file); the seed
    # and checkpointing are not recorded (older experiment.json files hold these keys only).
    record: dict[str, Any] = {k: v for k, v in dataclasses.asdict(calibration).items()
                              if k not in ("seed", "checkpoint_every")}
    record["corpora"] = list(calibration.corpora)
    record.update({
        "protect_budget": grid.protect_budget,
        "candidate": grid.candidate,
        "reconstruction": recon.to_json(),
    })
    if grid.reap and "reap" in methods:  # recorded only when used, so older experiment.json files match
        record["reap_corpus"] = {"corpus": grid.reap, "samples": grid.reap_samples, "seq_len": grid.reap_seq_len}
    return record


def _evaluation_record(evaluation: EvalSettings) -> dict[str, Any]:
    return {
        "ppl_datasets": list(evaluation.ppl_datasets),
        "ppl_seq_len": evaluation.ppl_seq_len,
        "ppl_sources": {k: str(v) for k, v in (evaluation.ppl_sources or {}).items()},
        "max_windows": evaluation.max_windows,
        "tasks": resolve_tasks(evaluation.tasks),
        "limit": evaluation.limit,
        "eval_batch_size": evaluation.eval_batch_size,
    }


# ------------------------------------------------------------------------------------------------ stages
def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix cells computed under other calibration or evaluation settings; the grid may grow."""
    path = out / "experiment.json"
    if path.exists() or path.is_symlink():
        old = read_json(path, "Experiment settings", f"delete it (or use another --out) to start {out} over")
        if not isinstance(old, dict):
            raise MoePruneError(f"Experiment settings {path} is not a JSON object; delete it or use another --out.")
        for key, types in SETTINGS_TYPES.items():
            if key in old and not isinstance(old[key], types):
                raise MoePruneError(f"Experiment settings {path}: {key!r} is not {types[0].__name__}; delete it or "
                                    "use another --out.")
        for key in ("model", "calibration", "evaluation", "recovery"):
            if key == "recovery" and (key not in old or key not in settings):
                continue  # recovery added to (or left out of) a grid: the plain cells still compare
            if old.get(key) != json.loads(json.dumps(settings[key])):
                raise MoePruneError(
                    f"{out} holds an experiment with other {key} settings ({old.get(key)} vs "
                    f"{settings[key]}); its cells would not compare. Use another --out, or delete {out}."
                )
    write_json_atomic(path, settings)


def _profile(source: ModelSource, out: Path, calibration: Calibration, grid: GridOptions, methods: Sequence[str],
             progress: bool) -> None:
    if source.stream:  # a layer-major run finishes each layer for all windows: no mid-corpus checkpoints
        calibration = dataclasses.replace(calibration, checkpoint_every=None)
    if grid.reap and "reap" in methods:  # first: a hub corpus that cannot load (offline) fails before the long profile
        reap = dataclasses.replace(calibration, corpora=(grid.reap,), samples=grid.reap_samples,
                                   seq_len=grid.reap_seq_len)
        api.profile(source, out=out / REAP_PROFILE, calibration=reap, sequential=False, progress=progress)
    api.profile(source, out=out / "profile", calibration=calibration, sequential=False, progress=progress)


def plan_grid(
    out: Path,
    model: ModelSource,
    grid: GridOptions,
    methods: Sequence[str],
    calibration: Calibration,
    reconstruction: ReconstructionOptions,
    progress: bool = True,
) -> list[tuple[Path, ExpertMask]]:
    """Every mask of the grid as (file, mask); masks already in ``out/masks`` are loaded, not re-planned."""
    planned: list[tuple[Path, ExpertMask]] = []
    model_masks: dict[str, dict[float, ExpertMask]] = {}
    # Model-chosen methods (expert-sparsity) first: tb-coverage with that candidate reuses their selections.
    order = sorted(methods, key=lambda m: 0 if registry.method_spec(m).needs_model else 1)
    for method in order:
        for seed in grid.seeds if registry.method_spec(method).seeded else [None]:
            for variant, options in _variants(method, grid, methods):
                paths = [path_inside(make_dirs(out / "masks"), api.variant_filename(variant, r, seed),
                                     what="Mask file name") for r in grid.retains]
                folder = options.get("profile", "profile")
                corpora = _corpus_names(calibration, grid, folder)
                masks = _reusable_masks(paths, grid.retains, Profile.load(out / folder, corpora).fingerprint(),
                                        variant, seed)
                if masks is None:
                    masks = _plan(out, model, method, grid, seed, corpora, reconstruction, model_masks, progress,
                                  **options)
                    for path, mask in zip(paths, masks, strict=True):
                        if variant != mask.variant:
                            mask.extra["variant"] = variant
                        mask.save(path)
                if registry.method_spec(method).needs_model:
                    model_masks[method] = {m.retain: m for m in masks}
                planned.extend(zip(paths, masks, strict=True))
    # Table order: by method as the user listed them.
    return sorted(planned, key=lambda pm: (list(methods).index(pm[1].method), pm[1].retain, pm[1].seed or 0))


def _corpus_names(calibration: Calibration, grid: GridOptions, folder: str) -> list[str]:
    specs = [grid.reap] if folder == REAP_PROFILE else calibration.corpora
    return [parse_corpus(spec).name for spec in specs]


def _reusable_masks(paths: list[Path], retains: Sequence[float], profile_sha256: str, variant: str | None = None,
                    seed: int | None = None) -> list[ExpertMask] | None:
    """The grid's saved masks when every one exists, is intact (its seal matches: not edited by hand), is this
    variant's at its exact ratio and seed, and was planned from this profile (a changed corpus file, tokenizer
    or model changes the profile); else None: plan them again. An unreadable one is planned again too."""
    if not all(p.exists() for p in paths):
        return None
    try:
        masks = [ExpertMask.load(p) for p in paths]
    except MoePruneError as err:
        log.warning("%s; planning it again.", str(err).rstrip("."))
        return None
    for path, mask, retain in zip(paths, masks, retains, strict=True):
        if not mask.intact:
            log.warning("%s was edited since moeprune wrote it (its seal does not match); planning it again.",
                        path.name)
            return None
        same = variant is None or (mask.variant == variant and mask.seed == seed)
        if mask.retain != retain or mask.extra.get("profile_sha256") != profile_sha256 or not same:
            log.info("%s was planned from another profile, ratio or method; planning it again.", path.name)
            return None
    return masks


def _variants(method: str, grid: GridOptions, methods: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """(variant, _plan options) per row the method gets: one, or one per B of a sweep, or REAP twice."""
    spec = registry.method_spec(method)
    if spec.protects:
        budgets = grid.budgets
        if len(budgets) == 1:
            return [(method, {"budget": budgets[0]})]
        return [(f"{method}@B{b}", {"budget": b}) for b in budgets]
    if spec.one_corpus and grid.reap:
        name = parse_corpus(grid.reap).name
        return [(method, {}), (f"{method}@{name}", {"profile": REAP_PROFILE, "score_corpus": name})]
    return [(method, {})]


def _plan(
    out: Path,
    model: ModelSource,
    method: str,
    grid: GridOptions,
    seed: int | None,
    corpora: list[str],
    reconstruction: ReconstructionOptions,
    model_masks: dict[str, dict[float, ExpertMask]],
    progress: bool,
    budget: int | str | None = None,
    profile: str = "profile",
    score_corpus: str | None = None,
) -> list[ExpertMask]:
    spec = registry.method_spec(method)
    candidate = grid.candidate if spec.protects else None
    # A candidate this grid already planned (expert-sparsity) is reused, not searched for a second time.
    planned = model_masks.get(registry.candidate_of(method, candidate) or "", {})
    reuse = spec.protects and all(r in planned for r in grid.retains)
    request = PlanRequest(method, grid.retains, seed=seed, protect_budget=budget if spec.protects else None,
                          candidate=candidate, score_corpus=score_corpus)
    return api.plan_many(
        out / profile,
        request,
        corpora=corpora,
        model=model,
        reconstruction=reconstruction,
        progress=progress,
        candidate_masks={r: planned[r] for r in grid.retains} if reuse else None,
    )


def cell_id(mask: ExpertMask | None, recover: str = "none") -> str:
    if mask is None:
        return DENSE
    stem = api.mask_filename(mask).removesuffix(".json")
    return stem if recover == "none" else f"{stem}+{recover}"


@dataclasses.dataclass(frozen=True)
class CellRun:
    """What every cell of a grid is evaluated with: the model (loaded, or a
    :class:`~moeprune.streaming.layers.DiskLayers` streaming it from disk), its tokenizer and the resolved
    evaluation settings."""

    model: Any
    tokenizer: Any
    evaluation: EvalSettings
    progress: bool = True

    @property
    def streamed(self) -> bool:
        return isinstance(self.model, DiskLayers)

    @property
    def net(self) -> Any:
        """The torch model (for a streamed one its meta skeleton: names, config and footprint, no weights)."""
        return self.model.model if self.streamed else self.model


@reuse_lm_eval()  # lm-eval's tasks and model wrapper are built once for all cells
def evaluate_grid(
    run: CellRun,
    out: Path,
    masks: Sequence[tuple[Path, ExpertMask]],
    recover: Sequence[str] = ("none",),
    recovery: Any = None,
) -> list[dict[str, Any]]:
    """Dense first, then every mask (and per mask every recovery kind in ``recover``); each cell is written
    to ``out/cells`` as soon as it is done, and a cell whose file exists is read back instead of recomputed
    (resume after a crash or a kill). Recovery deltas are cached in ``out/recovery``.

    A streamed model reads its weights once per cell and evaluation pass (each perplexity dataset, each chunk of
    lm-eval's batches); a cell's numbers do not depend on it, so cells computed in memory are reused streamed and
    the other way round."""
    model, tokenizer, evaluation = run.net, run.tokenizer, run.evaluation
    dense_fp = footprint(model)
    model_inputs = cell_inputs(model, tokenizer, None)
    # The bytes of every local evaluation file (a --ppl FILE, a --ppl-data copy): edited at the same path, the
    # cells that measured it are recomputed, not reused.
    local = [*(evaluation.ppl_datasets or ()), *(evaluation.ppl_sources or {}).values()]
    model_inputs["eval_files_sha256"] = {str(f): file_sha256(f) for f in local if Path(str(f)).is_file()}
    cells = []
    shared = _SharedCalibration(model, tokenizer, recovery, run.progress)
    cells_dir = make_dirs(out / "cells")  # created (and later read) without following a link
    for path, mask in [(None, None), *masks]:
        for kind in ["none"] if mask is None else recover:
            file = path_inside(cells_dir, f"{cell_id(mask, kind)}.json", what="Cell file name")
            inputs = {**model_inputs, "mask_sha256": cell_inputs(None, None, mask)["mask_sha256"]}
            if kind != "none":  # a recovered cell also depends on every input of its recovery
                inputs["recovery_sha256"] = recovery_key(model, mask, recovery.with_kind(kind), full=True)
            cached = read_cell(file, cell_id(mask, kind), inputs)
            if cached is not None:
                cells.append(cached)
                continue
            found = None if kind == "none" else _cell_recovery(out, model, mask, recovery.with_kind(kind), shared)
            cell = run_cell(run, mask, path, dense_fp, found)
            cell["inputs"] = inputs
            write_json_atomic(file, sealed(cell))  # sealed: a cell edited by hand is recomputed, not reported
            cells.append(cell)
    return cells


def _check_recovery_axis(kinds: Sequence[str], loaded: Any, retains: Sequence[float]) -> None:
    """Something to merge at every ratio, and a layout merge understands, before any work."""
    if kinds != [NONE]:
        meta = routing_meta(loaded.config)
        for retain in retains:
            check_prunes(kinds, kept_count(retain, meta["num_experts"], meta["top_k"]), meta["num_experts"],
                         f"--retain {retain}")
        if any(k in ("merge", "merge+router-kd") for k in kinds):
            check_mergeable(loaded)


class _SharedCalibration:
    """The recovery windows and the dense teacher's targets, made once for the whole grid (the teacher is the
    same model for every mask), on first use."""

    def __init__(self, model: Any, tokenizer: Any, options: Any, progress: bool) -> None:
        self.model, self.tokenizer, self.options, self.progress = model, tokenizer, options, progress
        self._windows = None
        self._teacher = None

    def windows(self) -> dict[str, Any]:
        if self._windows is None:
            self._windows = calibration_set(self.tokenizer, list(self.options.corpora), self.options)
        return self._windows

    def teacher(self) -> Any:
        if self._teacher is None:
            self._teacher = teacher_targets(self.model, self.windows(), self.options, self.progress)
        return self._teacher


def recovery_key(model: Any, mask: ExpertMask, options: Any, full: bool = False) -> str:
    """A hash of everything that makes a recovery delta: the mask, the settings and kind, the model's config and
    weights fingerprint, and the SHA-256 of every local calibration corpus file (an edited file at the same path
    is another corpus). Short (12 hex digits) for folder names, ``full`` for a cell's inputs."""
    corpora = {spec: corpus_fingerprint(parse_corpus(spec)) for spec in options.corpora or ()}
    blob = json.dumps({"mask": mask.to_json(), "options": options.to_json(), "model": config_hash(model.config),
                       "weights": weights_fingerprint(model), "corpora": corpora}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    return digest if full else digest[:12]


def _cell_recovery(out: Path, model: Any, mask: ExpertMask, options: Any, shared: _SharedCalibration) -> Any:
    """The cell's recovery from ``out/recovery`` when computed before and intact (its record and delta check
    out, see Recovery.load), else computed now and saved."""
    name = f"{cell_id(mask, options.kind)}-{recovery_key(model, mask, options)}"
    folder = path_inside(make_dirs(out / "recovery"), name, what="Recovery folder name")
    if Recovery.exists(folder):
        try:
            return Recovery.load(folder, expected=options.to_json())
        except MoePruneError as err:
            log.warning("%s; recomputing it.", str(err).rstrip("."))
    teacher = shared.teacher() if options.router_kd else None
    found = recover(model, mask, options, windows=shared.windows(), teacher=teacher, progress=shared.progress)
    found.save(folder)
    return found


CELL_TYPES = {"cell": str, "method": str, "variant": str, "retain": (int, float), "summary": dict}


def cell_inputs(model: Any, tokenizer: Any, mask: ExpertMask | None) -> dict[str, str | None]:
    """What a cell's numbers come from beyond the settings: the model's weights, the tokenizer and the mask
    (its JSON, which records its profile): a cell is reused only when all three are the same."""
    mask_json = None if mask is None else json.dumps(mask.to_json(), sort_keys=True)
    return {
        "weights_sha256": None if model is None else weights_fingerprint(model),
        "tokenizer_sha256": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        "mask_sha256": None if mask_json is None else hashlib.sha256(mask_json.encode()).hexdigest(),
    }


def read_cell(file: Path, expected_id: str, inputs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A finished cell to reuse, or None to (re)compute it: absent, unreadable, not this cell's result, or
    computed from other inputs (weights, tokenizer, mask: :func:`cell_inputs`). A cell is only lost time, so a
    bad one is recomputed with a warning rather than refused."""
    if not file.exists() and not file.is_symlink():
        return None
    try:
        cell = read_json(file, "Cell file", "it will be recomputed")
        problem = None if isinstance(cell, dict) else "not a JSON object"
        for key, types in CELL_TYPES.items() if problem is None else ():
            if not isinstance(cell.get(key), types) or isinstance(cell.get(key), bool):
                problem = f"its {key!r} is {cell.get(key)!r}"
                break
        if problem is None and cell["cell"] != expected_id:
            problem = f"it holds cell {cell['cell']!r}"
        if problem is None and not seal_intact(cell):
            problem = "it was edited since moeprune wrote it: its seal does not match"
        if problem is None and inputs is not None and cell.get("inputs") != inputs:
            log.info("%s was computed from another model, tokenizer or mask; computing it again.", file.name)
            return None
        if problem:
            raise MoePruneError(f"Cell file {file} is not a result of this cell ({problem})")
    except MoePruneError as err:
        log.warning("%s; recomputing it.", str(err).rstrip("."))
        return None
    cell.pop(SEAL_KEY)
    return cell


def run_cell(
    run: CellRun,
    mask: ExpertMask | None,
    mask_path: Path | None,
    dense_fp: dict[str, int],
    recovery: Any = None,
) -> dict[str, Any]:
    """One evaluation, with the fields the report groups by (cell, method, retain, seed, recover) on top;
    ``recovery`` (a :class:`~moeprune.recovery.Recovery`) is applied inside the mask for this cell only."""
    kind = "none" if recovery is None else recovery.record.get("kind", "none")
    # Looked up at call time, so a test can count (or fail) the per-cell evaluations.
    result = runner.evaluate_loaded(
        run.model,
        run.tokenizer,
        run.evaluation,
        variant=None if mask is None else runner.Variant(mask, mask_path, None if recovery is None else recovery.delta),
        dense_footprint=dense_fp,
        progress=run.progress,
        metadata={"model": model_name(run.net), **({"stream": True} if run.streamed else {})},
    )
    if recovery is not None:
        result["recovery"] = recovery.record
    head = {
        "cell": cell_id(mask, kind),
        "method": DENSE if mask is None else mask.method,
        "variant": DENSE if mask is None else mask.variant + ("" if kind == "none" else f"+{kind}"),
        "recover": None if mask is None else kind,
        "retain": 1.0 if mask is None else mask.retain,
        "seed": None if mask is None else mask.seed,
        "kept_per_layer": None if mask is None else mask.kept_per_layer,
    }
    return {**head, **result}


def write_outputs(
    out: Path, settings: dict[str, Any], cells: list[dict[str, Any]], plots: bool = True
) -> dict[str, Path]:
    """results.json (settings + every cell), results.csv (one row per cell), report.md and the plots."""
    files = {"results_json": out / "results.json", "results_csv": out / "results.csv", "report": out / "report.md"}
    write_json_atomic(files["results_json"], {"settings": settings, "cells": cells})
    _write_text(files["results_csv"], report.to_csv(cells))
    images: dict[str, Path] = {}
    if plots:
        from moeprune.evaluation import plots as plotting  # lazy: matplotlib

        images = plotting.write_plots(cells, out / "plots", profile_dir=out / "profile",
                                      calibration=settings.get("calibration", {}).get("corpora", []))
    _write_text(
        files["report"], report.render_report(cells, settings, {k: v.relative_to(out) for k, v in images.items()})
    )
    return {**files, **images}


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _remove_orphans(out: Path) -> None:
    """A killed run's half-written files in the experiment's folders (no lock: only dead writers' files)."""
    for folder in (out, out / "masks", out / "cells"):
        if folder.is_dir():
            remove_orphan_temp_files(folder)
