"""The one preflight: every check that needs no model weights, run before the expensive work.

The CLI calls :func:`check_args` right after parsing. It refuses flags the run would ignore (one line naming
what they need), builds each verb's options from the flags exactly as the verb will (unset fields: the model
source's preset; :mod:`moeprune.options`), resolves them against the model source (the window rule lives in
``resolved``) and checks them with the same functions the Python API's verbs call at their door: an output that
would overlap the model, a mask for another model, a retain ratio the router cannot use, an unknown task or
perplexity set, an unreachable recovery corpus fail in a second with one line naming the problem and the fix,
instead of after profiling and reconstruction (docs/errors.md lists the cases and their tests).

It sits above the stages (evaluation, recovery, planning, ...) and below the verbs: the stages never import it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from moeprune.arch.adapters import routing_meta
from moeprune.data.corpora import CorpusSpec, check_corpus_file, check_reachable, parse_corpus
from moeprune.data.sampling import calibration_windows
from moeprune.errors import MoePruneError
from moeprune.evaluation.perplexity import check_local_ppl_files, check_ppl_datasets
from moeprune.evaluation.runner import resolve_tasks
from moeprune.evaluation.zeroshot import check_tasks
from moeprune.io import (
    check_name_length,
    check_not_overlapping,
    check_not_symlink,
    check_output_dir,
    check_output_file,
    check_own_folder,
    check_writable_parent,
    foreign_entry,
    output_lock,
    without_file,
)
from moeprune.loading import (  # noqa: F401 (check_tokenizer re-exported)
    ModelSource,
    check_checkpoint_files,
    check_device,
    check_tokenizer,
    check_tokenizer_source,
    load_tokenizer,
    model_name,
    parse_dtype,
    resolve_model_path,
)
from moeprune.options import (
    MAX_COUNT,
    Calibration,
    EvalSettings,
    GridOptions,
    ReconstructionOptions,
    at_least_one,
    check_seed,
    non_negative,
    too_large,
)
from moeprune.planning import registry
from moeprune.planning.fit import (
    check_mask_for_checkpoint,
    check_mask_for_config,
    check_mask_layers,
    check_retain_for_config,
)
from moeprune.planning.mask import ExpertMask, kept_count
from moeprune.planning.request import PlanRequest
from moeprune.profiling.runner import SEQUENTIAL_ONE_PROCESS, weights_fingerprint
from moeprune.profiling.stats import Profile, check_one_model, finished_corpora, read_meta
from moeprune.recovery import RecoveryOptions, check_mergeable_config, check_prunes, recovery_corpora
from moeprune.recovery.options import NONE, kinds_of

# Flags that must be at least 1 (0 used to fall back to the preset silently).
POSITIVE_FLAGS = (
    "samples",
    "seq_len",
    "batch_size",
    "checkpoint_every",
    "recon_samples",
    "recon_seq_len",
    "recon_tokens",
    "reap_samples",
    "reap_seq_len",
    "ppl_seq_len",
    "ppl_windows",
    "eval_batch_size",
    "limit",
)
NON_NEGATIVE_FLAGS = ("seed", "plan_seed", "protect_budget")
# Flags with a larger minimum: a perplexity window predicts tokens 2..L from the ones before, so L >= 2.
MINIMUM_FLAGS = {"ppl_seq_len": 2}
RECON_FLAGS = ("recon_corpus", "recon_samples", "recon_seq_len", "recon_loss", "recon_tokens")
RECOVER_FLAGS = ("recover_corpus", "recover_samples", "recover_seq_len", "recover_epochs", "recover_lr",
                 "recover_batch_size", "recover_seed")
EVAL_EXTRA = "pip install 'moeprune[eval]'"


# ---------------------------------------------------------------------------------------------- CLI
def check_args(args: argparse.Namespace) -> None:
    """Every check of ``args`` that needs no model weights, for the verb being run."""
    _check_numbers(args)
    check_device(getattr(args, "device", None))
    if getattr(args, "dtype", None) is not None:
        parse_dtype(args.dtype)
    check = {
        "profile": _check_profile,
        "plan": _check_plan,
        "apply": _check_apply,
        "prune": _check_prune,
        "eval": _check_eval,
        "experiment": _check_experiment,
    }.get(args.verb)
    if check is not None:
        check(args)
    _check_ignored(args)  # last: a refusal of what the run cannot do names that first


def held_outputs(args: argparse.Namespace) -> AbstractContextManager:
    """The lock on apply's and prune's --out, held for the whole run: a second writer fails at its start."""
    return output_lock(args.out) if args.verb in ("apply", "prune") else nullcontext()


def _check_numbers(args: argparse.Namespace) -> None:
    for name in POSITIVE_FLAGS:
        if any(value < 1 for value in _numbers(args, name)):
            raise at_least_one(f"--{_flag(name)}", getattr(args, name))
        if any(value > MAX_COUNT for value in _numbers(args, name)):  # 10**20 overflowed inside torch
            raise too_large(f"--{_flag(name)}", getattr(args, name))
    for name, least in MINIMUM_FLAGS.items():
        if any(value < least for value in _numbers(args, name)):
            raise MoePruneError(f"--{_flag(name)} must be at least {least} (got {getattr(args, name)}); a window "
                                "scores each token from the ones before it.")
    for name in NON_NEGATIVE_FLAGS:
        if any(value < 0 for value in _numbers(args, name)):
            raise non_negative(f"--{_flag(name)}", getattr(args, name))
    seeds = getattr(args, "seeds", None) or []
    if any(seed < 0 for seed in seeds):
        raise non_negative("--seeds", seeds)
    for name in ("seed", "plan_seed", "recon_seed", "recover_seed", "seeds"):  # bounded: 2**64 overflowed generators
        for value in _numbers(args, name):
            check_seed(value, f"--{_flag(name)}")
    retains = getattr(args, "retain", None)
    for retain in [retains] if isinstance(retains, float) else retains or []:
        if not 0.0 < retain <= 1.0:
            raise MoePruneError(f"Retain ratio {retain} is outside (0, 1]; pass e.g. --retain 0.5 to keep half.")


def _numbers(args: argparse.Namespace, name: str) -> list[int | float]:
    """The numeric values of a flag that may also be a word ("auto") or a list (-B 0 4 8 auto)."""
    value = getattr(args, name, None)
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def _flag(name: str) -> str:
    return {"protect_budget": "protect-budget (-B)"}.get(name, name.replace("_", "-"))


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The flags among ``names`` given on the command line (argparse leaves the others None or False)."""
    return [f"--no-{_flag(n)}" if getattr(args, n, None) is False else f"--{_flag(n)}" for n in names
            if getattr(args, n, None) not in (None, False, []) or (n in NEGATABLE and getattr(args, n, None) is False)]


