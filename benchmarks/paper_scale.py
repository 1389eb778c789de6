"""The paper grid's cost at full size: `moeprune experiment --preset paper` on random-weight models with the
published configs of Qwen1.5-MoE-A2.7B and DeepSeek-MoE-16B (full widths, all 60 / 64 experts), few layers.

For each model and each MoE-layer count in ``--layers`` it

1. builds the model from its published config.json (random weights, ``--dtype``, directly on ``--device``),
   saves it with the bundled tokenizer (the embedding keeps the config's vocabulary size) -- in its own
   process, so the next step's memory figures start clean;
2. runs ``moeprune experiment --preset paper`` on it through moeprune's own CLI parser, with the sample
   counts scaled down by flags, the bundled corpora as calibration text (``wiki``, ``web``), perplexity
   text cut from the bundled test splits to ``--ppl-windows`` windows per dataset, and the bundled
   zero-shot tasks (``--limit`` documents each) standing in for the six hub tasks -- every stage runs:
   load, profile, plan (expert-sparsity reconstruction included; TB-Coverage reuses its candidate),
   apply+evaluate per cell, report;
3. times each stage and records its peak CPU RSS and peak GPU memory (torch's allocator); with
   ``--recover`` (router-kd, merge, ...: an axis of the grid) also each recovery (the router-kd teacher pass
   included in the first), with its peak memory against the model's bytes (target: <= 1.3x + activations).

It then extrapolates the full grid (37 cells, paper sample counts, all layers): each figure is fitted as
``a + b * moe_layers`` over the layer counts run (one count: scaled in proportion, an upper bound) and
scaled by the paper's token counts over the ones run (profile: 2 x 512 x 1024; reconstruction: 64 x 1024;
per cell: 402 perplexity windows of 2048 and the six tasks' request tokens, see PAPER below).

    python benchmarks/paper_scale.py --device cpu --dtype bfloat16 --layers 1 2 --retain 0.5 \\
        --methods expert-sparsity tb-coverage                                   # CPU, ~15 min per model
    python benchmarks/paper_scale.py --models qwen1.5-moe-a2.7b --device cuda --dtype bfloat16 --layers 24 \\
        --samples 32 --batch-size 4 --recon-samples 8 --retain 0.5 --methods expert-sparsity tb-coverage \\
        --ppl-windows 4 --limit 50 --eval-batch-size auto                       # one GPU, full depth
    python benchmarks/paper_scale.py --device cuda --layers 4 8 --methods frequency --retain 0.5 \
        --recover router-kd merge --recover-samples 16                          # recovery cost, both models
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Qwen/Qwen1.5-MoE-A2.7B config.json, every field as published
# (https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json). No copy of this file was found offline;
# every field but eos_token_id, max_position_embeddings, torch_dtype and transformers_version equals the
# published config.json of its sibling Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4 (max_window_layers, sliding_window,
# use_sliding_window, router_aux_loss_coef included), and max_position_embeddings 8192 matches a table citing the
# base file; tests/test_published_configs.py checks this, docs/benchmarks.md lists the sources.
QWEN15_MOE_A27B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# deepseek-ai/deepseek-moe-16b-base config.json as published
# (https://huggingface.co/deepseek-ai/deepseek-moe-16b-base/blob/main/config.json), every field.
# Checked key for key against a verbatim paste of the file (BudEcosystem/simulator
# BudSimulator/model_param_test.py @ f4880392a257): it has no aux_loss_alpha/seq_aux (defaults 0.001/True).
# The tests build their tiny hub-format checkpoint from this same dict (tests/deepseek_checkpoint.py).
DEEPSEEK_MOE_16B_PUBLISHED: dict[str, Any] = {
    "architectures": ["DeepseekForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 102400,
}

# Without auto_map: the folder written here has no remote code, and moeprune loads model_type deepseek
# through its own port.
DEEPSEEK_MOE_16B = {k: v for k, v in DEEPSEEK_MOE_16B_PUBLISHED.items() if k != "auto_map"}

MODELS = {"qwen1.5-moe-a2.7b": QWEN15_MOE_A27B, "deepseek-moe-16b": DEEPSEEK_MOE_16B}

# The paper's protocol, per grid and per cell. Token counts of the zero-shot tasks are estimates (documents x
# choices x ~tokens per request, context + continuation): replace them with counts from the real datasets
# when they are at hand. wikitext2's windows are its ~300k test tokens / 2048 (the exact count depends on
# the tokenizer).
PAPER = {
    "cells": 37,  # dense + 6 methods x 3 retain ratios + random x 3 ratios x 6 seeds
    "profile_tokens": 2 * 512 * 1024,  # wikitext2 + c4, 512 windows of 1024 each
    "recon_tokens": 64 * 1024,  # expert-sparsity on 64 windows of 1024 (c4)
    "ppl_windows": 146 + 256,  # wikitext2 test + c4 (256 x 2048) at seq_len 2048
    "recover_tokens": 256 * 1024,  # router-kd / merge calibration of the paper preset, 1 epoch (docs/recovery.md)
    "zero_shot_tokens": sum(
        docs * choices * tokens
        for docs, choices, tokens in (
            (1172, 4, 40),  # arc_challenge
            (2376, 4, 35),  # arc_easy
            (10042, 4, 75),  # hellaswag
            (1838, 2, 45),  # piqa
            (1267, 2, 25),  # winogrande
            (3270, 2, 160),  # boolq
        )
    ),
}
GIB = 1024**3


# ------------------------------------------------------------------------------------------------ model
def model_config(name: str, moe_layers: int) -> dict[str, Any]:
    """The published config with ``moe_layers`` MoE layers (DeepSeek keeps its dense first layer too)."""
    config = dict(MODELS[name])
    dense = int(config.get("first_k_dense_replace", 0))
    config["num_hidden_layers"] = dense + moe_layers
    return config


def deepseek_port() -> bool:
    """Whether this moeprune loads model_type deepseek (its own port, registered with the Auto classes)."""
    try:
        from moeprune.models import register
    except ImportError:
        return False
    register()
    return True


def build_checkpoint(name: str, moe_layers: int, device: str, dtype: str, out: Path) -> dict[str, Any]:
    """Random weights with the published config, built on ``device`` in ``dtype``, saved with a tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from moeprune.bundled import bundled_model_path
    from moeprune.surgery.tokenizer_files import make_portable

    fields = model_config(name, moe_layers)
    if fields["model_type"] == "deepseek":
        deepseek_port()  # registers model_type deepseek with the Auto classes
    config = AutoConfig.for_model(**{k: v for k, v in fields.items() if k != "transformers_version"})
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    built = time.perf_counter() - start
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(out)
    make_portable(out)  # readable by transformers 4.x too
    params = sum(p.numel() for p in model.parameters())
    return {"build_s": built, "save_s": time.perf_counter() - start - built, "params": params}


