"""Profiling speed against the forward-pass limit, measured side by side in one run.

For each model it times, on the same batches and interleaved round by round (so a busy machine
slows all three alike):

  (a) forward   the model's own forward pass (its default experts implementation)
  (b) moeprune  the same forward with moeprune's profiling installed (experts run on routed tokens)
  (c) all-exp   an all-experts observer: every expert run on every token to score it, as some tools do

and prints tokens/s with the ratios (b)/(a) (target >= 0.9) and (b)/(c) (target >= 5 when N/top-k >= 8).
It then reports peak memory of profiling and of apply (in-memory export and model-free shard pruning),
each measured in a fresh process.

    python benchmarks/profile_speed.py                  # bundled testbed + Qwen1.5-MoE-shaped random model
    python benchmarks/profile_speed.py --device cuda --dtype bfloat16 --width 2048   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from moeprune.arch import moe_layers
from moeprune.profiling.instrument import StatsRecorder


def qwen15_shaped(width: int, layers: int, vocab: int) -> Qwen2MoeConfig:
    """Qwen1.5-MoE-A2.7B's routing (60 experts, top-4, shared expert with sigmoid gate) at reduced width."""
    return Qwen2MoeConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=max(4, width // 128),
        num_key_value_heads=max(4, width // 128),
        intermediate_size=width * 11 // 4,
        moe_intermediate_size=width * 11 // 16,  # 1408 / 2048
        shared_expert_intermediate_size=width * 11 // 4,  # 5632 / 2048
        num_experts=60,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        max_position_embeddings=4096,
    )


def build_models(args) -> dict[str, torch.nn.Module]:
    models = {}
    from moeprune.bundled import bundled_model_path

    if (bundled_model_path() / "config.json").exists():
        models["bundled testbed"] = AutoModelForCausalLM.from_pretrained(bundled_model_path(), dtype=args.dtype)
    torch.manual_seed(0)
    config = qwen15_shaped(args.width, args.layers, 4096)
    models[f"Qwen1.5-MoE-shaped (w={args.width})"] = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    return {name: m.to(args.device).eval() for name, m in models.items()}


class AllExpertsObserver:
    """Scores every expert on every token (no routing shortcut): the cost profiling avoids."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = moe_layers(model)
        self.norm_sums = [torch.zeros(layer.num_experts, dtype=torch.float64) for layer in self.layers]

    def installed(self):
        handles = []
        for layer, sums in zip(self.layers, self.norm_sums, strict=True):

            def hook(module, args, _layer=layer, _sums=sums):
                hidden = args[0]
                for expert in range(_layer.num_experts):
                    _sums[expert] += _layer.expert_forward(expert, hidden).float().norm(dim=-1).sum().double().cpu()

            handles.append(layer.experts.register_forward_pre_hook(hook))
        return handles


@torch.inference_mode()
def timed(model, batches, mode: str) -> float:
    recorder = StatsRecorder(moe_layers(model), device=batches[0].device) if mode == "moeprune" else None
    observer = AllExpertsObserver(model) if mode == "all-exp" else None
    handles = observer.installed() if observer else []
    context = recorder.installed() if recorder else _nothing()
    try:
        with context:
            _sync()
            start = time.perf_counter()
            for batch in batches:
                model.base_model(input_ids=batch, use_cache=False)
            _sync()
            return time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()


class _nothing:  # noqa: N801 - a tiny null context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def speed_table(models, args) -> list[str]:
    rows = [
        "| model | N / top-k | tokens | (a) forward tok/s | (b) moeprune tok/s | (c) all-experts tok/s "
        "| (b)/(a) | (b)/(c) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for name, model in models.items():
        layer = moe_layers(model)[0]
        top_k = model.config.num_experts_per_tok
        gen = torch.Generator().manual_seed(0)
        batches = [
            torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=gen).to(args.device)
            for _ in range(args.batches)
        ]
        timed(model, batches[:1], "forward")  # warm-up
        times = {"forward": [], "moeprune": [], "all-exp": []}
        for _ in range(args.rounds):
            for mode in times:
                times[mode].append(timed(model, batches, mode))
        tokens = args.batches * args.batch * args.seq_len
        speed = {mode: tokens / statistics.median(values) for mode, values in times.items()}
        rows.append(
            f"| {name} | {layer.num_experts} / {top_k} | {tokens} | {speed['forward']:,.0f} | "
            f"{speed['moeprune']:,.0f} | {speed['all-exp']:,.0f} | {speed['moeprune'] / speed['forward']:.2f} | "
            f"{speed['moeprune'] / speed['all-exp']:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


PEAK_SCRIPT = """
import json, resource, sys, torch
from transformers import AutoModelForCausalLM
task, path, extra = sys.argv[1], sys.argv[2], sys.argv[3]
if task == "load":
    AutoModelForCausalLM.from_pretrained(path)
elif task == "profile":
    from moeprune.arch import moe_layers
    from moeprune.profiling.instrument import StatsRecorder
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rec = StatsRecorder(moe_layers(model))
    with torch.inference_mode(), rec.installed():
        for _ in range(4):
            model.base_model(input_ids=torch.randint(0, model.config.vocab_size, (4, 512)), use_cache=False)
elif task in ("apply", "model-free"):
    from moeprune.planning.mask import ExpertMask
    mask = ExpertMask.load(extra)
    if task == "apply":
        from moeprune.surgery import ExportOptions, export_pruned
        export_pruned(path, mask, extra + ".out", ExportOptions(overwrite=True, verify=False), progress=False)
    else:
        from moeprune.surgery.shards import prune_checkpoint_files
        prune_checkpoint_files(path, mask, extra + ".free", ExportOptions(overwrite=True), progress=False)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def memory_table(model, work: Path) -> list[str]:
    """Peak resident memory (MiB) of each step in a fresh process, on a checkpoint saved in 3 shards."""
    from moeprune.planning.mask import ExpertMask, LayerMask

    source = work / "source"
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(source, max_shard_size=max(size // 3, 1 << 20))
    layers = moe_layers(model)
    n = layers[0].num_experts
    mask = ExpertMask("bench", "random", 0.5, n, n // 2, {la.index: LayerMask(list(range(0, n, 2))) for la in layers})
    mask.save(work / "mask.json")
    rows = [
        f"\ncheckpoint: {size / 2**20:,.0f} MiB in {len(list(source.glob('*.safetensors')))} shards",
        "| step | peak RSS MiB |",
        "|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for task in ("load", "profile", "apply", "model-free"):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, task, str(source), str(work / "mask.json")],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(f"| {task} | {json.loads(out.stdout.strip().splitlines()[-1]):,.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--width", type=int, default=256, help="hidden size of the Qwen1.5-shaped model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, dtype {args.dtype}")
    models = build_models(args)
    speed_table(models, args)
    if not args.no_memory and args.device == "cpu":
        name = next(n for n in models if n.startswith("Qwen"))
        with tempfile.TemporaryDirectory() as work:
            memory_table(models[name].float(), Path(work))


if __name__ == "__main__":
    main()