NEGATABLE = ("stream", "sequential")  # --no-stream is given too (argparse leaves these None when not given)


def _refuse_ignored(given: list[str], needs: str) -> None:
    if given:
        them = "it" if len(given) == 1 else "them"
        raise MoePruneError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect here: "
                            f"{'it applies' if len(given) == 1 else 'they apply'} only {needs}; drop {them}.")


def _check_ignored(args: argparse.Namespace) -> None:
    """A flag the run would ignore is refused in one line naming what it needs (as -B with reap always was)."""
    kinds = [k for k in kinds_of(args) if k != NONE]
    if not kinds:
        _refuse_ignored(_given(args, RECOVER_FLAGS), "with --recover router-kd, merge or merge+router-kd")
    elif not any(k in ("router-kd", "merge+router-kd") for k in kinds):
        _refuse_ignored(_given(args, ("recover_epochs", "recover_lr", "recover_batch_size")),
                        "to router-kd training (--recover router-kd or merge+router-kd)")
    if getattr(args, "model_free", False):
        _refuse_ignored(_given(args, ("dtype", "device", "tokenizer", "recover", "no_verify", "stream")),
                        "when the model is built (--model-free copies the checkpoint's tensors and tokenizer files "
                        "as they are, and verifies from the safetensors)")
    method = _method(args)
    if args.verb in ("plan", "prune") and method in registry.REGISTRY:
        if not _reconstructs_any([method], args.candidate):
            _refuse_ignored(_given(args, RECON_FLAGS), f"to expert-sparsity's reconstruction, which "
                                                       f"--method {method} does not run")
    if args.verb == "plan" and not _reconstructs_any([method], args.candidate) and args.protect_budget != "auto":
        _refuse_ignored(_given(args, ("model", "dtype", "device", "tokenizer", "stream", "trust_remote_code")),
                        f"when planning runs the model (expert-sparsity, -B auto); --method {method} plans "
                        "from the profile alone")
    if args.verb == "profile":
        layered = "--sequential" if args.sequential else "--stream" if getattr(args, "stream", None) else None
        if layered and args.checkpoint_every is not None:
            raise MoePruneError(f"--checkpoint-every does not apply to {layered} (a layer-by-layer run finishes each "
                                "layer for all windows; a killed run starts the corpus over); drop it.")
        if args.sequential and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MoePruneError(SEQUENTIAL_ONE_PROCESS)
        if args.sequential and getattr(args, "stream", None):
            raise MoePruneError("--sequential (weights in CPU memory) and --stream (weights read from disk) are two "
                                "ways to run one layer at a time; choose one.")
    if args.verb in ("eval", "experiment"):
        if args.tasks is not None and not resolve_tasks(args.tasks):
            _refuse_ignored(_given(args, ("limit", "eval_batch_size")), "to zero-shot tasks, which --tasks none skips")
        if args.ppl is not None and not args.ppl:
            _refuse_ignored(_given(args, ("ppl_seq_len", "ppl_windows", "ppl_data")),
                            "to perplexity, which an empty --ppl skips")
    if args.verb == "eval":
        check_something_to_measure(args.ppl, args.tasks)
        if getattr(args, "overwrite", False) and not args.out:
            _refuse_ignored(["--overwrite"], "with --out (eval prints its results otherwise)")
        if getattr(args, "force", False) and not args.mask:
            _refuse_ignored(["--force"], "with --mask")
    if args.verb == "experiment":
        methods = args.methods or registry.names()
        if not _reconstructs_any(methods, args.candidate):
            _refuse_ignored(_given(args, RECON_FLAGS), "to expert-sparsity's reconstruction, which --methods leaves "
                                                       "out")
        reap_off = isinstance(args.reap_corpus, str) and args.reap_corpus.lower() in ("none", "off", "")
        if "reap" not in methods or reap_off:
            _refuse_ignored(_given(args, ("reap_samples", "reap_seq_len")), "to REAP on its own corpus "
                                                                             "(--reap-corpus SPEC with reap)")
        seeded = [m for m in methods if m in registry.REGISTRY and PlanRequest(
            m, seed=None, candidate=args.candidate if registry.method_spec(m).protects else None).seeded]
        if not seeded:
            _refuse_ignored(_given(args, ("seeds",)), "to seeded methods (random), which --methods leaves out")


