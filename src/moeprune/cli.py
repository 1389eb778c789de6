"""The ``moeprune`` console script: profile, plan, apply, prune (all three), eval, experiment, inspect."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.io import environment_errors, terminal_safe
from moeprune.options import (
    Calibration,
    EvalSettings,
    GridOptions,
    ReconstructionOptions,
    parse_ppl_data,
)
from moeprune.presets import PRESETS, RECOVERY_KINDS, help_default, preset_for, preset_name

EXAMPLES = {
    "prune": "moeprune prune Qwen/Qwen1.5-MoE-A2.7B --retain 0.5 --out qwen-50/\n"
    "  moeprune prune bundled --corpus wiki --corpus web --samples 64 --seq-len 256 --retain 0.5 --out pruned/",
    "profile": "moeprune profile MODEL --corpus wikitext2 --corpus c4 --out prof/\n"
    "  torchrun --nproc-per-node 4 -m moeprune profile MODEL --out prof/   # data parallel",
    "plan": "moeprune plan prof/ --method tb-coverage --retain 0.25 0.5 0.75 --out masks/",
    "apply": "moeprune apply MODEL masks/tb-coverage-0.50.json --out qwen-50/",
    "eval": "moeprune eval MODEL --mask masks/tb-coverage-0.50.json --ppl wikitext2 c4 --tasks arc_easy piqa",
    "experiment": "moeprune experiment bundled --preset bundled --out runs/bundled/",
    "inspect": "moeprune inspect MODEL | moeprune inspect prof/ | moeprune inspect masks/tb-coverage-0.50.json",
}


WHERE_IT_RUNS = (
    "where it runs: with CUDA, models load onto the GPU in their checkpoint dtype (bf16), spread over all visible\n"
    "  GPUs when one is too small; --device cpu (or no GPU) loads on the CPU, where --dtype auto means float32\n"
    "  (apply keeps the checkpoint dtype everywhere). -q/--quiet and -v/--verbose set how much is logged."
)


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every writer's cleanup runs (temporary files
    removed; checkpoints, finished corpora and cells kept for the rerun)."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    if args.quiet:
        _silence_library_progress()
    previous = _on_sigterm(_raise_terminated)
    try:
        from moeprune.validation import check_args, held_outputs  # lazy: validation pulls in transformers configs

        check_args(args)  # everything that can fail before the expensive work (docs/errors.md)
        if args.verb in ("eval", "experiment"):
            from moeprune.evaluation.checks import check_evaluation_args  # lazy: evaluation pulls in lm-eval

            check_evaluation_args(args, experiment_options(args) if args.verb == "experiment" else None)
        if getattr(args, "recover", None):
            from moeprune.recovery.checks import check_recovery_args  # lazy: torch, only for --recover

            check_recovery_args(args)
        # A full disk or a read-only folder is one line, not a traceback; --out is locked for the whole run.
        with environment_errors(), held_outputs(args):
            return int(args.run(args) or 0)
    except MoePruneError as err:
        _error(f"error: {err}")
        return 2
    except BrokenPipeError:  # `moeprune inspect X | head`: the reader left; stop quietly, as cat does
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        _error(INTERRUPTED)
        return 128 + signal.SIGINT
    except Terminated:
        _error(INTERRUPTED.replace("interrupted", "terminated"))
        return 128 + signal.SIGTERM
    finally:
        _on_sigterm(previous)


INTERRUPTED = "interrupted; rerun to resume (finished work is kept, unfinished temporary files were removed)."


def _error(message: str) -> None:
    """One line on stderr; text from masks, profiles or configs inside it cannot drive the terminal."""
    print(f"moeprune: {terminal_safe(message, keep_newlines=False)}", file=sys.stderr)


def _say(text: str) -> None:
    """stdout, with escape sequences and control characters from untrusted files stripped."""
    print(terminal_safe(text))


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM (main thread only: others cannot handle signals); return the old one."""
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeprune",
        description="Prune routed experts from Mixture-of-Experts LMs (Generic TB-Coverage and baselines).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, adder, summary in (
        ("prune", _add_prune, "profile, plan and apply in one go"),
        ("profile", _add_profile, "per-expert statistics of the dense model on each corpus"),
        ("plan", _add_plan, "expert masks from a profile"),
        ("apply", _add_apply, "write the pruned checkpoint for a mask"),
        ("eval", _add_eval, "perplexity and zero-shot accuracy, optionally under a mask"),
        ("experiment", _add_experiment, "the paper's grid: methods x retain ratios, tables and plots"),
        ("inspect", _add_inspect, "summarise a model, a profile directory or a mask"),
    ):
        sub = verbs.add_parser(
            name,
            help=summary,
            description=summary,
            epilog="example:\n  " + EXAMPLES[name] + "\n\n" + WHERE_IT_RUNS,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[_output_options()],
        )
        adder(sub)
    return parser


