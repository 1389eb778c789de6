"""Zero-shot time per experiment cell: lm-eval objects built every cell (before) vs once per run (now).

On one loaded model it evaluates the same cells (dense, then random masks applied in memory with
``surgery.masked``) both ways, alternating whole grids round by round (medians over rounds):

  fresh   ``zero_shot`` as a lone call: TaskManager (indexes lm-eval's task folders), the tasks and HFLM
          built for the cell
  reused  inside ``reuse_lm_eval()``, as ``experiment`` runs its cells: built at the first cell only

and prints seconds per cell, the saving, and whether both paths gave identical metrics.

    python benchmarks/lm_eval_reuse.py                      # bundled testbed, bundled tasks, 20 docs each
    python benchmarks/lm_eval_reuse.py --limit 150 --rounds 1  # the bundled preset's per-task count
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from moeprune.arch import moe_layers
from moeprune.evaluation.zeroshot import reuse_lm_eval, zero_shot
from moeprune.loading import load_model, load_tokenizer
from moeprune.options import EvalSettings
from moeprune.planning.mask import ExpertMask, LayerMask
from moeprune.surgery import masked


def random_mask(model, retain: float, seed: int) -> ExpertMask:
    layers = moe_layers(model)
    n = layers[0].num_experts
    k = max(int(retain * n), 1)
    rng = random.Random(seed)
    kept = {layer.index: LayerMask(kept=sorted(rng.sample(range(n), k))) for layer in layers}
    return ExpertMask("bench", "random", retain, n, k, kept, seed=seed)


def run_cell(model, tok, mask: ExpertMask | None, args: argparse.Namespace) -> tuple[float, dict]:
    settings = EvalSettings(tasks=args.tasks, limit=args.limit, eval_batch_size=args.batch_size)
    start = time.perf_counter()
    if mask is None:
        result = zero_shot(model, tok, settings)
    else:
        with masked(model, mask):
            result = zero_shot(model, tok, settings)
    return time.perf_counter() - start, result["tasks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--tasks", default="bundled")
    parser.add_argument("--limit", type=int, default=20, help="documents per task")
    parser.add_argument("--cells", type=int, default=4, help="cells: dense, then random masks at retain 0.5")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (fresh grid, reused grid); medians")
    parser.add_argument("--batch-size", default="32")
    args = parser.parse_args()

    model = load_model(args.model, dtype="auto", device="cpu")
    tok = load_tokenizer(args.model)
    masks = [None, *(random_mask(model, 0.5, seed) for seed in range(args.cells - 1))]
    fresh: list[list[float]] = [[] for _ in masks]
    reused: list[list[float]] = [[] for _ in masks]
    same = True
    for _ in range(args.rounds):
        fresh_tasks = []
        for i, mask in enumerate(masks):
            seconds, tasks = run_cell(model, tok, mask, args)
            fresh[i].append(seconds)
            fresh_tasks.append(tasks)
        with reuse_lm_eval():
            for i, mask in enumerate(masks):
                seconds, tasks = run_cell(model, tok, mask, args)
                reused[i].append(seconds)
                same &= tasks == fresh_tasks[i]
    print_table(args, [statistics.median(t) for t in fresh], [statistics.median(t) for t in reused], same)


def print_table(args: argparse.Namespace, fresh: list[float], reused: list[float], same: bool) -> None:
    print(f"\nmodel {args.model}, tasks {args.tasks}, limit {args.limit}, batch size {args.batch_size}\n")
    print("| cell | fresh s | reused s | saved s |")
    print("|---|---|---|---|")
    for i, (f, r) in enumerate(zip(fresh, reused, strict=True)):
        print(f"| {'dense' if i == 0 else f'random-0.50-seed{i - 1}'} | {f:.2f} | {r:.2f} | {f - r:.2f} |")
    later = [f - r for f, r in zip(fresh[1:], reused[1:], strict=True)]
    print(f"\nmedian saving per cell after the first: {statistics.median(later):.2f} s "
          f"(first cell: {fresh[0] - reused[0]:.2f} s, it builds the reused objects)")
    print(f"identical metrics in every cell: {same}")


if __name__ == "__main__":
    main()
