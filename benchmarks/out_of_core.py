"""Out-of-core run (issue 24): a full-depth checkpoint larger than the memory cap, every stage under the cap.

Writes Qwen1.5-MoE-A2.7B (24 layers, 28.6 GB bf16) or DeepSeek-MoE-16B (28 layers, 32.8 GB) at its published
config with random weights, one safetensors shard per decoder layer in the hub's per-expert layout (transformers'
own reverse conversion makes the keys), never more than one layer in memory; then runs each stage through the CLI in
a child process inside a memory cgroup (default 8 GiB; the child joins it before importing anything, so the runtime
counts), the checkpoint's pages evicted from the page cache first (cold reads). Per stage: wall time, peak RSS, the
cgroup's peak (anonymous memory + page cache), bytes read from storage (/proc/self/io), and the ratio of the wall
time to max(compute, read), where compute is the same layers run in memory (one decoder layer materialized once and
timed on the stage's batches, times the depth, plus the embeddings) and read is bytes / the disk's sequential speed.

    nice python benchmarks/out_of_core.py --model qwen1.5-moe-a2.7b --dir /work/ooc --cap-gib 8 --windows 4 \\
        --out benchmarks/out/out_of_core.json

Needs root and a cgroup memory controller (see benchmarks/apply_memory.py's MemoryCap); about 30 GB of free disk.
The checkpoint is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# ------------------------------------------------------------------------------------------ the checkpoint
def write_checkpoint(folder: Path, name: str, seed: int = 0, layers: int | None = None) -> int:
    """The model at its published config with random weights, one shard per decoder layer; returns its bytes."""
    import torch
    from accelerate import init_empty_weights
    from paper_scale import MODELS
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from moeprune.bundled import bundled_model_path
    from moeprune.models import register

    register()
    folder.mkdir(parents=True, exist_ok=True)
    values = dict(MODELS[name])
    values["num_hidden_layers"] = layers or values["num_hidden_layers"]
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = skeleton.state_dict()
    prefix = "model.layers."
    groups: dict[str, list[str]] = {}
    for key in state:
        group = ".".join(key.split(".")[:3]) if key.startswith(prefix) else "rest"
        groups.setdefault(group, []).append(key)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    names = sorted(groups, key=lambda g: (g != "rest", int(g.split(".")[-1]) if g != "rest" else -1))
    for number, group in enumerate(names, 1):
        shard = f"model-{number:05d}-of-{len(names):05d}.safetensors"
        tensors = {}
        for key in groups[group]:
            meta = state[key]
            if key.endswith("norm.weight") or "layernorm" in key:
                value = torch.ones(meta.shape, dtype=torch.bfloat16)
            else:
                std = 0.5 if key.endswith("mlp.gate.weight") else 0.02
                value = (torch.randn(meta.shape, generator=generator) * std).to(torch.bfloat16)
            tensors[key] = value
        tensors = {k: v.contiguous() for k, v in revert_weight_conversion(skeleton, tensors).items()}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = shard
            total += value.numel() * value.element_size()
        del tensors
        print(f"wrote {shard} ({group})", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    for file in Path(bundled_model_path()).iterdir():  # a tokenizer (8k ids, all inside the vocabulary)
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, folder / file.name)
    return total


# ------------------------------------------------------------------------------------------ one stage, capped
def child(argv: list[str], cgroup: str | None, report: Path) -> None:
    if cgroup:  # first thing: everything this process holds counts against the cap, imports included
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
    start = time.perf_counter()
    from moeprune.cli import main

    rc = main(argv)
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report.write_text(json.dumps({"rc": rc, "wall_s": time.perf_counter() - start,
                                  "cpu_s": usage.ru_utime + usage.ru_stime,  # every thread, imports included
                                  "peak_rss": _vm_hwm(),
                                  "read_bytes": int(io["read_bytes"])}))


def _vm_hwm() -> int:
    """Peak RSS of this process since its exec (ru_maxrss would carry the parent's over)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_stage(name: str, argv: list[str], cap_bytes: int | None, checkpoint: Path, work: Path) -> dict[str, Any]:
    from apply_memory import MemoryCap, _drop_page_cache

    _drop_page_cache(checkpoint)
    cap = MemoryCap(cap_bytes) if cap_bytes else None
    report = work / f"{name}.report.json"
    log = work / f"{name}.log"
    load_before = os.getloadavg()[0]
    try:
        cmd = [sys.executable, __file__, "--child", json.dumps(argv), "--report", str(report)]
        cmd += ["--cgroup", str(cap.path)] if cap else []
        with open(log, "w") as handle:
            done = subprocess.run(cmd, stderr=handle, stdout=handle, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        result: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {"rc": done.returncode}
        if done.returncode and "rc" in result and result["rc"] == 0:
            result["rc"] = done.returncode
        if cap:
            peak = cap.path / "memory.max_usage_in_bytes"
            result["cgroup_peak"] = int((peak if peak.exists() else cap.path / "memory.peak").read_text())
    finally:
        if cap:
            cap.close()
    result["load_1min"] = [load_before, os.getloadavg()[0]]  # the machine is shared: say how busy it was
    result["log_tail"] = log.read_text().strip().splitlines()[-3:]
    print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


# ------------------------------------------------------------------------------------------ compute in memory
def compute_seconds(checkpoint: Path, windows: int, seq_len: int, batch_size: int, with_head: bool) -> dict:
    """The stage's layers run in memory: decoder layer 1 materialized once, timed on the stage's batches (with the
    profiling recorder when ``with_head`` is False), times the depth; plus the embeddings and, for evaluation, the
    head."""
    import torch

    from moeprune.arch.view import moe_layers
    from moeprune.loading import load_config
    from moeprune.profiling.instrument import StatsRecorder
    from moeprune.streaming.layers import DiskLayers
    from moeprune.streaming.parked import ParkedStore
    from moeprune.streaming.runner import _embed  # noqa: PLC2701 - the benchmark times the runner's own phases

    torch.manual_seed(0)
    place = DiskLayers(checkpoint, load_config(checkpoint), torch.bfloat16, "cpu")
    ids = torch.randint(3, 8000, (windows, seq_len))
    batches = [{"input_ids": b} for b in torch.split(ids, batch_size)]
    with torch.inference_mode():
        place.load_outside()
        start = time.perf_counter()
        store = ParkedStore(budget=1 << 62)  # all in memory: the compute figure reads nothing from disk
        kwargs = _embed(place.model, place.layers, batches, place.device, store)
        parked = [store[b] for b in range(len(store))]
        embed = time.perf_counter() - start
        layer = place.load(1)
        recorder = StatsRecorder(moe_layers(place.model))
        with recorder.installed():
            start, cpu = time.perf_counter(), time.process_time()
            for b, hidden in enumerate(parked):
                layer(hidden, **kwargs[b][1])
            per_layer, per_layer_cpu = time.perf_counter() - start, time.process_time() - cpu
        head = 0.0
        if with_head:
            start = time.perf_counter()
            for hidden in parked:
                place.model.lm_head(place.model.model.norm(hidden))
            head = time.perf_counter() - start
    return {"embed_s": embed, "per_layer_s": per_layer, "head_s": head, "per_layer_cpu_s": per_layer_cpu,
            "compute_s": embed + per_layer * len(place.layers) + head,
            "compute_cpu_s": per_layer_cpu * len(place.layers),
            "load_1min_compute": os.getloadavg()[0]}


def disk_speed(checkpoint: Path) -> float:
    """Cold sequential read speed of the checkpoint's largest shard, bytes/s, measured now (page cache evicted)."""
    from apply_memory import _drop_page_cache

    _drop_page_cache(checkpoint)
    shard = max(checkpoint.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    start, total = time.perf_counter(), 0
    with open(shard, "rb", buffering=0) as handle:
        while chunk := handle.read(16 << 20):
            total += len(chunk)
    return total / (time.perf_counter() - start)


def gpu_stream(checkpoint: Path, windows: int, fraction: float) -> dict[str, Any]:
    """On a GPU, capped to ``fraction`` of the model's bytes: streamed profile and perplexity, wall, bytes, peak."""
    import torch

    from moeprune import api
    from moeprune.options import EvalSettings

    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, fraction * size / total))
    out: dict[str, Any] = {"checkpoint_bytes": size, "gpu_cap_bytes": int(fraction * size),
                           "gpu": torch.cuda.get_device_name(0)}
    for stage, run in {
        "profile": lambda: api.profile(str(checkpoint), ["wiki", "web"], checkpoint.parent / "gpu-prof",
                                       samples=windows, seq_len=1024, batch_size=2, dtype="bfloat16",
                                       device="cuda", stream=True, progress=False),
        "ppl": lambda: api.evaluate(str(checkpoint), settings=EvalSettings(ppl_datasets=("wiki",), ppl_seq_len=1024,
                                                                           max_windows=windows, tasks="none"),
                                    dtype="bfloat16", device="cuda", stream=True, progress=False),
    }.items():
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run()
        out[stage] = {"wall_s": time.perf_counter() - start, "gpu_peak": torch.cuda.max_memory_allocated()}
        print(f"{stage}: {json.dumps(out[stage])}", file=sys.stderr, flush=True)
    return out


def table(files: list[Path]) -> str:
    """docs/benchmarks.md's table: one row per model and stage."""
    rows = ["| model | stage | wall | CPU | load (1 min, before/after) | peak RSS | cgroup peak | read | read floor | "
            "compute in memory | wall / max(compute, read) | wall / compute | CPU / in-memory CPU |", "|" + "---|" * 13]
    for file in files:
        results = json.loads(Path(file).read_text())
        speed = results.get("disk_bytes_per_s")
        for stage, r in results["stages"].items():
            name = f"{stage}, {results['windows_per_corpus']} x 1024 a corpus" if stage == "profile" else stage
            load = "/".join(f"{x:.1f}" for x in r.get("load_1min", [])) or "-"
            compute = f"{r['compute_s']:.0f} s" if "compute_s" in r else ""
            ratio = f"**{r['ratio']:.2f}**" if "ratio" in r else ""
            cpu_ratio = f"{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else ""
            over_compute = f"{r['wall_s'] / r['compute_s']:.2f}" if "compute_s" in r else ""
            floor = f"{r['read_bytes'] / speed:.0f} s" if speed else f"{r.get('read_floor_s', 0):.0f} s"
            cpu = f"{r['cpu_s']:.0f} s" if "cpu_s" in r else "-"
            rows.append(f"| {results['model']} | {name} | {r['wall_s']:.0f} s | {cpu} | {load} | "
                        f"{r['peak_rss'] / 1e9:.2f} GB | {r.get('cgroup_peak', 0) / 2**30:.2f} GiB | "
                        f"{r['read_bytes'] / 1e9:.1f} GB | {floor} | {compute} | {ratio} | {over_compute} | "
                        f"{cpu_ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen1.5-moe-a2.7b")
    parser.add_argument("--dir", type=Path, default=Path("/work/ooc"))
    parser.add_argument("--cap-gib", type=float, default=8.0)
    parser.add_argument("--windows", type=int, default=4, help="1024-token windows per corpus (two corpora)")
    parser.add_argument("--stages", nargs="+", default=["profile", "plan", "apply"])
    parser.add_argument("--out", type=Path, default=HERE / "out" / "out_of_core.json")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a smoke test)")
    parser.add_argument("--table", type=Path, nargs="+", help="print the markdown table of these results files")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (default: deleted at the end)")
    parser.add_argument("--gpu", action="store_true", help="stream onto the GPU instead of capping host memory")
    parser.add_argument("--gpu-fraction", type=float, default=0.25, help="GPU memory cap, times the model's bytes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cgroup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child), args.cgroup, args.report)
    if args.table:
        print(table(args.table))
        return None

    if args.gpu:
        checkpoint = args.dir / args.model
        if not (checkpoint / "model.safetensors.index.json").exists():
            write_checkpoint(checkpoint, args.model, layers=args.layers)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(gpu_stream(checkpoint, 2 * args.windows, args.gpu_fraction), indent=1))
        if not args.keep:
            shutil.rmtree(args.dir)
        return None
    from apply_memory import MemoryCap

    why = MemoryCap.why_unavailable()
    if why:
        sys.exit(f"out_of_core: cannot cap memory here: {why}")
    checkpoint, work = args.dir / args.model, args.dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results: dict[str, Any] = {"model": args.model, "cap_gib": args.cap_gib, "windows_per_corpus": args.windows,
                               "cpus": os.cpu_count(), "load_at_start": os.getloadavg(),
                               "stages": previous.get("stages", {})}
    start = time.perf_counter()
    if not (checkpoint / "model.safetensors.index.json").exists():
        results["checkpoint_bytes"] = write_checkpoint(checkpoint, args.model, layers=args.layers)
    else:
        results["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    results["write_s"] = time.perf_counter() - start
    results["disk_bytes_per_s"] = speed = disk_speed(checkpoint)
    cap = int(args.cap_gib * 2**30)
    calib = ["--corpus", "wiki", "--corpus", "web", "--samples", str(args.windows), "--seq-len", "1024",
             "--batch-size", "2", "--dtype", "bfloat16", "--device", "cpu"]
    stages = {
        "profile": ["profile", str(checkpoint), *calib, "--out", str(work / "prof")],
        "plan": ["plan", str(work / "prof"), "--method", "reap", "--retain", "0.5",
                 "--out", str(work / "masks")],
        "apply": ["apply", str(checkpoint), str(work / "masks" / "reap-0.50.json"), "--model-free",
                  "--out", str(work / "pruned"), "--overwrite"],
        # expert-sparsity at 50%: its reconstruction captures streamed (one pass over the layers), kept in the profile
        "plan-es": ["plan", str(work / "prof"), "--method", "expert-sparsity", "--retain", "0.5", "--model",
                    str(checkpoint), "--recon-samples", str(args.windows), "--recon-seq-len", "1024",
                    "--dtype", "bfloat16", "--device", "cpu", "--out", str(work / "masks-es")],
        # TB-Coverage at 50%: its candidate is the expert-sparsity search (the captures above are reused when present)
        "plan-tb": ["plan", str(work / "prof"), "--method", "tb-coverage", "--retain", "0.5", "--model",
                    str(checkpoint), "--recon-samples", str(args.windows), "--recon-seq-len", "1024",
                    "--dtype", "bfloat16", "--device", "cpu", "--out", str(work / "masks-tb")],
        "apply-stream": ["apply", str(checkpoint), str(work / "masks" / "reap-0.50.json"), "--dtype", "bfloat16",
                         "--device", "cpu", "--out", str(work / "pruned-stream"), "--overwrite"],
        "ppl": ["eval", str(checkpoint), "--mask", str(work / "masks" / "reap-0.50.json"), "--ppl", "wiki",
                "--ppl-seq-len", "1024", "--ppl-windows", str(args.windows), "--tasks", "none", "--dtype",
                "bfloat16", "--device", "cpu", "--out", str(work / "ppl.json"), "--overwrite"],
        "zero-shot": ["eval", str(checkpoint), "--mask", str(work / "masks" / "reap-0.50.json"), "--ppl",
                      "--tasks", "bundled", "--limit", "5", "--eval-batch-size", "8", "--dtype", "bfloat16",
                      "--device", "cpu", "--out", str(work / "zero-shot.json"), "--overwrite"],
    }
    for name in args.stages:
        result = run_stage(name, stages[name], cap, checkpoint, work)
        if name == "profile":
            result.update(compute_seconds(checkpoint, 2 * args.windows, 1024, 2, with_head=False))
            read_s = result["read_bytes"] / speed
            result["read_s"] = read_s
            result["ratio"] = result["wall_s"] / max(result["compute_s"], read_s)
            # contention-free view on a shared machine: CPU seconds streamed (every thread, start-up included)
            # against the CPU seconds of the same layers in memory
            result["cpu_ratio"] = result["cpu_s"] / result["compute_cpu_s"]
        result["read_floor_s"] = result.get("read_bytes", 0) / speed
        results["stages"][name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    if not args.keep:
        shutil.rmtree(checkpoint)
        shutil.rmtree(work / "pruned", ignore_errors=True)


if __name__ == "__main__":
    main()