def _method(args: argparse.Namespace) -> str:
    """--method, or the plan request's default method."""
    return getattr(args, "method", None) or PlanRequest.method


def _reconstructs_any(methods: Sequence[str], candidate: str | None) -> bool:
    return any(m in registry.REGISTRY and registry.needs_model(
        m, candidate if registry.method_spec(m).protects else None) for m in methods)


def _source(args: argparse.Namespace, model: Any = None) -> ModelSource:
    return ModelSource.from_args(args, model)


def _recoveries(args: argparse.Namespace) -> list[RecoveryOptions]:
    return [RecoveryOptions.from_args(args, kind=kind) for kind in kinds_of(args) if kind != NONE]


def _check_profile(args: argparse.Namespace) -> None:
    check_not_a_file(args.out)
    source = _source(args)
    check_profile(source, Calibration.from_args(args), args.out)


def _check_plan(args: argparse.Namespace) -> None:
    check_not_a_file(args.out)
    check_method(_method(args), args.protect_budget, args.candidate)
    request = PlanRequest.from_args(args)
    Profile.load(args.profile)  # a profile that cannot be planned from (mixed models, corrupt) fails here
    model = args.model or _profiled_model(args.profile)
    check_not_overlapping(Path(args.out), [local_model(model)])
    check_own_folder(args.out, foreign_entry, "plan")
    if model and registry.needs_model(request.method, request.candidate):
        ReconstructionOptions.from_args(args).resolved(_source(args, model))


def _check_apply(args: argparse.Namespace) -> None:
    source = Path(resolve_model_path(args.model))
    if args.model_free and not source.is_dir():
        raise MoePruneError(f"--model-free needs a local checkpoint directory; {source} is not one.")
    check_output_dir(args.out, sources=[source if source.exists() else None, args.mask,
                                        *input_files(args.tokenizer, getattr(args, "recover_corpus", None))],
                     overwrite=args.overwrite)
    if args.tokenizer:
        check_tokenizer_source(args.tokenizer, None)
    mask = load_mask(args.mask)
    if args.model_free:
        check_checkpoint_files(source, compute=False)  # sliced, never dequantized
        check_mask_for_checkpoint(mask, source, force=args.force, trust_remote_code=args.trust_remote_code)
    else:
        model = _source(args)
        check_model(model)
        check_mask_for_config(mask, model.config, force=args.force)
        check_mask_layers(mask, model.config, args.trust_remote_code)
        check_dequantize(model, args.dequantize)
        for options in _recoveries(args):
            check_recovery(model, options, mask=mask, where=f"the mask {args.mask}")


