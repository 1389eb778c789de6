"""The CLI's up-front checks of eval and experiment that need moeprune.evaluation (a floor above
moeprune.validation, which runs the others): the [eval] extra, --out against the inputs, local perplexity
files, and the experiment's effective options (its preset filled in, built by ``cli.experiment_options``
and handed down). ``cli.main`` runs them right after :func:`moeprune.validation.check_args`, before any
model loads."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.evaluation.perplexity import check_local_ppl_files
from moeprune.evaluation.runner import resolve_tasks
from moeprune.io import check_output_file
from moeprune.options import EvalSettings, parse_ppl_data
from moeprune.validation import (
    check_corpus_windows,
    check_seq_len,
    local_model,
    model_config,
    reconstructs,
)

EVAL_EXTRA = "pip install 'moeprune[eval]'"


def check_evaluation_args(args: argparse.Namespace, experiment: Mapping[str, Any] | None = None) -> None:
    """``experiment``: the verb's ``run_experiment`` options (``cli.experiment_options``)."""
    if args.verb == "eval":
        _check_eval(args)
    elif args.verb == "experiment":
        assert experiment is not None, "pass the experiment's options"
        _check_experiment(args, experiment)


def check_eval_extra(modules: Sequence[str], what: str) -> None:
    """Optional dependencies (the [eval] extra) present before the work starts, not found missing at its end."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise MoePruneError(
            f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed "
            f"(the [eval] extra); install {'it' if len(missing) == 1 else 'them'} with: {EVAL_EXTRA}"
            + (" (or pass --tasks none to skip zero-shot)." if missing == ["lm_eval"] else ".")
        )


def _check_eval(args: argparse.Namespace) -> None:
    if resolve_tasks(EvalSettings.from_args(args).tasks):
        check_eval_extra(["lm_eval"], "eval --tasks (zero-shot)")
    sources = parse_ppl_data(args.ppl_data) or {}
    if args.out:
        inputs = [local_model(args.model), args.mask, args.tokenizer, *(args.ppl or []), *sources.values()]
        check_output_file(args.out, sources=inputs, overwrite=args.overwrite)
    check_local_ppl_files(args.ppl, sources)


def _check_experiment(args: argparse.Namespace, options: Mapping[str, Any]) -> None:
    from moeprune.planning import METHODS  # lazy: planning pulls in torch

    grid, calibration, evaluation = options["grid"], options["calibration"], options["evaluation"]
    check_eval_extra(["lm_eval"] * bool(resolve_tasks(evaluation.tasks)) + ["matplotlib"],
                     "experiment (zero-shot tasks and plots)")
    check_local_ppl_files(evaluation.ppl_datasets, evaluation.ppl_sources)
    check_corpus_windows(calibration.corpora, args.tokenizer or args.model, calibration.seq_len, args.trust_remote_code)
    if any(reconstructs(m, grid.candidate) for m in grid.methods or list(METHODS)):
        config = model_config(args.model, args.trust_remote_code)
        check_seq_len(config, options["reconstruction"]["seq_len"], "--recon-seq-len")
