"""How far greedy and greedy+swap land from the exact expert-sparsity optimum, and how long they take.

For N = 8, 12, 16 experts and K = N/4, N/2, 3N/4 it builds each MoE layer's reconstruction problem
(cached logits + Gram, see moeprune.reconstruction.loss), restricts it to the first N experts (an
N-expert MoE with the same activations), and compares the three searches. Relative gap =
loss / exact loss - 1, over layers. With the bundled testbed model (32 experts, top-4) it uses its
real activations on the bundled web corpus and also times greedy+swap at N=32, K=8/16/24; without
it, tiny random Qwen1.5-MoE-shaped models (top-2) on random tokens.

    python benchmarks/reconstruction_gap.py [--source auto|bundled|random] [--windows 16 --seq-len 64 --seeds 3]

``--large`` instead measures the search where exact enumeration is impossible (N = 32 on the bundled
model's real activations, N = 60 and 64 on synthetic layers shaped like Qwen1.5-MoE and
DeepSeek-MoE): greedy+swap against a stronger search, whose best loss bounds the optimum from
above (so greedy+swap's gap to it is a lower bound on its gap to the optimum):

- beam elimination: backward elimination keeping the ``--beam`` best distinct sets of every size,
  then swap refinement of the best ``--refine`` of them at each K;
- iterated local search: ``--kicks`` times, from the best mask so far, three random swaps then swap
  refinement (kept when better);
- random restarts: ``--restarts`` uniformly random masks, each swap-refined.

It also times one shared elimination path for all K against a separate greedy run per K.

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
from moeprune.reconstruction.search import (
    elimination_path,
    exact_search,
    greedy_elimination,
    greedy_swap_search,
    search_layer_many,
    swap_refinement,
)

# Dense top-k routing mass the synthetic layers are tuned to: the bundled trained model (32 experts,
# top-4) routes 0.36-0.66 of the softmax mass to its top-4 over its four MoE layers.
TARGET_TOPK_MASS = 0.45


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


# ------------------------------------------------------------------------------ N = 32-64: stronger searches
def synthetic_problems(num_experts: int, top_k: int, tokens: int, seed: int = 0) -> list[LayerProblem]:
    """Both MoE layers of a random Qwen2-MoE-layout model (hidden 128 > N, softmax, no renormalisation:
    Qwen1.5-MoE's and DeepSeek-MoE's rule), router scaled to :data:`TARGET_TOPK_MASS`."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=256,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    seq_len = 64
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (tokens // seq_len, seq_len), generator=generator)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        capture_moe_inputs(model, ids, tmp, "bench", progress=False)
        work = WorkDir(tmp, "bench")
        for layer in moe_layers(model):
            hidden = work.load_layer(layer.index)
            with torch.no_grad():
                layer.router.weight.mul_(_router_factor(layer, config, hidden))
            problems.append(LayerProblem.build(layer, config, hidden))
    return problems


def _router_factor(layer, config, hidden: torch.Tensor) -> float:
    """The router weight factor giving a dense top-k mass of TARGET_TOPK_MASS (bisection: it grows with the factor)."""
    from moeprune.arch.routing import router_logits

    logits = router_logits(layer, hidden)
    low, high = 1e-3, 1e4
    for _ in range(60):
        mid = (low * high) ** 0.5
        mass = float(route(layer.spec, config, logits * mid)[1].sum(-1).mean())
        low, high = (mid, high) if mass < TARGET_TOPK_MASS else (low, mid)
    return (low * high) ** 0.5


def stitched_problems(args: argparse.Namespace, n: int) -> list[LayerProblem]:
    """N-expert layers made of trained experts: the bundled model's MoE layers 2i and 2i+1 side by side
    (routers and experts both on layer 2i's captured inputs), first ``n`` of the 64 experts, top-4."""
    from dataclasses import replace

    from moeprune.arch.routing import router_logits

    model, tokens, _ = _model_and_tokens(argparse.Namespace(**{**vars(args), "source": "bundled"}), 0)
    layers = moe_layers(model)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        capture_moe_inputs(model, tokens, tmp, "bench", batch_size=4, progress=False)
        work = WorkDir(tmp, "bench")
        for first, second in zip(layers[::2], layers[1::2], strict=True):
            hidden = work.load_layer(first.index)
            base = LayerProblem.build(first, model.config, hidden)
            with torch.no_grad():
                logits = torch.cat([router_logits(first, hidden), router_logits(second, hidden)], dim=1)
                gram = _joint_gram(first, second, hidden)
            problems.append(restrict(replace(base, logits=logits, gram=gram), n))
    return problems


def _joint_gram(first, second, hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``[T, 2N, 2N]`` Gram of both layers' experts on the same inputs."""
    tokens, n = hidden.shape[0], first.num_experts + second.num_experts
    gram = torch.empty(tokens, n, n)
    for start in range(0, tokens, chunk):
        x = hidden[start : start + chunk]
        out = torch.stack([layer.expert_forward(e, x).float() for layer in (first, second)
                           for e in range(layer.num_experts)], dim=1)
        gram[start : start + chunk] = torch.bmm(out, out.transpose(1, 2))
    return gram


def beam_elimination(problem: LayerProblem, ks: list[int], width: int) -> dict[int, list[tuple[float, list[int]]]]:
    """Backward elimination keeping the ``width`` best distinct sets of each size: ``{K: [(loss, mask)]}``."""
    beam = [(0.0, list(range(problem.num_experts)))]
    found = {}
    while len(beam[0][1]) > min(ks):
        candidates = sorted({tuple(x for x in mask if x != e) for _, mask in beam for e in mask})
        losses = problem.losses([list(c) for c in candidates]).tolist()
        beam = sorted(zip(losses, map(list, candidates), strict=True))[:width]
        if len(beam[0][1]) in ks:
            found[len(beam[0][1])] = beam
    return found


def _refine(problem: LayerProblem, mask: list[int]) -> tuple[float, list[int]]:
    mask, loss, _, _ = swap_refinement(problem, mask, problem.loss(mask), max_passes=10_000)
    return loss, mask


def _kick(mask: list[int], n: int, swaps: int, rng) -> list[int]:
    kept = set(mask)
    for _ in range(swaps):
        kept.remove(rng.choice(sorted(kept)))
        kept.add(rng.choice(sorted(set(range(n)) - kept)))
    return sorted(kept)


def strong_search(problem: LayerProblem, ks: list[int], args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """Per K: losses of greedy+swap and of each stronger search, and the best found by any of them."""
    import random

    rng = random.Random(0)
    greedy = search_layer_many(problem, ks, exact_limit=0)
    beams = beam_elimination(problem, ks, args.beam)
    out = {}
    for k in ks:
        beam_best = min(_refine(problem, mask) for _, mask in beams[k][: args.refine])
        best = min(beam_best, (greedy[k].loss, greedy[k].kept))
        for _ in range(args.kicks):
            best = min(best, _refine(problem, _kick(best[1], problem.num_experts, 3, rng)))
        ils = best[0]
        restarts = min(_refine(problem, sorted(rng.sample(range(problem.num_experts), k)))
                       for _ in range(args.restarts))
        best = min(best, restarts)
        out[k] = {"greedy+swap": greedy[k].loss, "beam": beam_best[0], "ils": ils, "restarts": restarts[0],
                  "best": best[0]}
    return out


def strong_table(label: str, problems: list[LayerProblem], ks: list[int], args: argparse.Namespace) -> list[str]:
    rows = [
        f"{label}",
        "",
        "| N | top-k | K | layers | greedy+swap vs best: mean | max | beam+swap vs best: max "
        "| random restarts vs best: max | layers where greedy+swap is best | s/layer strong search |",
        "|" + "---|" * 10,
    ]
    per_layer, seconds = [], []
    for problem in problems:
        start = time.perf_counter()
        per_layer.append(strong_search(problem, ks, args))
        seconds.append(time.perf_counter() - start)
    for k in ks:
        gap = [r[k]["greedy+swap"] / r[k]["best"] - 1 for r in per_layer]
        beam = [r[k]["beam"] / r[k]["best"] - 1 for r in per_layer]
        restarts = [r[k]["restarts"] / r[k]["best"] - 1 for r in per_layer]
        rows.append(
            f"| {problems[0].num_experts} | {problems[0].dense_index.shape[1]} | {k} | {len(problems)} | "
            f"{statistics.mean(gap):.2%} | {max(gap):.2%} | {max(beam):.2%} | {max(restarts):.2%} | "
            f"{sum(g <= 1e-12 for g in gap)}/{len(gap)} | {statistics.mean(seconds):.0f} |"
        )
    return rows


def shared_path_table(problems: list[LayerProblem], ks: list[int], repeats: int = 3) -> str:
    """One row: greedy+swap for every K run separately vs on one shared elimination path: mask evaluations
    (exact counts) and seconds per layer (best of ``repeats``, the two alternating, against load noise)."""
    separate_s, shared_s, separate_n, shared_n = [], [], 0, 0
    for problem in problems:
        times = {"separate": [], "shared": []}
        for _ in range(repeats):
            start = time.perf_counter()
            separate = [greedy_swap_search(problem, k) for k in ks]
            times["separate"].append(time.perf_counter() - start)
            start = time.perf_counter()
            shared = search_layer_many(problem, ks, exact_limit=0)
            times["shared"].append(time.perf_counter() - start)
        assert [r.kept for r in separate] == [shared[k].kept for k in ks]
        separate_s.append(min(times["separate"]))
        shared_s.append(min(times["shared"]))
        path = elimination_path(problem, ks[0])
        separate_n += sum(r.evaluations for r in separate)
        shared_n += path[ks[0]][2] + sum(shared[k].evaluations - path[k][2] for k in ks)
    a, b = statistics.mean(separate_s), statistics.mean(shared_s)
    return (f"| {problems[0].num_experts} | {', '.join(map(str, ks))} | {separate_n / len(problems):.0f} | "
            f"{shared_n / len(problems):.0f} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


def large(args: argparse.Namespace) -> None:
    cases = []
    if args.source != "random":
        args.seeds = 1
        label, problems = load_problems(args)
        cases.append((f"Bundled model, real activations: {label}", problems))
    for n in args.stitched:
        cases.append((f"Bundled model's trained experts, two layers side by side (N={n}, top-4, real router "
                      f"logits), {args.windows * args.seq_len} tokens of the bundled web corpus",
                      stitched_problems(args, n)))
    for n, top_k in (map(int, size.split(":")) for size in args.synthetic):
        problems = synthetic_problems(n, top_k, args.windows * args.seq_len)
        cases.append((f"Synthetic N={n}, top-{top_k} (2 layers, {args.windows * args.seq_len} random tokens, "
                      f"dense top-k mass {TARGET_TOPK_MASS})", problems))
    print(f"beam {args.beam} (refine {args.refine}), {args.kicks} kicks, {args.restarts} restarts; "
          f"torch threads {torch.get_num_threads()}\n")
    timing = ["| N | K | evaluations/layer separate | evaluations/layer shared | s/layer separate | s/layer shared "
              "| speed-up |", "|" + "---|" * 7]
    for label, problems in cases:
        n = problems[0].num_experts
        ks = [n // 4, n // 2, 3 * n // 4]
        if not args.timing_only:
            print("\n".join(strong_table(label, problems, ks, args)), "\n", flush=True)
        timing.append(shared_path_table(problems, ks))
    print("\n".join(timing))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["auto", "bundled", "random"], default="auto")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3, help="random models (2 MoE layers each)")
    parser.add_argument("--router-scale", type=float, default=0.25, help="random models: router weight factor")
    parser.add_argument("--large", action="store_true", help="N = 32/60/64: greedy+swap vs stronger searches")
    parser.add_argument("--beam", type=int, default=8, help="--large: beam width")
    parser.add_argument("--refine", type=int, default=4, help="--large: beam members swap-refined per K")
    parser.add_argument("--kicks", type=int, default=8, help="--large: iterated-local-search kicks per K")
    parser.add_argument("--restarts", type=int, default=4, help="--large: random restarts per K")
    parser.add_argument("--synthetic", nargs="*", default=["60:4", "64:6"], help="--large: synthetic N:top-k")
    parser.add_argument("--stitched", type=int, nargs="*", default=[64], help="--large: stitched bundled N")
    parser.add_argument("--timing-only", action="store_true", help="--large: only time the shared path")
    args = parser.parse_args()
    if args.large:
        large(args)
        return
    label, problems = load_problems(args)
    print(f"Source: {label}; {len(problems)} MoE layers; torch threads {torch.get_num_threads()}\n")
    print("\n".join(gap_table(problems, [8, 12, 16])))
    if problems[0].num_experts == 32:
        print()
        print("\n".join(timing_table(problems, [8, 16, 24])))


if __name__ == "__main__":
    main()