def _check_prune(args: argparse.Namespace) -> None:
    check_method(_method(args), args.protect_budget, args.candidate)
    request = PlanRequest.from_args(args)
    model = _source(args)
    workdir = Path(args.workdir or str(args.out).rstrip("/") + ".work")
    local = Path(resolve_model_path(args.model))
    inputs = [*input_files(args.tokenizer, args.corpora, getattr(args, "recover_corpus", None)),
              *[Path(p) for p in args.ppl or [] if Path(p).exists()]]  # every input: --overwrite deletes none
    check_output_dir(args.out, sources=[local if local.exists() else None, workdir, *inputs],
                     overwrite=args.overwrite)
    check_not_a_file(workdir, "--workdir")
    check_profile(model, Calibration.from_args(args), workdir, "--workdir")
    if registry.needs_model(request.method, request.candidate):
        ReconstructionOptions.from_args(args).resolved(model)
    check_retain_for_config(model.config, args.retain)
    if args.ppl:
        check_evaluation(model, EvalSettings(ppl_datasets=args.ppl, tasks="none"))
    for options in _recoveries(args):
        check_recovery(model, options, retains=[args.retain])


def _check_eval(args: argparse.Namespace) -> None:
    model = _source(args)
    check_model(model)
    settings = EvalSettings.from_args(args)
    if args.out:
        check_eval_out(args.out, model, args.mask, settings, args.overwrite)
    check_evaluation(model, settings, "eval --tasks (zero-shot)")
    if args.mask:
        mask = load_mask(args.mask)
        check_mask_for_config(mask, model.config, force=args.force)
        check_mask_layers(mask, model.config, args.trust_remote_code)


def _check_experiment(args: argparse.Namespace) -> None:
    """The experiment's options, resolved as run_experiment resolves them (experiment.resolve_experiment, a floor
    up, is what the CLI hands the same options to)."""
    check_not_a_file(args.out)
    model = _source(args)
    grid = GridOptions.from_args(args)
    unknown = [m for m in grid.methods or () if m not in registry.REGISTRY]
    if unknown:
        raise MoePruneError(
            f"Unknown method(s) {unknown} in --methods; known methods: {', '.join(registry.names())}."
        )
    protecting = registry.protecting()
    tb_given = args.protect_budget is not None or args.candidate is not None
    if tb_given and args.methods and not set(args.methods) & set(protecting):
        raise MoePruneError(
            f"-B/--protect-budget and --candidate only apply to {', '.join(protecting)}, which --methods leaves "
            f"out; drop them or add {protecting[0]} to --methods."
        )
    if args.candidate is not None:
        for method in protecting:
            check_method(method, None, args.candidate)
    check_corpora(args.corpora)
    check_profile_out(args.out, args.model, args.corpora, args.tokenizer)
    check_own_folder(args.out, without_file("experiment.json"), "experiment")
    check_model(model)
    methods = list(grid.methods or registry.names())
    grid = grid.resolved(model, methods)
    calibration = Calibration.from_args(args).resolved(model)
    evaluation = EvalSettings.from_args(args)
    check_evaluation(model, evaluation, "experiment (zero-shot tasks and plots)", plots=True)
    check_corpus_windows(calibration.corpora, model, calibration.seq_len)
    if _reconstructs_any(methods, grid.candidate):
        ReconstructionOptions.from_args(args).resolved(model)
    check_retain_for_config(model.config, list(grid.retains))
    for options in _recoveries(args):
        check_recovery(model, options, retains=list(grid.retains))


# ------------------------------------------------------------------------------- checks of one verb
def check_profile(source: ModelSource, calibration: Calibration, out: str | Path, flag: str = "--out") -> Calibration:
    """Profile's (and prune's) checks before loading: corpora readable, the output folder not over the model, its
    tokenizer or a corpus, the checkpoint's files complete, windows within the model's positions and long enough
    corpora, one model per profile folder. Returns the resolved calibration."""
    check_corpora(calibration.corpora)
    check_profile_out(out, source.model, calibration.corpora, source.tokenizer, flag)
    check_own_folder(out, foreign_entry, "profile" if flag == "--out" else "prune", flag)
    check_model(source)
    if not source.is_loaded:
        check_tokenizer_source(source.name, source.tokenizer if isinstance(source.tokenizer, str) else None)
    resolved = calibration.resolved(source)
    check_corpus_windows(resolved.corpora, source, resolved.seq_len)
    if not source.is_loaded and flag == "--out":
        check_one_model(out, source.config_hash, weights_fingerprint(source.name))
    return resolved