# ----------------------------------------------------------------------------------------------- options
def _model_options(p: argparse.ArgumentParser, positional: bool = True, device: bool = True) -> None:
    if positional:
        p.add_argument("model", help="local checkpoint directory, hub id, or 'bundled' (the shipped testbed)")
    g = p.add_argument_group("model loading")
    g.add_argument(
        "--dtype",
        default="auto",
        help="auto | float32 | bfloat16 | float16 (default auto: the checkpoint's dtype; float32 on the CPU)",
    )
    if device:
        g.add_argument(
            "--device",
            default=None,
            help="cpu, cuda, cuda:1, or auto (spread over all GPUs) (default: the GPU if there is one, spread over "
            "all visible GPUs when it is too small, else the CPU)",
        )
    g.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code")
    if positional:
        g.add_argument(
            "--tokenizer", default=None, help="tokenizer path or hub id (default: the model's; needed when the "
            "model folder has no tokenizer files)"
        )


def _calibration_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--corpus",
        action="append",
        dest="corpora",
        metavar="SPEC",
        help="repeatable: wikitext2, c4, wiki, web, FILE.txt|.jsonl|.parquet, hf:ID[:CONFIG][:SPLIT]"
        f"[:FIELD], NAME=SPEC ({help_default('corpora')})",
    )
    g.add_argument("--samples", type=int, default=None, help=f"sequences per corpus ({help_default('samples')})")
    g.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence ({help_default('seq_len')})")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def _plan_options(p: argparse.ArgumentParser, many: bool) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--method", default="tb-coverage", help="one of: " + ", ".join(_methods()))
    if many:
        g.add_argument("--retain", type=float, nargs="+", required=True, help="retain ratios rho in (0, 1]")
    else:
        g.add_argument("--retain", type=float, required=True, help="retain ratio rho in (0, 1]")
    g.add_argument(
        "--protect-budget",
        "-B",
        type=budget_arg,
        default=None,
        metavar="B",
        help="TB-Coverage's protected experts per layer, or 'auto' (picked per ratio on held-out calibration "
        "windows); default: 20 for N=60, 24 for N=64, else N/3; B > K is clamped to K and noted in the mask",
    )
    if many:  # plan only: prune profiles its own corpora, pooled
        g.add_argument(
            "--reap-corpus",
            default=None,
            metavar="NAME",
            help="reap: rank on this profiled corpus alone instead of all corpora pooled (e.g. a code corpus)",
        )
    g.add_argument("--candidate", default=None, help="TB-Coverage's candidate method (default: expert-sparsity)")
    g.add_argument("--plan-seed", type=int, default=None, help="seed of the random method (default: --seed or 0)")
    r = p.add_argument_group("reconstruction (expert-sparsity)")
    r.add_argument(
        "--recon-corpus",
        default=None,
        help="corpus to reconstruct on (default: c4 if profiled, else the last profiled corpus)",
    )
    r.add_argument("--recon-samples", type=int, default=None, help=f"sequences ({help_default('recon_samples')})")
    r.add_argument(
        "--recon-seq-len", type=int, default=None, help=f"tokens per sequence ({help_default('recon_seq_len')})"
    )
    _recon_cost_options(r)


