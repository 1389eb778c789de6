"""The ``moeprune`` console script: profile, plan, apply, prune (all three), eval, experiment, inspect."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.io import environment_errors, terminal_safe
from moeprune.options import (
    Calibration,
    EvalSettings,
    GridOptions,
    ReconstructionOptions,
    add_flags,
    budget_arg,  # noqa: F401 (re-export: the old home of the -B parser)
)

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
        from moeprune.preflight import check_args, held_outputs  # lazy: the preflight pulls in torch and configs

        check_args(args)  # everything that can fail before the expensive work (docs/errors.md)
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


class _Parser(argparse.ArgumentParser):
    """argparse with the tool's error shape: a bad number, an unknown flag or a missing argument is one line naming
    the problem and where the fix is (``moeprune plan: error: argument --retain: ...; see moeprune plan --help``),
    exit 2, instead of the usage text above the error. Subparsers are made of this class too (argparse's default
    ``parser_class`` is the parent's), so one method covers every verb; text echoed from the command line (an
    unknown flag) cannot drive the terminal."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        line = f"{self.prog}: error: {message.rstrip('. ')}; see {self.prog} --help"
        self.exit(2, terminal_safe(line, keep_newlines=False) + "\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports unknown flags from the top parser ("see moeprune --help"); name the verb's help instead.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            verb = getattr(self, "verbs", {}).get(getattr(parsed, "verb", None), self)
            verb.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    parser.verbs = verbs.choices
    return parser


# ----------------------------------------------------------------------------------------------- options
# Every flag of a setting is made from its field (moeprune.options.flag metadata: name, help, group, preset shown in
# the help) by one add_flags per options class; the run functions read them back with each class's from_args. The
# flags written here by hand are the verbs' own: positional inputs, --out, --overwrite and the like.
def _model_options(p: argparse.ArgumentParser, positional: bool = True, stream: bool = False) -> None:
    from moeprune.loading import ModelSource  # lazy: torch

    if positional:
        p.add_argument("model", help="local checkpoint directory, hub id, or 'bundled' (the shipped testbed)")
    skip = ["preset_name"] + ([] if positional else ["tokenizer"]) + ([] if stream else ["stream"])
    add_flags(p, ModelSource, "model loading", skip=skip)


def _plan_options(p: argparse.ArgumentParser, many: bool) -> None:
    from moeprune.planning.request import PlanRequest  # lazy: planning pulls in torch

    one = {"retains": {"nargs": None, "help": "retain ratio rho in (0, 1]"}}
    add_flags(p, PlanRequest, "planning", skip=[] if many else ["score_corpus"], override=None if many else one)
    add_flags(p, ReconstructionOptions, "reconstruction (expert-sparsity)")


def _recovery_options(p: argparse.ArgumentParser, grid: bool = False) -> None:
    from moeprune.recovery import RecoveryOptions  # lazy: torch

    add_flags(p, RecoveryOptions, "recovery after pruning (docs/recovery.md)", skip=["kind"] if grid else ())


def recovery_from_args(args: argparse.Namespace):
    """``--recover`` and its settings (unset: the model's preset, filled by the verb), or None without it."""
    from moeprune.recovery import RecoveryOptions  # lazy: torch

    if not getattr(args, "recover", None):
        return None
    return RecoveryOptions.from_args(args)


def model_source(args: argparse.Namespace, model: Any = None):
    """The verb's model with the loading flags (and experiment's --preset) as one ModelSource."""
    from moeprune.loading import ModelSource  # lazy: torch

    return ModelSource.from_args(args, model)


# ------------------------------------------------------------------------------------------------ verbs
def _add_profile(p: argparse.ArgumentParser) -> None:
    _model_options(p, stream=True)
    add_flags(p, Calibration, "calibration")
    p.add_argument("--out", required=True, help="profile directory (finished corpora in it are reused)")
    p.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run one decoder layer at a time on --device, weights on the CPU (default: only when the model "
        "does not fit in free GPU memory)",
    )
    p.set_defaults(run=_run_profile)


def _run_profile(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast

    _init_distributed()
    prof = api.profile(model_source(args), out=args.out, calibration=Calibration.from_args(args),
                       sequential=args.sequential, progress=_progress(args))
    _say(f"profile of {len(prof.names)} corpora ({', '.join(prof.names)}) in {args.out}")


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile directory written by `moeprune profile`")
    _plan_options(p, many=True)
    _model_options(p, positional=False, stream=True)
    p.add_argument("--model", default=None, help="model for expert-sparsity (default: the profile's model)")
    p.add_argument("--out", required=True, help="directory for the mask files (<method>-<rho>.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace mask files moeprune did not write or that were edited since (default: refuse)")
    p.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast
    from moeprune.planning.mask import check_replaceable_mask  # lazy: torch
    from moeprune.profiling.stats import Profile  # lazy: torch

    # expert-sparsity reloads the profiled model unless told otherwise; its preset follows that model.
    args.model = args.model or Profile.load(args.profile).meta.get("model")
    masks = api.plan_many(
        args.profile,
        plan_request(args),
        model=model_source(args) if args.model else None,
        reconstruction=ReconstructionOptions.from_args(args),
        progress=_progress(args),
    )
    paths = [Path(args.out) / api.mask_filename(mask) for mask in masks]
    for path in paths:  # all checked before any is written
        check_replaceable_mask(path, args.overwrite)
    for mask, path in zip(masks, paths, strict=True):
        mask.save(path)
        _say(f"{path}: keeps {mask.kept_per_layer} of {mask.num_experts} experts in {len(mask.layers)} layers")
        for note in mask.notes:
            _say(f"  note: {note}")


def _add_apply(p: argparse.ArgumentParser) -> None:
    _model_options(p, stream=True)
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
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="write a quantized checkpoint (FP8, MXFP4, compressed-tensors) dequantized, in its config's dtype and "
        "without quantization_config (default: the source's own format, its kept tensors byte for byte)",
    )
    _recovery_options(p)
    p.set_defaults(run=_run_apply)


def _run_apply(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast

    if args.model_free:
        from moeprune.planning.mask import ExpertMask  # lazy: torch
        from moeprune.surgery import ExportOptions  # lazy: torch
        from moeprune.surgery.shards import MODEL_FREE_DEQUANTIZE, prune_checkpoint_files  # lazy: torch, safetensors

        if args.dequantize:
            raise MoePruneError(MODEL_FREE_DEQUANTIZE)
        source = Path(api.resolve_model_path(args.model))
        if not source.is_dir():
            raise MoePruneError(f"--model-free needs a local checkpoint directory; {source} is not one.")
        out = prune_checkpoint_files(source, ExpertMask.load(args.mask), args.out,
                                     ExportOptions(overwrite=args.overwrite, force=args.force),
                                     trust_remote_code=args.trust_remote_code, progress=_progress(args))
        print(f"pruned checkpoint written to {out} (model-free, shard by shard)")
        return
    out = api.apply(model_source(args), args.mask, args.out, overwrite=args.overwrite, verify=not args.no_verify,
                    force=args.force, recover=recovery_from_args(args), dequantize=args.dequantize,
                    progress=_progress(args))
    print(f"pruned checkpoint written to {out}")


def _add_prune(p: argparse.ArgumentParser) -> None:
    _model_options(p, stream=True)
    add_flags(p, Calibration, "calibration", skip=["checkpoint_every"])
    _plan_options(p, many=False)
    p.add_argument("--out", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--workdir", default=None, help="where the profile and mask are kept (default: OUT.work)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_flags(p, EvalSettings, only=["ppl_datasets"], override={"ppl_datasets": {
        "help": "print dense and pruned perplexity on these held-out sets (e.g. wiki web, wikitext2 c4)"}})
    _recovery_options(p)
    p.set_defaults(run=_run_prune)


def _run_prune(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast

    out = api.prune(
        model_source(args),
        plan_request(args),
        args.out,
        calibration=Calibration.from_args(args),
        reconstruction=ReconstructionOptions.from_args(args),
        recover=recovery_from_args(args),
        ppl_datasets=args.ppl,
        workdir=args.workdir,
        overwrite=args.overwrite,
        progress=_progress(args),
    )
    print(f"pruned checkpoint written to {out}")


def _add_eval(p: argparse.ArgumentParser) -> None:
    _model_options(p, stream=True)
    p.add_argument("--mask", default=None, help="mask.json applied in memory (no export needed)")
    _force_option(p)
    add_flags(p, EvalSettings, "evaluation")
    p.add_argument("--out", default=None, help="results JSON file (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (e.g. earlier results)")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from moeprune import api  # lazy: the api pulls in torch; --help stays fast

    results = api.evaluate(model_source(args), mask=args.mask,
                           settings=EvalSettings.from_args(args),
                           out=args.out, overwrite=args.overwrite, force=args.force, progress=_progress(args))
    print(json.dumps(results.get("summary", results), indent=2))


def _add_experiment(p: argparse.ArgumentParser) -> None:
    from moeprune.loading import ModelSource  # lazy: torch

    _model_options(p, stream=True)
    add_flags(p, ModelSource, only=["preset_name"])
    add_flags(p, GridOptions, "grid")
    add_flags(p, Calibration, "calibration", skip=["seed", "checkpoint_every"])
    add_flags(p, EvalSettings, "evaluation")
    add_flags(p, ReconstructionOptions, "reconstruction (expert-sparsity)")
    _recovery_options(p, grid=True)
    p.add_argument("--out", required=True, help="experiment directory (finished cells are reused)")
    p.set_defaults(run=_run_experiment)


def experiment_options(args: argparse.Namespace) -> dict[str, Any]:
    """``run_experiment`` keyword arguments from the CLI, one typed option per stage (unset fields: the model
    source's preset, resolved by the verb; ``--preset`` is the source's)."""
    from moeprune.recovery import RecoveryOptions  # lazy: torch

    return {
        "grid": GridOptions.from_args(args),
        "calibration": Calibration.from_args(args),
        "evaluation": EvalSettings.from_args(args),
        "reconstruction": ReconstructionOptions.from_args(args),
        "recovery": RecoveryOptions.from_args(args, kind="none"),
    }


def _run_experiment(args: argparse.Namespace) -> None:
    from moeprune.experiment import run_experiment  # lazy: the grid pulls in torch and transformers

    result = run_experiment(model_source(args), args.out, progress=not args.quiet, **experiment_options(args))
    print(terminal_safe(Path(result["files"]["report"]).read_text()))
    print(f"experiment written to {args.out} ({len(result['cells'])} cells)")


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


def plan_request(args: argparse.Namespace):
    """The plan request of plan and prune (--method, --retain, --plan-seed, -B, --candidate, --reap-corpus)."""
    from moeprune.planning.request import PlanRequest  # lazy: planning pulls in torch

    return PlanRequest.from_args(args)


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