def check_evaluation(source: ModelSource, settings: EvalSettings, what: str = "eval --tasks (zero-shot)",
                     plots: bool = False) -> EvalSettings:
    """eval's (experiment's, prune --ppl's) checks before loading: the [eval] extra, known tasks and perplexity
    sets, readable local files, windows within the model's positions. Returns the resolved settings."""
    resolved = settings.resolved(source)
    tasks = resolve_tasks(resolved.tasks)
    check_eval_extra(["lm_eval"] * bool(tasks) + ["matplotlib"] * plots, what)
    check_ppl_datasets(resolved.ppl_datasets, resolved.ppl_sources)
    check_local_ppl_files(resolved.ppl_datasets, resolved.ppl_sources)
    if tasks:
        check_tasks(tasks)
    return resolved


def check_something_to_measure(ppl: Any, tasks: Any) -> None:
    """eval with an empty ``--ppl`` and ``--tasks none`` would load the model and report nothing."""
    if ppl is not None and not ppl and tasks is not None and not resolve_tasks(tasks):
        raise MoePruneError("Nothing to evaluate: --ppl is empty and --tasks none; give --ppl DATASET (e.g. "
                            "wikitext2) or --tasks TASK (e.g. arc_easy).")


def check_dequantize(source: ModelSource, dequantize: bool) -> None:
    """``--dequantize`` (``api.apply(dequantize=True)``) needs a quantized checkpoint; on a float one it would be
    silently ignored."""
    if dequantize and not source.is_loaded and not source.quantization:
        _refuse_ignored(["--dequantize"], f"to a quantized checkpoint; {source.name} holds float weights")


def check_eval_out(out: str | Path, source: ModelSource, mask: Any, settings: EvalSettings,
                   overwrite: bool) -> Path:
    """eval's results file (CLI and ``api.evaluate``): not an input (the model folder or a file in it, the mask,
    the tokenizer, a perplexity file), replaced only with ``overwrite``."""
    mask_file = None if mask is None or not isinstance(mask, str | Path) else mask
    inputs = [local_model(source), mask_file, source.tokenizer if isinstance(source.tokenizer, str | Path) else None,
              *(settings.ppl_datasets or []), *(settings.ppl_sources or {}).values()]
    return check_output_file(out, sources=inputs, overwrite=overwrite)


def check_recovery(source: ModelSource, options: RecoveryOptions, *, mask: ExpertMask | None = None,
                   retains: Sequence[float] = (), where: str = "the mask") -> RecoveryOptions:
    """--recover's checks before loading: train splits only and reachable corpora, something to merge (for the
    mask, or at every retain ratio), calibration text, a window the model can take, a layout merge understands.
    Returns the resolved options."""
    options.check_used_by([options.kind])
    check_corpora(options.corpora)
    if mask is not None:
        check_prunes([options.kind], mask.kept_per_layer, mask.num_experts, where)
        recovery_corpora(options, mask)  # calibration text: --recover-corpus or the mask's profiled corpora
    meta = routing_meta(source.config)
    if isinstance(meta["num_experts"], int):
        for retain in retains:
            kept = kept_count(retain, meta["num_experts"], meta["top_k"])
            check_prunes([options.kind], kept, meta["num_experts"], f"--retain {retain}")
    if options.merge:
        check_mergeable_config(source.config, source.trust_remote_code)
    resolved = options.resolved(source)  # the window rule
    for spec in resolved.corpora or ():
        check_reachable(parse_corpus(spec))
    return resolved


def check_eval_extra(modules: Sequence[str], what: str) -> None:
    """Optional dependencies (the [eval] extra) present before the work starts, not found missing at its end."""
    missing = [name for name in dict.fromkeys(modules) if importlib.util.find_spec(name) is None]
    if missing:
        raise MoePruneError(
            f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed "
            f"(the [eval] extra); install {'it' if len(missing) == 1 else 'them'} with: {EVAL_EXTRA}"
            + (" (or pass --tasks none to skip zero-shot)." if missing == ["lm_eval"] else ".")
        )


# -------------------------------------------------------------------------------------- small checks
def _profiled_model(profile: str | Path) -> str | None:
    """The model a profile folder records (None when it records none or holds no finished corpus)."""
    done = finished_corpora(profile)
    model = read_meta(Path(profile) / f"{next(iter(done))}.json").get("model") if done else None
    return model if isinstance(model, str) and model else None


