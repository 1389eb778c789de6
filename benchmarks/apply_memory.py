"""Peak CPU memory of `moeprune apply` against the size of the checkpoint, at several retain ratios.

Builds a random Qwen2-MoE checkpoint on disk (a few hundred MB in bf16 by default), then runs apply
once per retain ratio, each in a fresh process, and prints the peak resident set *added by apply*
(peak RSS minus the RSS after importing torch, transformers and moeprune) divided by the checkpoint's
bytes on disk, for all memory (RSS) and for private memory only (anon: without the page cache of the
memory-mapped safetensors files, which the kernel reclaims when memory runs short). With CUDA, apply runs
on the GPU and its peak GPU memory / checkpoint bytes is printed too. Target: <= 1.2 at every retain ratio.

``--cap X`` also runs each apply inside a memory cgroup that lets it add at most X times the checkpoint's
bytes (page cache included; the kernel reclaims clean cache at the limit, nothing is swapped) and reports
whether it finished or was OOM-killed; ``--find-min`` bisects the smallest such cap. That is the direct
measure of the RAM apply needs: RSS overstates it by the reclaimable mapped pages, anon understates it by
the page cache that must be resident at once. The checkpoint's page cache is dropped before each run so
that no run reads pages another run paid for. Needs root and a cgroup memory controller (v1 or v2).

``--compare-src DIR`` runs the same apply with another moeprune source tree (e.g. an older commit
extracted with ``git archive``) side by side, so the table shows old and new behaviour measured on the
same machine and checkpoint::

    python benchmarks/apply_memory.py
    git archive 1bec55c src | tar -x -C /tmp/old && python benchmarks/apply_memory.py --compare-src /tmp/old/src
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
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
    from moeprune.surgery import ExportOptions, export_pruned
    from moeprune.surgery.shards import prune_checkpoint_files

    config = json.loads((Path(args.checkpoint) / "config.json").read_text())
    n, layers = config["num_experts"], config["num_hidden_layers"]
    kept = max(config["num_experts_per_tok"], round(args.retain * n))
    rng = random.Random(0)
    mask = ExpertMask("bench", "random", kept / n, n, kept,
                      {i: LayerMask(sorted(rng.sample(range(n), kept))) for i in range(layers)})
    if args.cgroup:  # from here on everything this process adds counts against the cap
        _join_cgroup(Path(args.cgroup))
    baseline, anon_baseline = _status_kib("VmRSS"), _status_kib("RssAnon")
    sampler = _AnonPeak()
    if args.mode == "load":  # the floor: transformers' own from_pretrained in the checkpoint dtype
        transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype="auto")
    elif args.mode == "model-free":
        prune_checkpoint_files(args.checkpoint, mask, args.out, ExportOptions(overwrite=True), progress=False)
    else:
        export_pruned(args.checkpoint, mask, args.out, ExportOptions(overwrite=True, verify=args.mode == "apply"),
                      progress=False)
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


def measure(src: Path, checkpoint: Path, retain: float, mode: str, out: Path, cap: MemoryCap | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src}:{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", "--checkpoint", str(checkpoint), "--retain", str(retain),
           "--mode", mode, "--out", str(out)] + (["--cgroup", str(cap.path)] if cap else [])
    _drop_page_cache(checkpoint)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode == -signal.SIGKILL and cap is not None:
        return {"oom": True, "seconds": seconds}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "seconds": seconds}


def _drop_page_cache(checkpoint: Path) -> None:
    """Evict the checkpoint's clean pages from the page cache, so that a capped run pays for reading them
    (pages cached by an earlier run stay charged to the cgroup that read them, not to the next one)."""
    for file in checkpoint.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class MemoryCap:
    """A memory cgroup capping what the processes in it may hold: anonymous memory plus page cache, the
    clean part of which the kernel reclaims at the limit. cgroup v1 (``memory.limit_in_bytes``, swap also
    capped) or v2 (``memory.max``, ``memory.swap.max`` 0)."""

    V1 = Path("/sys/fs/cgroup/memory")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, limit_bytes: int) -> None:
        v1 = (self.V1 / "memory.limit_in_bytes").exists()
        self.path = (self.V1 if v1 else self.V2) / f"moeprune-bench-{os.getpid()}-{next(_CAP_IDS)}"
        self.path.mkdir()
        if v1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = self.path / "memory.memsw.limit_in_bytes"  # only when the kernel accounts swap
            if swap.exists():
                swap.write_text(str(limit_bytes))
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            (self.path / "memory.swap.max").write_text("0")

    def close(self) -> None:
        self.path.rmdir()

    @staticmethod
    def why_unavailable() -> str | None:
        """None when caps can be made here, else the reason."""
        if os.geteuid() != 0:
            return "needs root to create a cgroup"
        if (MemoryCap.V1 / "memory.limit_in_bytes").exists():
            return None
        controllers = MemoryCap.V2 / "cgroup.subtree_control"
        if controllers.exists() and "memory" in controllers.read_text().split():
            return None
        return "no cgroup memory controller (v1 or v2) is mounted here"


_CAP_IDS = itertools.count()


def _join_cgroup(path: Path) -> None:
    (path / "cgroup.procs").write_text(str(os.getpid()))


def capped(src: Path, checkpoint: Path, retain: float, mode: str, out: Path, size: int, ratio: float) -> dict:
    """One run allowed to add at most ``ratio`` x the checkpoint bytes."""
    cap = MemoryCap(int(ratio * size))
    try:
        return measure(src, checkpoint, retain, mode, out, cap)
    finally:
        cap.close()


def smallest_cap(src: Path, checkpoint: Path, retain: float, mode: str, out: Path, size: int,
                 low: float = 0.05, high: float = 6.0, step: float = 0.05) -> float | None:
    """Bisects the smallest cap (x checkpoint bytes, to ``step``) at which the run completes; None if it
    needs more than ``high``."""
    if "oom" in capped(src, checkpoint, retain, mode, out, size, high):
        return None
    while high - low > step:
        middle = round((low + high) / 2, 4)
        if "oom" in capped(src, checkpoint, retain, mode, out, size, middle):
            low = middle
        else:
            high = middle
    return high


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
    parser.add_argument("--cap", type=float, default=None,
                        help="also run each apply under a memory cgroup of CAP x the checkpoint bytes: ok or OOM")
    parser.add_argument("--find-min", action="store_true",
                        help="also bisect the smallest cgroup cap (x checkpoint bytes) each apply completes under")
    # child-process arguments
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--retain", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cgroup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if (args.cap or args.find_min) and (why := MemoryCap.why_unavailable()):
        parser.error(f"--cap/--find-min: {why}; run without them")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        checkpoint = root / f"qwen2moe-{args.layers}x{args.width}-{args.experts}e-{args.dtype}"
        size = build_checkpoint(checkpoint, args.layers, args.width, args.experts, args.dtype)
        sources = {"new": SRC} | ({"old": Path(args.compare_src).resolve()} if args.compare_src else {})
        print(f"checkpoint: {checkpoint.name}, {size / 2**20:.0f} MiB of safetensors ({args.dtype})")
        print("RSS = (peak RSS - RSS after imports) / checkpoint bytes; anon = the same for private (anonymous)")
        print("memory, i.e. without the reclaimable page cache of mapped files; s = seconds. Target <= 1.2.")
        if args.cap or args.find_min:
            print("cap: the run may add at most that many checkpoint bytes (cgroup; page cache included, clean")
            print("cache reclaimed, no swap); min cap: the smallest such cap it completes under (to 0.05).")
        print()
        columns = _columns(args)
        header = "| mode | retain | " + " | ".join(f"{n} {c}" for n in sources for c in columns) + " |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for mode in args.modes:
            for retain in args.retains:
                cells = []
                for name, src in sources.items():
                    cells += _cells(args, src, checkpoint, retain, mode, root / f"out-{name}", size, len(columns))
                print(f"| {mode} | {retain:.2f} | " + " | ".join(cells) + " |", flush=True)


def _columns(args: argparse.Namespace) -> list[str]:
    return (["RSS", "anon", "s"] + (["GPU"] if _has_cuda() else [])
            + ([f"cap {args.cap:g}x"] if args.cap else []) + (["min cap"] if args.find_min else []))


def _cells(args: argparse.Namespace, src: Path, checkpoint: Path, retain: float, mode: str, out: Path,
           size: int, width: int) -> list[str]:
    """One source's cells of a table row: uncapped RSS / anon / seconds (/ GPU), then the cap columns."""
    result = measure(src, checkpoint, retain, mode, out)
    if "error" in result:
        return [f"error: {result['error'][:60]}"] + [""] * (width - 1)
    added = (result["peak_kib"] - result["baseline_kib"]) * 1024
    anon = (result["anon_peak_kib"] - result["anon_baseline_kib"]) * 1024
    cells = [f"{added / size:.2f}", f"{anon / size:.2f}", f"{result['seconds']:.0f}"]
    if _has_cuda():
        cells.append(f"{(result['gpu_peak_bytes'] or 0) / size:.2f}")
    if args.cap:
        run = capped(src, checkpoint, retain, mode, out, size, args.cap)
        cells.append("OOM" if "oom" in run else "error" if "error" in run else f"ok ({run['seconds']:.0f} s)")
    if args.find_min:
        least = smallest_cap(src, checkpoint, retain, mode, out, size)
        cells.append("> 6" if least is None else f"{least:.2f}")
    return cells

if __name__ == "__main__":
    main()
