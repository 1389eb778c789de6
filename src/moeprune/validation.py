"""Checks that run before any expensive work: flags, devices, output paths, checkpoints, tokenizers, masks.

The CLI calls :func:`check_args` right after parsing, so a bad flag, an output that would overlap the
model, a mask for another model or a retain ratio the router cannot use fails in a second with one line
naming the problem and the fix, instead of after profiling and reconstruction. Each check is also a plain
function the Python API calls (docs/errors.md lists the cases and their tests).
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from moeprune.arch import moe_layers
from moeprune.data.corpora import CorpusSpec, check_corpus_file, parse_corpus
from moeprune.data.sampling import calibration_windows
from moeprune.errors import MoePruneError
from moeprune.io import (
    check_name_length,
    check_not_overlapping,
    check_not_symlink,
    check_output_dir,
    check_own_folder,
    check_writable_parent,
    foreign_entry,
    output_lock,
    read_config_json,
    without_file,
)
from moeprune.loading import (  # noqa: F401 (check_tokenizer re-exported)
    check_checkpoint_files,
    check_device,
    check_tokenizer,
    check_tokenizer_source,
    config_hash,
    load_config,
    load_tokenizer,
    model_name,
    parse_dtype,
    resolve_model_path,
)
from moeprune.options import at_least_one, check_seed, non_negative
from moeprune.planning.mask import ExpertMask
from moeprune.presets import preset_for
from moeprune.profiling.runner import weights_fingerprint
from moeprune.profiling.stats import check_one_model, finished_corpora, read_meta

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

log = logging.getLogger(__name__)


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


def held_outputs(args: argparse.Namespace) -> AbstractContextManager:
    """The lock on apply's and prune's --out, held for the whole run: a second writer fails at its start."""
    return output_lock(args.out) if args.verb in ("apply", "prune") else nullcontext()


def _check_numbers(args: argparse.Namespace) -> None:
    for name in POSITIVE_FLAGS:
        if any(value < 1 for value in _numbers(args, name)):
            raise at_least_one(f"--{_flag(name)}", getattr(args, name))
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
    for name in ("seed", "plan_seed", "recon_seed", "recover_seed", "seeds"):
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


def _check_profile(args: argparse.Namespace) -> None:
    check_not_a_file(args.out)
    check_corpora(args.corpora)
    check_profile_out(args.out, args.model, args.corpora, args.tokenizer)
    check_own_folder(args.out, foreign_entry, "profile")
    config = check_model(args.model, args.trust_remote_code, weights=True)
    check_tokenizer_source(args.model, getattr(args, "tokenizer", None))
    check_seq_len(config, _effective(args, "seq_len"), "--seq-len")
    check_corpus_windows(args.corpora, args.tokenizer or args.model, _effective(args, "seq_len"),
                         args.trust_remote_code)

    check_one_model(args.out, config_hash(config), weights_fingerprint(args.model))


def _effective(args: argparse.Namespace, name: str) -> Any:
    """The flag's value, or the model's preset when it is omitted (what the verb will use)."""
    value = getattr(args, name, None)
    return preset_for(args.model).get(name) if value is None else value


def _check_plan(args: argparse.Namespace) -> None:
    check_not_a_file(args.out)
    check_method(args.method, args.protect_budget, args.candidate)
    model = args.model or _profiled_model(args.profile)
    check_not_overlapping(Path(args.out), [local_model(model)])
    check_own_folder(args.out, foreign_entry, "plan")
    if model and _reconstructs(args.method, args.candidate):
        seq_len = args.recon_seq_len or preset_for(model)["recon_seq_len"]
        check_seq_len(model_config(model, args.trust_remote_code), seq_len, "--recon-seq-len")


def _profiled_model(profile: str | Path) -> str | None:
    """The model a profile folder records (None when it records none or holds no finished corpus)."""
    done = finished_corpora(profile)
    model = read_meta(Path(profile) / f"{next(iter(done))}.json").get("model") if done else None
    return model if isinstance(model, str) and model else None


def local_model(model: Any) -> Path | None:
    """A model's local folder (None for a hub id, a loaded model without a local path, or no model)."""
    if model is None:
        return None
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