def local_model(model: Any) -> Path | None:
    """A model's local folder (None for a hub id, a loaded model without a local path, or no model)."""
    if model is None:
        return None
    if isinstance(model, ModelSource):
        model = model.model
    name = model if isinstance(model, str | Path) else model_name(model)
    try:
        path = Path(resolve_model_path(name))
    except (MoePruneError, OSError, TypeError):
        return None
    return path if path.exists() else None


def check_profile_out(out: str | Path, model: Any, corpora: Sequence[Any] | None, tokenizer: Any = None,
                      flag: str = "--out") -> None:
    """A profile folder must not be, contain or lie inside the model, its tokenizer or a corpus file: a corpus
    profile written there would replace the source's files (profile --out MODEL replaced model.safetensors)."""
    sources: list[Any] = [local_model(model)]
    if isinstance(tokenizer, str | Path):
        sources.append(local_model(tokenizer))
    for corpus in corpora or []:
        spec = corpus if isinstance(corpus, CorpusSpec) else parse_corpus(corpus)
        if spec.kind in ("txt", "jsonl", "parquet"):
            sources.append(Path(spec.source))
    check_not_overlapping(Path(out), sources, flag)


def input_files(tokenizer: Any = None, *corpus_lists: Sequence[Any] | None) -> list[Path]:
    """Every local input besides the model and the mask: the tokenizer's folder and each local corpus file
    (calibration, recovery), for the overlap check of an output that --overwrite may delete."""
    found = [Path(tokenizer)] if isinstance(tokenizer, str | Path) and Path(tokenizer).exists() else []
    for corpora in corpus_lists:
        for corpus in corpora or ():
            try:
                spec = corpus if isinstance(corpus, CorpusSpec) else parse_corpus(str(corpus))
            except MoePruneError:
                continue  # refused by its own check
            if spec.kind in ("txt", "jsonl", "parquet"):
                found.append(Path(spec.source))
    return found


def check_method(method: str, protect_budget: int | str | None, candidate: str | None) -> None:
    """A known method; -B and --candidate only with a protecting method (others would ignore them)."""
    registry.check_request(method, protect_budget, candidate, spelled=registry.CLI_NAMES)


def check_not_a_file(path: str | Path, flag: str = "--out") -> None:
    """An output directory that already exists as a file fails now, not at the first write."""
    path = Path(path)
    check_name_length(path, flag)
    check_not_symlink(path, flag)
    if path.exists() and not path.is_dir():
        raise MoePruneError(f"{flag} {path} is a file, not a directory; choose a directory path.")
    check_writable_parent(path, flag)


def check_corpus_windows(specs: Sequence[str] | None, source: ModelSource, seq_len: int | None) -> None:
    """Local .txt/.jsonl corpora yield at least one window of ``seq_len`` tokens, found with the tokenizer alone
    before the model loads (it tokenizes no more than one window's worth)."""
    parsed = [spec if isinstance(spec, CorpusSpec) else parse_corpus(spec) for spec in specs or []]
    local = [spec for spec in parsed if spec.kind in ("txt", "jsonl")]
    if not local or not seq_len:
        return
    tokenizer = source.tokenizer
    if tokenizer is None or isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer or source.name, source.trust_remote_code)
    for spec in local:
        calibration_windows(spec, tokenizer, 1, seq_len)


def check_corpora(specs: Sequence[str] | None) -> None:
    """Parse every --corpus and read local text files now (an unknown split, a missing file or one that is not
    UTF-8 text fails before the model loads)."""
    for spec in specs or []:
        check_corpus_file(spec if isinstance(spec, CorpusSpec) else parse_corpus(spec))


def check_model(source: ModelSource) -> Any:
    """The model's config (MoePruneError when it cannot be read); a local checkpoint's safetensors files must be
    complete (a truncated download fails here, not deep inside transformers)."""
    config = source.config
    if not source.is_loaded:
        check_checkpoint_files(source.name)
    return config


def load_mask(path: str | Path) -> ExpertMask:
    return ExpertMask.load(path)


def recovery_options(values: Mapping[str, Any]) -> RecoveryOptions:
    """RecoveryOptions from a dict of its fields (unknown keys: one line)."""
    known = set(RecoveryOptions.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise MoePruneError(f"Unknown recover option(s) {unknown}; known: {', '.join(sorted(known))}.")
    return RecoveryOptions(**values)