def _recon_cost_options(r: argparse._ActionsContainer) -> None:
    r.add_argument(
        "--recon-loss",
        choices=["per-batch", "global"],
        default=None,
        help="per-batch: NAEE's sum of per-batch (8-sequence) norms (default); global: one norm (bundled default)",
    )
    r.add_argument(
        "--recon-tokens", type=int, default=None, help="token budget: at most this many tokens, in whole sequences"
    )


def _recovery_options(p: argparse.ArgumentParser, many: bool = False) -> None:
    g = p.add_argument_group("recovery after pruning (docs/recovery.md)")
    g.add_argument(
        "--recover",
        choices=RECOVERY_KINDS,
        nargs="+" if many else None,
        default=None,
        help="router-kd: train only the routers to match the dense model (KL); merge: fold each dropped expert "
        "into its most similar kept one; merge+router-kd: both" + ("; several make a grid axis" if many else "")
        + " (default none)",
    )
    g.add_argument(
        "--recover-corpus",
        action="append",
        default=None,
        metavar="SPEC",
        help="repeatable: recovery calibration corpus, train split only (default: the profiled corpora)",
    )
    g.add_argument("--recover-samples", type=int, default=None,
                   help=f"calibration windows in all, split over the corpora ({help_default('recover_samples')})")
    g.add_argument("--recover-seq-len", type=int, default=None,
                   help=f"tokens per window ({help_default('recover_seq_len')})")
    g.add_argument("--recover-epochs", type=int, default=None,
                   help=f"router-kd passes over the windows ({help_default('recover_epochs')})")
    g.add_argument("--recover-lr", type=float, default=None,
                   help=f"router-kd Adam learning rate ({help_default('recover_lr')})")
    g.add_argument("--recover-batch-size", type=int, default=None,
                   help=f"windows per router-kd step ({help_default('recover_batch_size')})")
    g.add_argument("--recover-seed", type=int, default=None, help="recovery seed: data order and window sampling "
                   "(default 0; windows are sampled with seed + 10000, not the profiling windows)")


def recovery_from_args(args: argparse.Namespace):
    """``--recover`` and its settings over the model's preset, or None without ``--recover``."""
    from moeprune.recovery import RecoveryOptions  # lazy: torch

    if not getattr(args, "recover", None):
        return None
    return RecoveryOptions.from_args(args, preset_for(args.model))


def _methods() -> list[str]:
    from moeprune.planning import registry  # lazy: planning pulls in torch

    return registry.names()


# ------------------------------------------------------------------------------------------------ verbs
def _stream_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read the weights from the checkpoint's safetensors shards one decoder layer at a time, never the "
        "whole model in memory (default: only when the model does not fit in the memory available to the process, "
        "cgroup limits included; --no-stream loads it whole)",
    )