# ------------------------------------------------------------------------------------------------ measuring
class Peaks:
    """Peak resident set (sampled every 10 ms) and peak GPU allocation, per stage."""

    def __init__(self) -> None:
        self.rss_max = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.rss_max = max(self.rss_max, self.rss())

    @contextmanager
    def stage(self, record: dict[str, Any], name: str):
        import torch

        self.rss_max = self.rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            record[name] = {
                "s": time.perf_counter() - start,
                "cpu_gib": max(self.rss_max, self.rss()) / GIB,
                "gpu_gib": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else 0.0,
            }


@contextmanager
def patched(owner: Any, name: str, make):
    """Replace ``owner.name`` by ``make(original)`` for the block."""
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def instrumented(record: dict[str, Any], peaks: Peaks):
    """Wrap the experiment's stages (as run_experiment calls them) with timers; cells get ppl/zero-shot splits."""
    from contextlib import ExitStack

    from lm_eval.models.huggingface import HFLM

    import moeprune.evaluation as evaluation
    import moeprune.loading as loading
    from moeprune import experiment

    stages, cells = record.setdefault("stages", {}), record.setdefault("cells", [])
    plans = record.setdefault("plan_methods", {})

    def stage(name):
        def make(original):
            def run(*args, **kwargs):
                with peaks.stage(stages, name):
                    return original(*args, **kwargs)

            return run

        return make

    def plan_method(original):
        def run(out, model, method, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(out, model, method, *args, **kwargs)
            finally:
                plans[method] = plans.get(method, 0.0) + time.perf_counter() - start

        return run

    def cell(original):
        def run(*args, **kwargs):
            cells.append({"ppl_s": 0.0, "ppl_windows": 0, "zs_s": 0.0, "zs_tokens": 0, "zs_model_s": 0.0})
            start = time.perf_counter()
            result = original(*args, **kwargs)
            cells[-1].update(cell=result.get("cell"), s=time.perf_counter() - start)
            return result

        return run

    def timed_into(key, count=None):
        def make(original):
            def run(*args, **kwargs):
                start = time.perf_counter()
                result = original(*args, **kwargs)
                if cells:
                    cells[-1][key] += time.perf_counter() - start
                    if count:
                        cells[-1][count] += int(result.get("windows", 0))
                return result

            return run

        return make

    def counting_tokens(original):
        # The model's share of zero-shot time, per request token (the rest of a cell's lm-eval time is fixed).
        def run(self, requests, *args, **kwargs):
            start = time.perf_counter()
            result = original(self, requests, *args, **kwargs)
            if cells:
                cells[-1]["zs_model_s"] += time.perf_counter() - start
                cells[-1]["zs_tokens"] += sum(
                    len(self.tok_encode(r.args[0])) + len(self.tok_encode(r.args[1])) for r in requests
                )
            return result

        return run

    stack = ExitStack()
    stack.enter_context(patched(loading, "checked_model", stage("load")))  # what run_experiment loads with
    stack.enter_context(patched(experiment, "_profile", stage("profile")))
    stack.enter_context(patched(experiment, "plan_grid", stage("plan")))
    stack.enter_context(patched(experiment, "_plan", plan_method))
    stack.enter_context(patched(experiment, "evaluate_grid", stage("evaluate")))
    stack.enter_context(patched(experiment, "write_outputs", stage("report")))
    stack.enter_context(patched(experiment, "run_cell", cell))
    stack.enter_context(patched(experiment, "_cell_recovery", recovery_timer(record, peaks)))
    stack.enter_context(patched(evaluation, "perplexity", timed_into("ppl_s", "ppl_windows")))
    stack.enter_context(patched(evaluation, "zero_shot", timed_into("zs_s")))
    stack.enter_context(patched(HFLM, "loglikelihood", counting_tokens))
    return stack


def recovery_timer(record: dict[str, Any], peaks: Peaks):
    """Each recovery of the grid: kind, seconds, peak CPU RSS and GPU memory (the first router-kd one includes
    the dense teacher pass, made once per grid)."""
    recoveries = record.setdefault("recoveries", [])

    def make(original):
        def run(out, model, mask, options, shared):
            measured: dict[str, Any] = {}
            with peaks.stage(measured, "recover"):
                result = original(out, model, mask, options, shared)
            recoveries.append({"kind": options.kind, **measured["recover"],
                               "tokens": options.samples * options.seq_len * (options.epochs if options.router_kd
                                                                              else 1)})
            return result

        return run

    return make


def ppl_files(tokenizer_dir: Path, windows: int, seq_len: int, out: Path) -> list[str]:
    """Text cut from the bundled test splits holding ``windows`` perplexity windows each (local files)."""
    from transformers import AutoTokenizer

    from moeprune.bundled import read_bundled_corpus

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    files = []
    for corpus in ("wiki", "web"):
        ids = tok("\n\n".join(read_bundled_corpus(corpus, "test")), add_special_tokens=False).input_ids
        path = out / f"{corpus}-ppl.txt"
        # A margin below the next window: re-tokenising decoded text may shift the count by a few tokens.
        path.write_text(tok.decode(ids[: windows * seq_len + seq_len // 2]))
        files.append(str(path))
    return files


def run_grid(args: argparse.Namespace, checkpoint: Path, out: Path) -> dict[str, Any]:
    """``moeprune experiment CHECKPOINT --preset paper`` with the scaled-down flags, instrumented."""
    from moeprune.cli import build_parser, experiment_options, model_source
    from moeprune.experiment import run_experiment

    max_positions = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    ppl_seq_len = min(2048, max_positions)
    argv = [
        "experiment", str(checkpoint), "--preset", "paper", "--out", str(out / "grid"),
        "--device", args.device, "--dtype", args.dtype,
        "--corpus", "wiki", "--corpus", "web", "--samples", str(args.samples), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--recon-samples", str(args.recon_samples),
        "--recon-seq-len", str(args.seq_len), "--retain", *map(str, args.retain), "--seeds", *map(str, args.seeds),
        "--ppl", *ppl_files(checkpoint, args.ppl_windows, ppl_seq_len, out),
        "--tasks", "bundled", "--limit", str(args.limit), "--eval-batch-size", str(args.eval_batch_size),
        *(["--methods", *args.methods] if args.methods else []),
        *(["--recover", "none", *args.recover, "--recover-samples", str(args.recover_samples),
           "--recover-seq-len", str(args.seq_len), "--recover-epochs", "1"] if args.recover else []),
    ]
    parsed = build_parser().parse_args(argv)
    record: dict[str, Any] = {
        "profile_tokens": 2 * args.samples * args.seq_len,
        "recon_tokens": args.recon_samples * args.seq_len,
        "model_bytes": sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")),
    }
    peaks = Peaks()
    with instrumented(record, peaks):
        run_experiment(model_source(parsed), parsed.out, **{**experiment_options(parsed), "progress": False})
    return record


# ------------------------------------------------------------------------------------------------ workers
def worker(args: argparse.Namespace) -> None:
    """One step in a fresh process; prints its record as the last line of stdout (JSON)."""
    checkpoint = Path(args.work) / "checkpoint"
    if args.worker == "build":
        result = build_checkpoint(args.model_name, args.moe_layers, args.device, args.dtype, checkpoint)
    else:
        result = run_grid(args, checkpoint, Path(args.work))
    print(json.dumps(result))


def spawn(step: str, args: argparse.Namespace, name: str, layers: int, work: Path) -> dict[str, Any] | None:
    command = [sys.executable, __file__, "--worker", step, "--model-name", name, "--moe-layers", str(layers),
               "--work", str(work), *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{name}, {layers} MoE layers, {step} failed:\n{done.stderr[-3000:]}{done.stdout[-1000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ report
def fit(points: dict[int, float], target: int) -> float:
    """Least-squares ``a + b * layers`` at ``target``; one point: scaled in proportion (an upper bound).

    A negative slope is measurement noise (a layer cannot make a stage cheaper): it is taken as 0."""
    xs, ys = list(points), list(points.values())
    if len(xs) == 1:
        return ys[0] * target / xs[0]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return max(my + max(slope, 0.0) * (target - mx), 0.0)


def per_layer_figures(run: dict[str, Any]) -> dict[str, float]:
    """Seconds per unit of work in one run (so runs at different sample counts compare)."""
    stages, cells = run["stages"], run["cells"]
    es = run["plan_methods"].get("expert-sparsity", 0.0)
    ppl = [c["ppl_s"] / c["ppl_windows"] for c in cells if c["ppl_windows"]]
    zs = [c["zs_model_s"] / c["zs_tokens"] for c in cells if c["zs_tokens"]]
    rest = [c["s"] - c["ppl_s"] - c["zs_model_s"] for c in cells]  # lm-eval's own work, masking, footprint
    return {
        "load_s": stages["load"]["s"],
        "profile_s_per_token": stages["profile"]["s"] / run["profile_tokens"],
        "recon_s_per_token": es / run["recon_tokens"],
        "plan_other_s": stages["plan"]["s"] - es,
        "ppl_s_per_window": statistics.median(ppl) if ppl else 0.0,
        "zs_s_per_token": statistics.median(zs) if zs else 0.0,
        "cell_other_s": statistics.median(rest) if rest else 0.0,
    }


def extrapolate(runs: dict[int, dict[str, Any]], full_layers: int) -> dict[str, float]:
    figures = {layers: per_layer_figures(run) for layers, run in runs.items()}
    at = {key: fit({n: f[key] for n, f in figures.items()}, full_layers) for key in next(iter(figures.values()))}
    cell = at["ppl_s_per_window"] * PAPER["ppl_windows"] + at["zs_s_per_token"] * PAPER["zero_shot_tokens"]
    cell += at["cell_other_s"]
    stages = {
        "load": at["load_s"],
        "profile": at["profile_s_per_token"] * PAPER["profile_tokens"],
        "plan (expert-sparsity)": at["recon_s_per_token"] * PAPER["recon_tokens"],
        "plan (other methods)": at["plan_other_s"],
        "evaluate (per cell)": cell,
        f"evaluate ({PAPER['cells']} cells)": cell * PAPER["cells"],
    }
    stages["total"] = sum(v for k, v in stages.items() if k != "evaluate (per cell)")
    return stages


def print_model_table(name: str, runs: dict[int, dict[str, Any]], builds: dict[int, dict[str, Any]]) -> None:
    full = model_config(name, 0)
    full_layers = MODELS[name]["num_hidden_layers"] - int(full.get("first_k_dense_replace", 0))
    layer_counts = sorted(runs)
    print(f"\n### {name}: measured at {', '.join(map(str, layer_counts))} MoE layer(s), "
          f"extrapolated to {full_layers}\n")
    params = ", ".join(f"{n}: {builds[n]['params'] / 1e9:.2f}B" for n in layer_counts)
    print(f"parameters ({params})\n")
    head = " | ".join(f"{n} layer(s): s / CPU GiB / GPU GiB" for n in layer_counts)
    print(f"| stage | {head} |")
    print("|---|" + "---|" * len(layer_counts))
    for stage in ("load", "profile", "plan", "evaluate", "report"):
        row = " | ".join(
            "{s:.1f} / {cpu_gib:.1f} / {gpu_gib:.1f}".format(**runs[n]["stages"][stage])
            if stage in runs[n]["stages"] else "-"
            for n in layer_counts
        )
        print(f"| {stage} | {row} |")
    first = runs[layer_counts[0]]
    print(f"\nper run: profile {first['profile_tokens']} tokens, expert-sparsity {first['recon_tokens']} tokens, "
          f"{len(first['cells'])} cells. Build (not part of the grid): "
          + ", ".join(f"{builds[n]['build_s']:.0f} s + save {builds[n]['save_s']:.0f} s" for n in layer_counts))
    print("\n| MoE layers | expert-sparsity plan s | cell s (median) | ppl s/window | zero-shot model s/1k tokens "
          "| cell rest s |")
    print("|---|---|---|---|---|---|")
    for n in layer_counts:
        f = per_layer_figures(runs[n])
        cell_s = statistics.median(c["s"] for c in runs[n]["cells"])
        print(f"| {n} | {runs[n]['plan_methods'].get('expert-sparsity', 0):.1f} | {cell_s:.1f} | "
              f"{f['ppl_s_per_window']:.2f} | {f['zs_s_per_token'] * 1000:.2f} | {f['cell_other_s']:.1f} |")
    print_recovery_table(runs, layer_counts, full_layers)
    estimate = extrapolate(runs, full_layers)
    print(f"\n| full grid ({PAPER['cells']} cells, paper sample counts, {full_layers} MoE layers) | hours |")
    print("|---|---|")
    for stage, seconds in estimate.items():
        print(f"| {stage} | {seconds / 3600:.2f} |")


def print_recovery_table(runs: dict[int, dict[str, Any]], layer_counts: list[int], full_layers: int) -> None:
    """Per recovery kind: seconds, peak GPU and CPU memory against the checkpoint's bytes, and the time at the
    paper preset's 256 x 1024 tokens and full depth (fitted per layer, like the grid's stages)."""
    kinds = list(dict.fromkeys(r["kind"] for n in layer_counts for r in runs[n].get("recoveries", [])))
    if not kinds:
        return
    print("\n| recovery | MoE layers | s (median) | tokens | peak GPU GiB (x model) | peak CPU GiB | model GiB |")
    print("|---|---|---|---|---|---|---|")
    per_token: dict[str, dict[int, float]] = {}
    for kind in kinds:
        for n in layer_counts:
            done = [r for r in runs[n].get("recoveries", []) if r["kind"] == kind]
            if not done:
                continue
            model_gib = runs[n].get("model_bytes", 0) / GIB
            gpu = max(r["gpu_gib"] for r in done)
            ratio = f" ({gpu / model_gib:.2f}x)" if model_gib and gpu else ""
            seconds = statistics.median(r["s"] for r in done)
            per_token.setdefault(kind, {})[n] = seconds / done[0]["tokens"]
            print(f"| {kind} | {n} | {seconds:.1f} | {done[0]['tokens']} | {gpu:.1f}{ratio} | "
                  f"{max(r['cpu_gib'] for r in done):.1f} | {model_gib:.1f} |")
    print(f"\n| recovery at the paper preset ({PAPER['recover_tokens']} tokens, {full_layers} MoE layers) | "
          "minutes per mask |")
    print("|---|---|")
    for kind, points in per_token.items():
        print(f"| {kind} | {fit(points, full_layers) * PAPER['recover_tokens'] / 60:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="MoE-layer counts to run (>= 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--samples", type=int, default=4, help="calibration windows per corpus (paper: 512)")
    parser.add_argument("--seq-len", type=int, default=1024, help="calibration window (paper: 1024)")
    parser.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward")
    parser.add_argument("--recon-samples", type=int, default=2, help="expert-sparsity windows (paper: 64)")
    parser.add_argument("--retain", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--methods", nargs="+", default=None, help="methods (default: all, as the paper)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="random-method seeds (paper: 6)")
    parser.add_argument("--ppl-windows", type=int, default=1, help="perplexity windows per dataset per cell")
    parser.add_argument("--limit", type=int, default=4, help="documents per bundled zero-shot task per cell")
    parser.add_argument("--eval-batch-size", default="4", help="lm-eval batch size: N, auto or auto:N")
    parser.add_argument("--recover", nargs="+", default=None, metavar="KIND",
                        help="recovery kinds as a grid axis, e.g. router-kd merge (measured per mask)")
    parser.add_argument("--recover-samples", type=int, default=8, help="recovery windows (paper preset: 256)")
    parser.add_argument("--json", default=None, help="also write the raw measurements to this file")
    parser.add_argument("--report", nargs="+", default=None, metavar="JSON", help="print tables from --json files")
    parser.add_argument("--keep", default=None, help="write checkpoints and grids here (kept) instead of a temp folder")
    parser.add_argument("--worker", choices=["build", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--model-name", help=argparse.SUPPRESS)
    parser.add_argument("--moe-layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.report:
        for path in args.report:
            for name, raw in json.loads(Path(path).read_text()).items():
                as_int = {key: {int(n): v for n, v in raw[key].items()} for key in ("runs", "builds")}
                print_model_table(name, as_int["runs"], as_int["builds"])
        return
    print(f"device {args.device}, dtype {args.dtype}; per run: {args.samples} x {args.seq_len} calibration "
          f"tokens per corpus, {args.recon_samples} x {args.seq_len} reconstruction, retain {args.retain}, "
          f"seeds {args.seeds}, {args.ppl_windows} ppl windows per dataset, {args.limit} docs per task")
    raw: dict[str, Any] = {}
    for name in args.models:
        if MODELS[name]["model_type"] == "deepseek" and not deepseek_port():
            print(f"\n{name}: skipped, this moeprune cannot load model_type deepseek (no moeprune.models port).")
            continue
        runs, builds = {}, {}
        for layers in args.layers:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(args.keep or tmp) / f"{name}-{layers}"
                work.mkdir(parents=True, exist_ok=True)
                build = spawn("build", args, name, layers, work)
                run = build and spawn("run", args, name, layers, work)
                if run:
                    builds[layers], runs[layers] = build, run
        if runs:
            raw[name] = {"builds": builds, "runs": runs}
            if args.json:  # the measurements first: a table that fails to print can be printed with --report
                Path(args.json).write_text(json.dumps(raw, indent=1))
            print_model_table(name, runs, builds)


if __name__ == "__main__":
    main()
