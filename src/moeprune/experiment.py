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
memory with ``surgery.masked``, which restores the model afterwards).

Orchestration only: this module sits above :mod:`moeprune.api` (profile, plan_many) and calls the
evaluation and recovery stages below it; nothing in the package imports it but the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from moeprune import api
from moeprune.arch.adapters import routing_meta
from moeprune.data.corpora import parse_corpus
from moeprune.errors import MoePruneError
from moeprune.evaluation import footprint, report, runner
from moeprune.evaluation.coverage import DENSE
from moeprune.evaluation.runner import default_seq_len, resolve_tasks
from moeprune.evaluation.zeroshot import reuse_lm_eval
from moeprune.io import read_json, remove_orphan_temp_files, write_json_atomic, write_text_atomic
from moeprune.loading import ModelSource, checked_model, checked_tokenizer, config_hash, model_name
from moeprune.options import Calibration, EvalSettings, GridOptions, ReconstructionOptions
from moeprune.planning import registry
from moeprune.planning.mask import ExpertMask, kept_count
from moeprune.presets import preset_for
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

log = logging.getLogger(__name__)


REAP_PROFILE = "profile-reap"  # its own profile, so the generic methods never see the REAP corpus


def all_methods() -> list[str]:
    return registry.names()


def run_experiment(
    model: Any,
    out_dir: str | Path,
    *,
    grid: GridOptions | None = None,
    calibration: Calibration | None = None,
    reconstruction: ReconstructionOptions | Mapping[str, Any] | None = None,
    evaluation: EvalSettings | None = None,
    recovery: RecoveryOptions | None = None,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Profile once, plan every mask, evaluate dense + every mask, write results, report and plots.

    Each stage's options are typed (:mod:`moeprune.options`); one left out is the model's preset
    (:func:`moeprune.presets.preset_for`: the bundled testbed's fast one, else the paper's). ``grid``: the axes
    (retains x methods x seeds, the B sweep, REAP on its own corpus, the recovery kinds); ``recovery``: the
    settings every recovery kind of the grid shares (its kind is ignored), calibrated on the profiled corpora's
    train splits unless it names its own.

    Returns ``{"settings", "cells", "files"}``; ``cells[0]`` is the dense model."""
    out = Path(out_dir)
    preset = preset_for(model)
    grid = grid if grid is not None else GridOptions.from_preset(preset)
    calibration = calibration if calibration is not None else Calibration.from_preset(preset)
    evaluation = evaluation if evaluation is not None else EvalSettings.from_preset(preset)
    recon = ReconstructionOptions.coerce(reconstruction)
    methods = list(grid.methods or all_methods())
    if isinstance(model, str | Path):
        source = ModelSource.of(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                stream=recon.stream)
        if source.placement() == "stream":
            raise MoePruneError(
                f"experiment keeps one model in memory for every cell, and {source.name} streams from disk here "
                "(--stream, or too little memory); run the stages streamed instead (moeprune profile/plan/apply/eval "
                "--stream), or pass --no-stream on a machine that holds the model."
            )
    loaded = checked_model(model, dtype, device, trust_remote_code)
    tokenizer = checked_tokenizer(tokenizer, loaded, trust_remote_code)
    eval_settings = {
        "ppl_datasets": list(evaluation.ppl_datasets),
        "ppl_seq_len": default_seq_len(loaded, evaluation.ppl_seq_len),
        "ppl_sources": {k: str(v) for k, v in (evaluation.ppl_sources or {}).items()},
        "max_windows": evaluation.max_windows,
        "tasks": resolve_tasks(evaluation.tasks),
        "limit": evaluation.limit,
        "eval_batch_size": evaluation.eval_batch_size,
    }
    planning = {
        "corpora": list(calibration.corpora),
        "samples": calibration.samples,
        "seq_len": calibration.seq_len,
        "batch_size": calibration.batch_size,
        "protect_budget": grid.protect_budget,
        "candidate": grid.candidate,
        "reconstruction": recon.to_json(),
    }
    if grid.reap_corpus and "reap" in methods:  # recorded only when used, so older experiment.json files match
        planning["reap_corpus"] = {"corpus": grid.reap_corpus, "samples": grid.reap_samples,
                                   "seq_len": grid.reap_seq_len}
    settings = {
        "model": str(model) if isinstance(model, (str, Path)) else model_name(loaded),
        "retains": list(grid.retains),
        "methods": methods,
        "seeds": list(grid.seeds),
        "calibration": planning,
        "evaluation": eval_settings,
    }
    kinds, recovery = _recovery_axis(model, grid.recover, recovery, calibration.corpora, loaded, grid.retains)
    if any(k != "none" for k in kinds):  # recorded only when used, so older experiment.json files still match
        settings["recovery"] = {"kinds": kinds, **{k: v for k, v in recovery.to_json().items() if k != "kind"}}
    _check_settings(out, settings)
    _remove_orphans(out)
    _profile(loaded, tokenizer, out, planning, progress)
    # The tokenizer is not in the settings (an object), only in what the reconstruction uses.
    masks = plan_grid(out, loaded, grid.retains, methods, grid.seeds, planning, replace(recon, tokenizer=tokenizer),
                      progress)
    cells = evaluate_grid(loaded, tokenizer, out, masks, evaluation, progress, kinds, recovery)
    files = write_outputs(out, settings, cells, plots=plots)
    return {"settings": settings, "cells": cells, "files": {k: str(v) for k, v in files.items()}}


# ------------------------------------------------------------------------------------------------ stages
def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix cells computed under other calibration or evaluation settings; the grid may grow."""
    path = out / "experiment.json"
    if path.exists() or path.is_symlink():
        old = read_json(path, "Experiment settings", f"delete it (or use another --out) to start {out} over")
        if not isinstance(old, dict):
            raise MoePruneError(f"Experiment settings {path} is not a JSON object; delete it or use another --out.")
        for key in ("model", "calibration", "evaluation", "recovery"):
            if key == "recovery" and (key not in old or key not in settings):
                continue  # recovery added to (or left out of) a grid: the plain cells still compare
            if old.get(key) != json.loads(json.dumps(settings[key])):
                raise MoePruneError(
                    f"{out} holds an experiment with other {key} settings ({old.get(key)} vs "
                    f"{settings[key]}); its cells would not compare. Use another --out, or delete {out}."
                )
    write_json_atomic(path, settings)


def _profile(model: Any, tokenizer: Any, out: Path, calibration: dict[str, Any], progress: bool) -> None:
    reap = calibration.get("reap_corpus")
    if reap:  # first: a hub corpus that cannot load (offline) fails before the long generic profile
        api.profile(
            model,
            [reap["corpus"]],
            out / REAP_PROFILE,
            samples=reap["samples"],
            seq_len=reap["seq_len"],
            batch_size=calibration["batch_size"],
            tokenizer=tokenizer,
            progress=progress,
        )
    api.profile(
        model,
        calibration["corpora"],
        out / "profile",
        samples=calibration["samples"],
        seq_len=calibration["seq_len"],
        batch_size=calibration["batch_size"],
        tokenizer=tokenizer,
        progress=progress,
    )


def plan_grid(
    out: Path,
    model: Any,
    retains: Sequence[float],
    methods: Sequence[str],
    seeds: Sequence[int],
    calibration: dict[str, Any],
    reconstruction: ReconstructionOptions,
    progress: bool = True,
) -> list[tuple[Path, ExpertMask]]:
    """Every mask of the grid as (file, mask); masks already in ``out/masks`` are loaded, not re-planned."""
    planned: list[tuple[Path, ExpertMask]] = []
    model_masks: dict[str, dict[float, ExpertMask]] = {}
    # Model-chosen methods (expert-sparsity) first: tb-coverage with that candidate reuses their selections.
    order = sorted(methods, key=lambda m: 0 if registry.method_spec(m).needs_model else 1)
    for method in order:
        for seed in seeds if registry.method_spec(method).seeded else [None]:
            for variant, options in _variants(method, calibration):
                paths = [out / "masks" / api.variant_filename(variant, r, seed) for r in retains]
                masks = _reusable_masks(paths, retains, _profile_of(out, options, calibration))
                if masks is None:
                    masks = _plan(out, model, method, retains, seed, calibration, reconstruction, model_masks, progress,
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


def _profile_of(out: Path, options: dict[str, Any], calibration: dict[str, Any]) -> str:
    """The fingerprint of the profile a variant is planned from (its corpora of this run only)."""
    folder = options.get("profile", "profile")
    return Profile.load(out / folder, _corpus_names(calibration, folder)).fingerprint()


def _corpus_names(calibration: dict[str, Any], folder: str) -> list[str]:
    specs = [calibration["reap_corpus"]["corpus"]] if folder == REAP_PROFILE else calibration["corpora"]
    return [parse_corpus(spec).name for spec in specs]


def _reusable_masks(paths: list[Path], retains: Sequence[float], profile_sha256: str) -> list[ExpertMask] | None:
    """The grid's saved masks when every one exists, is for its exact ratio and was planned from this profile
    (a changed corpus file, tokenizer or model changes the profile); else None: plan them again."""
    if not all(p.exists() for p in paths):
        return None
    masks = [ExpertMask.load(p) for p in paths]
    for path, mask, retain in zip(paths, masks, retains, strict=True):
        if mask.retain != retain or mask.extra.get("profile_sha256") != profile_sha256:
            log.info("%s was planned from another profile or ratio; planning it again.", path.name)
            return None
    return masks


def _variants(method: str, calibration: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(variant, _plan options) per row the method gets: one, or one per B of a sweep, or REAP twice."""
    spec = registry.method_spec(method)
    if spec.protects:
        budgets = GridOptions(protect_budget=calibration["protect_budget"]).budgets
        if len(budgets) == 1:
            return [(method, {"budget": budgets[0]})]
        return [(f"{method}@B{b}", {"budget": b}) for b in budgets]
    if spec.one_corpus and calibration.get("reap_corpus"):
        name = parse_corpus(calibration["reap_corpus"]["corpus"]).name
        return [(method, {}), (f"{method}@{name}", {"profile": REAP_PROFILE, "score_corpus": name})]
    return [(method, {})]


def _plan(
    out: Path,
    model: Any,
    method: str,
    retains: Sequence[float],
    seed: int | None,
    calibration: dict[str, Any],
    reconstruction: ReconstructionOptions,
    model_masks: dict[str, dict[float, ExpertMask]],
    progress: bool,
    budget: int | str | None = None,
    profile: str = "profile",
    score_corpus: str | None = None,
) -> list[ExpertMask]:
    spec = registry.method_spec(method)
    candidate = calibration["candidate"] if spec.protects else None
    # A candidate this grid already planned (expert-sparsity) is reused, not searched for a second time.
    planned = model_masks.get(registry.candidate_of(method, candidate) or "", {})
    reuse = spec.protects and all(r in planned for r in retains)
    return api.plan_many(
        out / profile,
        method,
        list(retains),
        corpora=_corpus_names(calibration, profile),
        seed=seed or 0,
        protect_budget=budget if spec.protects else None,
        candidate=candidate,
        model=model,
        reconstruction=reconstruction,
        score_corpus=score_corpus,
        progress=progress,
        candidate_masks={r: planned[r] for r in retains} if reuse else None,
    )


def cell_id(mask: ExpertMask | None, recover: str = "none") -> str:
    if mask is None:
        return DENSE
    stem = api.mask_filename(mask).removesuffix(".json")
    return stem if recover == "none" else f"{stem}+{recover}"


@reuse_lm_eval()  # lm-eval's tasks and model wrapper are built once for all cells
def evaluate_grid(
    model: Any,
    tokenizer: Any,
    out: Path,
    masks: Sequence[tuple[Path, ExpertMask]],
    evaluation: EvalSettings,
    progress: bool = True,
    recover: Sequence[str] = ("none",),
    recovery: Any = None,
) -> list[dict[str, Any]]:
    """Dense first, then every mask (and per mask every recovery kind in ``recover``); each cell is written
    to ``out/cells`` as soon as it is done, and a cell whose file exists is read back instead of recomputed
    (resume after a crash or a kill). Recovery deltas are cached in ``out/recovery``."""
    dense_fp = footprint(model)
    model_inputs = cell_inputs(model, tokenizer, None)
    cells = []
    shared = _SharedCalibration(model, tokenizer, recovery, progress)
    for path, mask in [(None, None), *masks]:
        for kind in ["none"] if mask is None else recover:
            file = out / "cells" / f"{cell_id(mask, kind)}.json"
            inputs = {**model_inputs, "mask_sha256": cell_inputs(None, None, mask)["mask_sha256"]}
            cached = read_cell(file, cell_id(mask, kind), inputs)
            if cached is not None:
                cells.append(cached)
                continue
            found = None if kind == "none" else _cell_recovery(out, model, mask, recovery.with_kind(kind), shared)
            cell = run_cell(model, tokenizer, mask, path, dense_fp, evaluation, progress, found)
            cell["inputs"] = inputs
            write_json_atomic(file, cell)
            cells.append(cell)
    return cells


def _recovery_axis(model: Any, recover: Sequence[str], recovery: Any, corpora: Sequence[str], loaded: Any,
                   retains: Sequence[float]) -> tuple[list[str], Any]:
    """The grid's recovery kinds (``none`` first) and their shared settings, checked before any work."""
    kinds = list(dict.fromkeys(recover or [NONE]))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        RecoveryOptions(kind=unknown[0])  # raises the one-line "unknown recovery" error
    if recovery is None:
        recovery = RecoveryOptions.from_preset(preset_for(model))
    if recovery.corpora is None:
        recovery = dataclasses.replace(recovery, corpora=tuple(corpora))
    if kinds != [NONE]:
        meta = routing_meta(loaded.config)
        for retain in retains:
            check_prunes(kinds, kept_count(retain, meta["num_experts"], meta["top_k"]), meta["num_experts"],
                         f"--retain {retain}")
        if any(k in ("merge", "merge+router-kd") for k in kinds):
            check_mergeable(loaded)
    return kinds, recovery


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


def recovery_key(model: Any, mask: ExpertMask, options: Any) -> str:
    """A short hash of everything that makes a recovery delta: the mask, the settings and kind, the model."""
    blob = json.dumps({"mask": mask.to_json(), "options": options.to_json(), "model": config_hash(model.config)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _cell_recovery(out: Path, model: Any, mask: ExpertMask, options: Any, shared: _SharedCalibration) -> Any:
    """The cell's recovery from ``out/recovery`` when computed before, else computed now and saved."""
    folder = out / "recovery" / f"{cell_id(mask, options.kind)}-{recovery_key(model, mask, options)}"
    if Recovery.exists(folder):
        return Recovery.load(folder)
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
        if problem is None and inputs is not None and cell.get("inputs") != inputs:
            log.info("%s was computed from another model, tokenizer or mask; computing it again.", file.name)
            return None
        if problem:
            raise MoePruneError(f"Cell file {file} is not a result of this cell ({problem})")
    except MoePruneError as err:
        log.warning("%s; recomputing it.", str(err).rstrip("."))
        return None
    return cell


def run_cell(
    model: Any,
    tokenizer: Any,
    mask: ExpertMask | None,
    mask_path: Path | None,
    dense_fp: dict[str, int],
    evaluation: EvalSettings,
    progress: bool,
    recovery: Any = None,
) -> dict[str, Any]:
    """One evaluation, with the fields the report groups by (cell, method, retain, seed, recover) on top;
    ``recovery`` (a :class:`~moeprune.recovery.Recovery`) is applied inside the mask for this cell only."""
    kind = "none" if recovery is None else recovery.record.get("kind", "none")
    # Looked up at call time, so a test can count (or fail) the per-cell evaluations.
    result = runner.evaluate_loaded(
        model,
        tokenizer,
        evaluation,
        mask=mask,
        mask_path=mask_path,
        dense_footprint=dense_fp,
        progress=progress,
        metadata={"model": model_name(model)},
        delta=None if recovery is None else recovery.delta,
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