def _check_apply(args: argparse.Namespace) -> None:
    from moeprune.planning.fit import check_mask_for_config  # lazy: planning pulls in torch

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
        check_checkpoint_files(source)
        check_mask_for_checkpoint(mask, source, force=args.force, trust_remote_code=args.trust_remote_code)
    else:
        config = check_model(args.model, args.trust_remote_code, weights=True)
        check_mask_for_config(mask, config, force=args.force)
        check_mask_layers(mask, config, args.trust_remote_code)


def check_mask_layers(mask: Any, config: Any, trust_remote_code: bool = False) -> None:
    """The mask covers exactly the model's MoE layers (none missing, none extra), found on an empty (meta
    device) model built from the config: checked before the weights load. A config transformers cannot
    build without running code is left to the check at load."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM


        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        layers = moe_layers(empty)
    except Exception:  # noqa: BLE001 - any failure here is reported by the load itself, with its own message
        return
    mask.check_model([layer.index for layer in layers], layers[0].num_experts if layers else mask.num_experts)


def check_mask_for_checkpoint(mask: Any, folder: str | Path, *, force: bool = False,
                              trust_remote_code: bool = False) -> Any:
    """Model-free apply's check of ``mask`` against the checkpoint in ``folder``, made without its weights (the
    CLI and :func:`moeprune.surgery.shards.prune_checkpoint_files` both call it): :func:`check_mask_for_config`
    on the config transformers builds from config.json, config hash included (``force`` skips it)."""
    from moeprune.planning.fit import check_mask_for_config  # lazy: planning pulls in torch
    config = _config_or_json(Path(folder), trust_remote_code)
    if isinstance(config, dict) and mask.extra.get("config_hash") and not force:
        _warn_hash_unchecked(str(folder))
    check_mask_for_config(mask, config, force=force)
    return config


@functools.cache  # once per folder: the CLI checks up front, then again where it writes
def _warn_hash_unchecked(folder: str) -> None:
    log.warning("The mask's config hash was not checked: transformers cannot build the config of %s without "
                "--trust-remote-code (expert count, top-k and routing groups were checked).", folder)


def _config_or_json(folder: Path, trust_remote_code: bool) -> Any:
    """The config object when transformers can build it (for the config hash), else config.json's dict:
    model-free apply never runs the checkpoint's code, so it must not need --trust-remote-code."""
    try:
        return load_config(folder, trust_remote_code)
    except MoePruneError:
        path = folder / "config.json"
        if not path.exists():
            raise MoePruneError(
                f"{folder} has no config.json; model-free apply needs a Hugging Face checkpoint."
            ) from None

        return read_config_json(folder)


def _check_prune(args: argparse.Namespace) -> None:
    from moeprune.planning.fit import check_retain_for_config  # lazy: planning pulls in torch

    check_method(args.method, args.protect_budget, args.candidate)
    check_corpora(args.corpora)
    source = Path(resolve_model_path(args.model))
    workdir = Path(args.workdir or str(args.out).rstrip("/") + ".work")
    sources = [source if source.exists() else None, workdir,
               *input_files(args.tokenizer, args.corpora, getattr(args, "recover_corpus", None)),
               *[Path(p) for p in getattr(args, "ppl", None) or [] if Path(p).exists()]]
    check_output_dir(args.out, sources=sources, overwrite=args.overwrite)
    check_not_a_file(workdir, "--workdir")
    check_profile_out(workdir, args.model, args.corpora, args.tokenizer, "--workdir")
    check_own_folder(workdir, foreign_entry, "prune", "--workdir")
    config = check_model(args.model, args.trust_remote_code, weights=True)
    check_tokenizer_source(args.model, args.tokenizer)
    check_seq_len(config, _effective(args, "seq_len"), "--seq-len")
    check_corpus_windows(args.corpora, args.tokenizer or args.model, _effective(args, "seq_len"),
                         args.trust_remote_code)
    if _reconstructs(args.method, args.candidate):
        check_seq_len(config, _effective(args, "recon_seq_len"), "--recon-seq-len")
    check_retain_for_config(config, args.retain)


def reconstructs(method: str, candidate: str | None) -> bool:
    """Whether planning ``method`` (with tb-coverage's ``candidate``) runs the layerwise reconstruction."""
    return _reconstructs(method, candidate)


def _reconstructs(method: str, candidate: str | None) -> bool:
    from moeprune.planning import registry  # lazy: planning pulls in torch

    return registry.needs_model(method, candidate)