def _add_profile(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    _calibration_options(p)
    p.add_argument("--out", required=True, help="profile directory (finished corpora in it are reused)")
    p.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run one decoder layer at a time on --device, weights on the CPU (default: only when the model "
        "does not fit in free GPU memory)",
    )
    _stream_flag(p)
    p.add_argument(
        "--checkpoint-every", type=int, default=16, help="batches between checkpoints of partial sums (default 16)"
    )
    p.set_defaults(run=_run_profile)


def _run_profile(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast

    _init_distributed()
    calibration = Calibration.from_args(args)
    prof = api.profile(
        args.model,
        calibration.corpora,
        args.out,
        samples=calibration.samples,
        seq_len=calibration.seq_len,
        batch_size=calibration.batch_size,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        sequential=args.sequential,
        stream=args.stream,
        dtype=args.dtype,
        device=args.device,
        tokenizer=args.tokenizer,
        trust_remote_code=args.trust_remote_code,
        progress=_progress(args),
    )
    _say(f"profile of {len(prof.names)} corpora ({', '.join(prof.names)}) in {args.out}")


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile directory written by `moeprune profile`")
    _plan_options(p, many=True)
    _model_options(p, positional=False)
    p.add_argument("--model", default=None, help="model for expert-sparsity (default: the profile's model)")
    p.add_argument("--out", required=True, help="directory for the mask files (<method>-<rho>.json)")
    _stream_flag(p)
    p.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast
    from moeprune.profiling.stats import Profile  # lazy: torch

    # expert-sparsity reloads the profiled model unless told otherwise; its preset follows that model.
    args.model = args.model or Profile.load(args.profile).meta.get("model")
    masks = api.plan_many(
        args.profile,
        args.method,
        args.retain,
        seed=_plan_seed(args),
        protect_budget=args.protect_budget,
        candidate=args.candidate,
        model=args.model,
        reconstruction=ReconstructionOptions.from_args(args),
        score_corpus=args.reap_corpus,
        progress=_progress(args),
    )
    for mask in masks:
        path = Path(args.out) / api.mask_filename(mask)
        mask.save(path)
        _say(f"{path}: keeps {mask.kept_per_layer} of {mask.num_experts} experts in {len(mask.layers)} layers")
        for note in mask.notes:
            _say(f"  note: {note}")


def _add_apply(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument("mask", help="mask.json written by `moeprune plan`")
    p.add_argument("--out", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export to compare logits")
    _force_option(p)
    p.add_argument(
        "--model-free",
        action="store_true",
        help="prune a local safetensors checkpoint shard by shard without building the model (peak memory about "
        "one shard; no logits verification)",
    )
    _recovery_options(p)
    _stream_flag(p)
    p.set_defaults(run=_run_apply)


def _run_apply(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast

    if args.model_free:
        from moeprune.planning.mask import ExpertMask  # lazy: torch
        from moeprune.surgery.shards import prune_checkpoint_files  # lazy: torch and safetensors

        source = Path(api.resolve_model_path(args.model))
        if not source.is_dir():
            raise MoePruneError(f"--model-free needs a local checkpoint directory; {source} is not one.")
        out = prune_checkpoint_files(source, ExpertMask.load(args.mask), args.out, overwrite=args.overwrite,
                                     force=args.force, trust_remote_code=args.trust_remote_code,
                                     progress=_progress(args))
        print(f"pruned checkpoint written to {out} (model-free, shard by shard)")
        return
    out = api.apply(
        args.model,
        args.mask,
        args.out,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        force=args.force,
        progress=_progress(args),
        recover=recovery_from_args(args),
        stream=args.stream,
    )
    print(f"pruned checkpoint written to {out}")


def _add_prune(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    _calibration_options(p)
    _plan_options(p, many=False)
    p.add_argument("--out", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--workdir", default=None, help="where the profile and mask are kept (default: OUT.work)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--ppl",
        nargs="*",
        default=None,
        metavar="DATASET",
        help="print dense and pruned perplexity on these held-out sets (e.g. wiki web, wikitext2 c4)",
    )
    _recovery_options(p)
    _stream_flag(p)
    p.set_defaults(run=_run_prune)


def _run_prune(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast

    out = api.prune(
        args.model,
        args.retain,
        args.out,
        method=args.method,
        calibration=Calibration.from_args(args),
        workdir=args.workdir,
        seed=args.seed,
        protect_budget=args.protect_budget,
        candidate=args.candidate,
        reconstruction=ReconstructionOptions.from_args(args),
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        ppl_datasets=args.ppl,
        progress=_progress(args),
        recover=recovery_from_args(args),
        stream=args.stream,
    )
    print(f"pruned checkpoint written to {out}")


def _add_eval(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument("--mask", default=None, help="mask.json applied in memory (no export needed)")
    _force_option(p)
    p.add_argument(
        "--ppl",
        nargs="*",
        default=None,
        help="perplexity datasets: wikitext2, c4, the bundled wiki web bible man glossary devil, FILE.txt "
        f"({help_default('ppl_datasets')})",
    )
    p.add_argument(
        "--ppl-seq-len",
        type=int,
        default=None,
        help="perplexity window (default: min(2048, max positions); bundled: 256)",
    )
    _ppl_windows_option(p)
    _ppl_data_option(p)
    p.add_argument(
        "--tasks",
        nargs="*",
        default=None,
        help="lm-eval tasks or presets common, bundled, heldout, stress (default: the six of Common Avg; "
        "bundled: heldout; none to skip)",
    )
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument(
        "--eval-batch-size", type=_eval_batch_size, default=8, help="lm-eval batch size: N, auto or auto:N (default 8)"
    )
    p.add_argument("--out", default=None, help="results JSON file (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (e.g. earlier results)")
    _stream_flag(p)
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast

    results = api.evaluate(
        args.model,
        mask=args.mask,
        settings=EvalSettings.from_args(args, ppl_sources=parse_ppl_data(args.ppl_data)),
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        out=args.out,
        tokenizer=args.tokenizer,
        progress=_progress(args),
        stream=args.stream,
    )
    print(json.dumps(results.get("summary", results), indent=2))


def _add_experiment(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument(
        "--preset",
        choices=["paper", "bundled"],
        default=None,
        help="paper: wikitext2+c4, 512x1024, B=20/24, six tasks, seeds 0-4,42; bundled: the testbed, fast "
        "(default: bundled for the testbed, else paper)",
    )
    p.add_argument("--retain", type=float, nargs="+", default=None, help=f"retain ratios ({help_default('retains')})")
    p.add_argument("--methods", nargs="+", default=None, help="methods (default: all)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help=f"random-method seeds ({help_default('seeds')})"
    )
    p.add_argument("--corpus", action="append", dest="corpora", metavar="SPEC",
                   help=f"profiling corpora ({help_default('corpora')})")
    p.add_argument("--samples", type=int, default=None,
                   help=f"calibration sequences per corpus ({help_default('samples')})")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"calibration tokens per sequence ({help_default('seq_len')})")
    p.add_argument("--ppl", nargs="*", default=None, help=f"perplexity datasets ({help_default('ppl_datasets')})")
    p.add_argument("--ppl-seq-len", type=int, default=None, help="perplexity window")
    _ppl_windows_option(p)
    p.add_argument("--tasks", nargs="*", default=None, help="zero-shot tasks")
    p.add_argument("--limit", type=int, default=None, help="examples per task")
    _ppl_data_option(p)
    p.add_argument("--batch-size", type=int, default=None, help="calibration sequences per forward pass")
    p.add_argument("--eval-batch-size", type=_eval_batch_size, default=None, help="lm-eval batch size: N, auto, auto:N")
    p.add_argument(
        "--protect-budget",
        "-B",
        type=budget_arg,
        nargs="+",
        default=None,
        metavar="B",
        help="TB-Coverage's protect budget: one value, 'auto', or several (e.g. 0 4 8 auto) for a sensitivity sweep",
    )
    p.add_argument(
        "--reap-corpus",
        default=None,
        metavar="SPEC",
        help="also run REAP ranked on this corpus alone, e.g. code=evol-codealpaca or "
        "code=FILE.jsonl:instruction+output (paper preset: code=evol-codealpaca; 'none' to skip)",
    )
    p.add_argument("--reap-samples", type=int, default=None, help="REAP-corpus sequences (paper: 128)")
    p.add_argument("--reap-seq-len", type=int, default=None, help="REAP-corpus tokens per sequence (paper: 2048)")
    p.add_argument("--candidate", default=None, help="TB-Coverage's candidate method (default: expert-sparsity)")
    p.add_argument("--recon-corpus", default=None, help="expert-sparsity corpus (default: c4 or the last corpus)")
    p.add_argument("--recon-samples", type=int, default=None, help="expert-sparsity sequences")
    p.add_argument("--recon-seq-len", type=int, default=None, help="expert-sparsity tokens per sequence")
    _recon_cost_options(p)
    _recovery_options(p, many=True)
    p.add_argument("--out", required=True, help="experiment directory (finished cells are reused)")
    _stream_flag(p)
    p.set_defaults(run=_run_experiment)


def experiment_options(args: argparse.Namespace) -> dict[str, Any]:
    """``run_experiment`` keyword arguments from the CLI, one typed option per stage: explicit flags win over
    the preset, and without ``--preset`` the model picks one (the bundled testbed gets the fast one)."""
    from moeprune.recovery import RecoveryOptions  # lazy: torch

    preset = PRESETS[args.preset or preset_name(args.model)]
    return {
        "grid": GridOptions.from_args(args, preset),
        "calibration": Calibration.from_args(args, preset),
        "evaluation": EvalSettings.from_args(args, preset, parse_ppl_data(getattr(args, "ppl_data", None))),
        # The tokenizer travels beside it (run_experiment loads it once), not inside.
        "reconstruction": replace(ReconstructionOptions.from_args(args, preset), tokenizer=None),
        "recovery": RecoveryOptions.from_args(args, preset, kind="none"),
        "dtype": args.dtype,
        "device": args.device,
        "trust_remote_code": args.trust_remote_code,
        "tokenizer": getattr(args, "tokenizer", None),
    }


def _run_experiment(args: argparse.Namespace) -> None:
    from moeprune.experiment import run_experiment  # lazy: the grid pulls in torch and transformers

    result = run_experiment(args.model, args.out, progress=not args.quiet, **experiment_options(args))
    print(terminal_safe(Path(result["files"]["report"]).read_text()))
    print(f"experiment written to {args.out} ({len(result['cells'])} cells)")


def _ppl_data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ppl-data",
        nargs="*",
        default=None,
        metavar="NAME=PATH",
        help="local files replacing hub perplexity data, e.g. wikitext2=wiki.test.raw c4=c4-validation.json.gz",
    )


def _ppl_windows_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ppl-windows",
        type=int,
        default=None,
        metavar="N",
        help="perplexity on the first N windows of each dataset's test split (default: all)",
    )


def _force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force", action="store_true", help="accept a mask planned for a model with another config hash"
    )


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a model (directory or hub id), a profile directory or a mask .json")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> None:
    from moeprune.inspect import describe  # lazy: inspect pulls in torch

    _say(describe(args.target, trust_remote_code=args.trust_remote_code))


# ------------------------------------------------------------------------------------------------ helpers
def budget_arg(text: str) -> int | str:
    """A protect budget on the command line: a whole number or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'auto' (e.g. -B 20, -B auto)") from None


def _output_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    loudness = parent.add_argument_group("output").add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    loudness.add_argument("-v", "--verbose", action="store_true", help="also print debug messages")
    return parent


def _configure_logging(args: argparse.Namespace) -> None:
    """moeprune's log lines (placement, verification, progress of stages) go to stderr at INFO by default."""
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logger = logging.getLogger("moeprune")
    for old in [h for h in logger.handlers if getattr(h, "moeprune_cli", False)]:  # main() run again
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("moeprune: %(message)s"))
    handler.moeprune_cli = True
    logger.addHandler(handler)
    logger.setLevel(level)


class _SafeFormatter(logging.Formatter):
    """Log lines quote paths, model names and mask fields: escape sequences in them are stripped."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().format(record))


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars, like log lines, are for the default and -v; -q keeps stderr to warnings and errors."""
    return not args.quiet


def _silence_library_progress() -> None:
    """-q: transformers' weight-loading bars and datasets' download/map bars off too."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _eval_batch_size(text: str) -> int | str:
    from moeprune.evaluation.zeroshot import eval_batch_size  # lazy: evaluation pulls in torch

    try:
        return eval_batch_size(text)
    except MoePruneError as err:  # argparse prints it with the usage line and exits 2
        raise argparse.ArgumentTypeError(str(err)) from err


def _plan_seed(args: argparse.Namespace) -> int:
    return args.plan_seed if args.plan_seed is not None else getattr(args, "seed", 0) or 0


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: nccl on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


if __name__ == "__main__":
    raise SystemExit(main())
