"""Peak CPU memory of `moeprune apply` against the size of the checkpoint, at several retain ratios.

Builds a random Qwen2-MoE checkpoint on disk (a few hundred MB in bf16 by default), then runs apply
once per retain ratio, each in a fresh process, and prints the peak resident set *added by apply*
(peak RSS minus the RSS after importing torch, transformers and moeprune) divided by the checkpoint's
bytes on disk, for all memory (RSS) and for private memory only (anon: without the page cache of the
memory-mapped safetensors files, which the kernel reclaims when memory runs short). With CUDA, apply runs
on the GPU and its peak GPU memory / checkpoint bytes is printed too. Target: <= 1.2 at every retain ratio.

``--compare-src DIR`` runs the same apply with another moeprune source tree (e.g. an older commit
extracted with ``git archive``) side by side, so the table shows old and new behaviour measured on the
same machine and checkpoint::

    python benchmarks/apply_memory.py
    git archive 1bec55c src | tar -x -C /tmp/old && python benchmarks/apply_memory.py --compare-src /tmp/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def build_checkpoint(path: Path, layers: int, width: int, experts: int, dtype: str) -> int:
    """A random Qwen2-MoE checkpoint in ``dtype`` at ``path`` (reused when present); returns its bytes."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    if not (path / "config.json").exists():
        config = Qwen2MoeConfig(
            vocab_size=8192,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=width * 2,
            moe_intermediate_size=width // 2,
            shared_expert_intermediate_size=width * 2,
            num_experts=experts,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            max_position_embeddings=512,
            rope_theta=1e6,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(path)
        del model
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def child(args: argparse.Namespace) -> None:
    """Run one apply in this (fresh) process and print its memory as JSON."""
    import torch  # noqa: F401 - imported before the baseline is taken
    import transformers  # noqa: F401

    from moeprune.planning.mask import ExpertMask, LayerMask
    from moeprune.surgery import export_pruned
    from moeprune.surgery.shards import prune_checkpoint_files

    config = json.loads((Path(args.checkpoint) / "config.json").read_text())
    n, layers = config["num_experts"], config["num_hidden_layers"]
    kept = max(config["num_experts_per_tok"], round(args.retain * n))
    rng = random.Random(0)
    mask = ExpertMask("bench", "random", kept / n, n, kept,
                      {i: LayerMask(sorted(rng.sample(range(n), kept))) for i in range(layers)})
    baseline, anon_baseline = _status_kib("VmRSS"), _status_kib("RssAnon")
    sampler = _AnonPeak()
    if args.mode == "load":  # the floor: transformers' own from_pretrained in the checkpoint dtype
        transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype="auto")
    elif args.mode == "model-free":
        prune_checkpoint_files(args.checkpoint, mask, args.out, overwrite=True, progress=False)
    else:
        export_pruned(args.checkpoint, mask, args.out, overwrite=True, verify=args.mode == "apply", progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "anon_baseline_kib": anon_baseline,
                      "anon_peak_kib": sampler.stop(), "gpu_peak_bytes": _gpu_peak()}))


def _gpu_peak() -> int | None:
    """Peak GPU memory allocated by torch (apply loads onto the GPU when there is one), else None."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _AnonPeak:
    """Samples RssAnon (private memory: what the process cannot give back) every 2 ms in a thread.
    Peak RSS also counts the clean page cache of the memory-mapped safetensors files, which the kernel
    reclaims under pressure; both are reported."""

    def __init__(self) -> None:
        import threading

        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import time

        while self.running:
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, _status_kib("RssAnon"))


def measure(src: Path, checkpoint: Path, retain: float, mode: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src}:{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", "--checkpoint", str(checkpoint), "--retain", str(retain),
           "--mode", mode, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the checkpoint and outputs go (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--retains", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--modes", nargs="+", default=["apply", "model-free"],
                        help="apply (with verification), apply-no-verify, model-free, "
                        "load (from_pretrained only: the floor)")
    parser.add_argument("--compare-src", default=None, help="another moeprune src/ to measure side by side")
    # child-process arguments
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--retain", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        checkpoint = root / f"qwen2moe-{args.layers}x{args.width}-{args.experts}e-{args.dtype}"
        size = build_checkpoint(checkpoint, args.layers, args.width, args.experts, args.dtype)
        sources = {"new": SRC} | ({"old": Path(args.compare_src).resolve()} if args.compare_src else {})
        print(f"checkpoint: {checkpoint.name}, {size / 2**20:.0f} MiB of safetensors ({args.dtype})")
        print("RSS = (peak RSS - RSS after imports) / checkpoint bytes; anon = the same for private (anonymous)")
        print("memory, i.e. without the reclaimable page cache of mapped files. Target <= 1.2.\n")
        gpu = _has_cuda()
        columns = ["RSS", "anon"] + (["GPU"] if gpu else [])
        header = "| mode | retain | " + " | ".join(f"{n} {c}" for n in sources for c in columns) + " |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for mode in args.modes:
            for retain in args.retains:
                cells = []
                for name, src in sources.items():
                    result = measure(src, checkpoint, retain, mode, root / f"out-{name}")
                    if "error" in result:
                        cells += [f"error: {result['error'][:60]}"] + [""] * (len(columns) - 1)
                        continue
                    added = (result["peak_kib"] - result["baseline_kib"]) * 1024
                    anon = (result["anon_peak_kib"] - result["anon_baseline_kib"]) * 1024
                    cells += [f"{added / size:.2f}", f"{anon / size:.2f}"]
                    if gpu:
                        cells.append(f"{(result['gpu_peak_bytes'] or 0) / size:.2f}")
                print(f"| {mode} | {retain:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