def _check_eval(args: argparse.Namespace) -> None:
    """(The checks that need moeprune.evaluation, a floor up, are in evaluation.checks: --out, the [eval]
    extra, local perplexity files; the CLI runs them right after these.)"""
    from moeprune.planning.fit import check_mask_for_config  # lazy: planning pulls in torch

    config = check_model(args.model, args.trust_remote_code, weights=True)
    check_tokenizer_source(args.model, args.tokenizer)
    check_seq_len(config, args.ppl_seq_len, "--ppl-seq-len")
    if args.mask:
        mask = load_mask(args.mask)
        check_mask_for_config(mask, config, force=args.force)
        check_mask_layers(mask, config, args.trust_remote_code)


def _check_experiment(args: argparse.Namespace) -> None:
    """(Checks on the experiment's effective options, the [eval] extra and local perplexity files are in
    evaluation.checks, a floor up; the CLI runs them right after these.)"""
    from moeprune.planning import registry  # lazy: planning pulls in torch
    from moeprune.planning.fit import check_retain_for_config  # lazy: planning pulls in torch

    check_not_a_file(args.out)
    check_corpora(args.corpora)
    check_profile_out(args.out, args.model, args.corpora, args.tokenizer)
    check_own_folder(args.out, without_file("experiment.json"), "experiment")
    unknown = [m for m in args.methods or [] if m not in registry.REGISTRY]
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
    config = check_model(args.model, args.trust_remote_code, weights=True)
    check_tokenizer_source(args.model, getattr(args, "tokenizer", None))
    for flag in ("seq_len", "ppl_seq_len"):
        check_seq_len(config, getattr(args, flag), f"--{_flag(flag)}")
    if args.retain:
        check_retain_for_config(config, args.retain)


# -------------------------------------------------------------------------------------- flag checks
def check_method(method: str, protect_budget: int | str | None, candidate: str | None) -> None:
    """A known method; -B and --candidate only with a protecting method (others would ignore them)."""
    from moeprune.planning import registry  # lazy: planning pulls in torch

    registry.check_request(method, protect_budget, candidate, spelled=registry.CLI_NAMES)


def check_not_a_file(path: str | Path, flag: str = "--out") -> None:
    """An output directory that already exists as a file fails now, not at the first write."""
    path = Path(path)
    check_name_length(path, flag)
    check_not_symlink(path, flag)
    if path.exists() and not path.is_dir():
        raise MoePruneError(f"{flag} {path} is a file, not a directory; choose a directory path.")
    check_writable_parent(path, flag)


def check_corpus_windows(specs: Sequence[str] | None, tokenizer_source: str, seq_len: int | None,
                         trust_remote_code: bool = False) -> None:
    """Local .txt/.jsonl corpora yield at least one window of ``seq_len`` tokens, found with the tokenizer alone
    before the model loads (it tokenizes no more than one window's worth)."""
    local = [spec for spec in map(parse_corpus, specs or []) if spec.kind in ("txt", "jsonl")]
    if not local or not seq_len:
        return

    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code)
    for spec in local:
        calibration_windows(spec, tokenizer, 1, seq_len)


def check_corpora(specs: Sequence[str] | None) -> None:
    """Parse every --corpus and read local text files now (an unknown split, a missing file or one that is not
    UTF-8 text fails before the model loads)."""
    for spec in specs or []:
        check_corpus_file(parse_corpus(spec))


# ------------------------------------------------------------------------------------- model checks
def check_model(model: str, trust_remote_code: bool = False, weights: bool = False):
    """The model's config (MoePruneError when it cannot be read); with ``weights``, a local checkpoint's
    safetensors files must be complete (a truncated download fails here, not deep inside transformers)."""
    config = load_config(model, trust_remote_code)
    if weights:
        check_checkpoint_files(model)
    return config


def model_config(model: str, trust_remote_code: bool = False):
    return load_config(model, trust_remote_code)


def max_positions(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 1 else None


def check_seq_len(config: Any, seq_len: int | None, flag: str) -> None:
    """Windows longer than the model's positions would be scored out of its range (eval refuses them too)."""
    limit = max_positions(config)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise MoePruneError(
            f"{flag} {seq_len} (given or the default) exceeds the model's max_position_embeddings={limit}; "
            f"pass {flag} {limit} or less."
        )


# -------------------------------------------------------------------------------------- mask checks
def load_mask(path: str | Path):
    return ExpertMask.load(path)
