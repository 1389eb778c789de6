"""How far greedy and greedy+swap land from the exact expert-sparsity optimum, and how long they take.

For N = 8, 12, 16 experts and K = N/4, N/2, 3N/4 it builds each MoE layer's reconstruction problem
(cached logits + Gram, see moeprune.reconstruction.loss), restricts it to the first N experts (an
N-expert MoE with the same activations), and compares the three searches. Relative gap =
loss / exact loss - 1, over layers. With the bundled testbed model (32 experts, top-4) it uses its
real activations on the bundled web corpus and also times greedy+swap at N=32, K=8/16/24; without
it, tiny random Qwen1.5-MoE-shaped models (top-2) on random tokens.

    python benchmarks/reconstruction_gap.py [--source auto|bundled|random] [--windows 16 --seq-len 64 --seeds 3]

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from moeprune.arch.routing import route
from moeprune.arch.view import moe_layers
from moeprune.reconstruction import LayerProblem, WorkDir, capture_moe_inputs
from moeprune.reconstruction.search import exact_search, greedy_elimination, greedy_swap_search


def restrict(problem: LayerProblem, n: int) -> LayerProblem:
    """The same layer as if it had only experts 0..n-1: logits, bias, Gram sliced, dense routing redone."""
    ids = torch.arange(n)
    logits = problem.logits[:, ids]
    bias = None if problem.bias is None else problem.bias[ids]
    gram = problem.gram[:, ids][:, :, ids].contiguous()
    index, weights = route(problem.spec, problem.config, logits, bias=bias)
    rows = torch.arange(gram.shape[0])[:, None, None]
    energy = torch.einsum(
        "ti,tij,tj->t", weights.double(), gram[rows, index[:, :, None], index[:, None, :]].double(), weights.double()
    )
    return replace(
        problem, logits=logits, bias=bias, gram=gram, dense_index=index, dense_weights=weights, dense_energy=energy
    )


def load_problems(args: argparse.Namespace) -> tuple[str, list[LayerProblem]]:
    problems = []
    for seed in range(args.seeds):
        model, tokens, label = _model_and_tokens(args, seed)
        with tempfile.TemporaryDirectory() as tmp:
            capture_moe_inputs(model, tokens, tmp, "bench", batch_size=4, progress=False)
            work = WorkDir(tmp, "bench")
            problems += [
                LayerProblem.build(layer, model.config, work.load_layer(layer.index)) for layer in moe_layers(model)
            ]
        if "bundled" in label:
            break  # one trained model; seeds only vary the random ones
    return label, problems


def _model_and_tokens(args: argparse.Namespace, seed: int):
    from moeprune.bundled import bundled_model_path

    windows, seq_len = args.windows, args.seq_len
    bundled = (bundled_model_path() / "config.json").exists()
    if args.source == "bundled" or (args.source == "auto" and bundled):
        from moeprune.bundled import read_bundled_corpus
        from moeprune.loading import load_model, load_tokenizer

        model, tokenizer = load_model("bundled", dtype="float32"), load_tokenizer("bundled")
        ids = tokenizer("\n\n".join(read_bundled_corpus("web", "train")[:400]))["input_ids"]
        tokens = torch.tensor(ids[: windows * seq_len]).view(windows, seq_len)
        return model, tokens, f"bundled testbed model, bundled web corpus, {tokens.numel()} tokens"
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import build_model

    model = build_model("qwen2_moe", num_experts=16, top_k=2, seed=seed)
    with torch.no_grad():  # tiny_models makes routing very decisive (easy); soften it towards a trained model
        for layer in moe_layers(model):
            layer.router.weight.mul_(args.router_scale)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, model.config.vocab_size, (windows, seq_len), generator=generator)
    return model, tokens, (f"tiny random qwen2_moe models (top-2, hidden 32, router weights x{args.router_scale}), "
                           f"random tokens, {tokens.numel()} tokens")


def _run_all(search, problems: list[LayerProblem], k: int) -> tuple[list, list[float]]:
    """(results, seconds) of ``search(problem, k)`` on every layer."""
    results, seconds = [], []
    for problem in problems:
        start = time.perf_counter()
        results.append(search(problem, k))
        seconds.append(time.perf_counter() - start)
    return results, seconds


def gap_table(problems: list[LayerProblem], sizes: list[int]) -> list[str]:
    rows = [
        "| N | K | masks | mean gap greedy | max gap greedy | mean gap greedy+swap | max gap greedy+swap "
        "| s/layer exact | s/layer greedy | s/layer greedy+swap |",
        "|" + "---|" * 10,
    ]
    top_k = problems[0].dense_index.shape[1]
    for n in sizes:
        restricted = [restrict(p, n) for p in problems]
        for k in sorted({max(top_k, n // 4), n // 2, 3 * n // 4}):
            exact, t_exact = _run_all(exact_search, restricted, k)
            greedy, t_greedy = _run_all(greedy_elimination, restricted, k)
            swap, t_swap = _run_all(greedy_swap_search, restricted, k)
            g = [r[1] / e.loss - 1 for r, e in zip(greedy, exact, strict=True)]
            s = [r.loss / e.loss - 1 for r, e in zip(swap, exact, strict=True)]
            rows.append(
                f"| {n} | {k} | {exact[0].evaluations} | {statistics.mean(g):.2%} | {max(g):.2%} | "
                f"{statistics.mean(s):.2%} | {max(s):.2%} | {statistics.mean(t_exact):.3f} | "
                f"{statistics.mean(t_greedy):.3f} | {statistics.mean(t_swap):.3f} |"
            )
    return rows


def timing_table(problems: list[LayerProblem], ks: list[int]) -> list[str]:
    rows = ["| N | K | evaluations | swaps | s/layer greedy+swap |", "|---|---|---|---|---|"]
    for k in ks:
        results, times = _run_all(greedy_swap_search, problems, k)
        rows.append(
            f"| {problems[0].num_experts} | {k} | {statistics.mean(r.evaluations for r in results):.0f} | "
            f"{statistics.mean(r.swaps for r in results):.1f} | {statistics.mean(times):.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["auto", "bundled", "random"], default="auto")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3, help="random models (2 MoE layers each)")
    parser.add_argument("--router-scale", type=float, default=0.25, help="random models: router weight factor")
    args = parser.parse_args()
    label, problems = load_problems(args)
    print(f"Source: {label}; {len(problems)} MoE layers; torch threads {torch.get_num_threads()}\n")
    print("\n".join(gap_table(problems, [8, 12, 16])))
    if problems[0].num_experts == 32:
        print()
        print("\n".join(timing_table(problems, [8, 16, 24])))


if __name__ == "__main__":
    main()
