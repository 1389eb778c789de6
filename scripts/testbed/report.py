"""Measure the bundled testbed and write ``src/moeprune/bundled/testbed.json``.

Usage::

    python scripts/testbed/report.py [--model DIR] [--max-windows N] [--out FILE]

Per domain (calibration corpora ``wiki``, ``web``; held-out domains ``bible``, ``man``,
``glossary``, trained on but never calibrated on; ``devil``, never trained on):

* held-out perplexity of the model on the test split: the split's documents joined by
  EOS, cut into non-overlapping windows of 256 predicted tokens, ppl = exp(mean NLL);
* unigram perplexity under the same tokenizer on the same predicted tokens (unigram
  estimated on the train split with add-one smoothing); requirement ppl <= 0.4 x unigram;
* per MoE layer the entropy (nats) of the distribution of top-k routing counts,
  compared with ln(N) (requirement >= 0.7 ln N);

and per layer the overlap |top-K(wiki) & top-K(web)| / K of the experts most often
routed to on the test splits, for K = N/4, N/2, 3N/4, next to the same overlap between one
corpus's test and validation splits (a baseline: how stable the ranking is within a corpus).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from common import BUNDLED, CORPORA, HELDOUT_DOMAINS, MODEL_DIR, UNSEEN_DOMAINS, read_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

SEQ_LEN = 256
BATCH = 16
SPLITS = ("train", "validation", "test")
DOMAINS = CORPORA + HELDOUT_DOMAINS + UNSEEN_DOMAINS
ROLES = {**dict.fromkeys(CORPORA, "calibration"), **dict.fromkeys(HELDOUT_DOMAINS, "held-out")}
ROLES |= dict.fromkeys(UNSEEN_DOMAINS, "unseen")
PPL_BOUND = 0.4  # model ppl / unigram ppl on the domains the model was trained on
UNSEEN_PPL_BOUND = 0.35  # ... and on the never-trained domain


def token_stream(tokenizer: AutoTokenizer, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (inputs, labels) windows: every label token is predicted once."""
    n = (len(stream) - 1) // SEQ_LEN
    if max_windows:
        n = min(n, max_windows)
    inputs = stream[: n * SEQ_LEN].view(n, SEQ_LEN)
    labels = stream[1 : n * SEQ_LEN + 1].view(n, SEQ_LEN)
    return inputs, labels


@torch.no_grad()
def model_pass(model: PreTrainedModel, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean NLL over all label tokens and per-layer top-k routing counts [layers, N]."""
    top_k = model.config.num_experts_per_tok
    n_experts = model.config.num_experts
    nll_sum, counts = 0.0, None
    for i in range(0, len(inputs), BATCH):
        out = model(inputs[i : i + BATCH], output_router_logits=True)
        nll_sum += float(
            F.cross_entropy(out.logits.flatten(0, 1).float(), labels[i : i + BATCH].flatten(), reduction="sum")
        )
        batch_counts = torch.stack(
            [torch.bincount(r.topk(top_k, dim=-1).indices.flatten(), minlength=n_experts) for r in out.router_logits]
        )
        counts = batch_counts if counts is None else counts + batch_counts
    return nll_sum / labels.numel(), counts


def unigram_ppl(train: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> float:
    """Add-one smoothed unigram (fit on train tokens) perplexity on the label tokens."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[labels.flatten()].mean()))


def entropy(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """|top-k experts of a & top-k experts of b| / k (ties broken by expert index)."""
    top_a = set(a.topk(k).indices.tolist())
    top_b = set(b.topk(k).indices.tolist())
    return len(top_a & top_b) / k


def local_text(model: PreTrainedModel, tokenizer: AutoTokenizer, path: Path) -> dict[str, object]:
    """Score a local text file that is not shipped (e.g. gensim's news sample, no clear licence).

    One document per non-empty line; the first half of the documents fits the unigram, the
    second half is scored by both, exactly like a train/test split of a bundled domain.
    """
    docs = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    half = len(docs) // 2
    train = token_stream(tokenizer, docs[:half])
    inputs, labels = windows(token_stream(tokenizer, docs[half:]), 0)
    nll, _ = model_pass(model, inputs, labels)
    uni = unigram_ppl(train, labels, len(tokenizer))
    in_sample = unigram_ppl(labels.flatten(), labels, len(tokenizer))  # fit on the scored tokens themselves
    return {
        "file": path.name,
        "unigram_ppl_in_sample": round(in_sample, 3),
        "ppl_ratio_in_sample": round(math.exp(nll) / in_sample, 4),
        "role": "unseen (local, not shipped)",
        "test_tokens_scored": labels.numel(),
        "model_ppl": round(math.exp(nll), 3),
        "unigram_ppl": round(uni, 3),
        "ppl_ratio": round(math.exp(nll) / uni, 4),
    }


def corpus_sizes(tokenizer: AutoTokenizer) -> dict[str, dict[str, dict[str, int]]]:
    sizes: dict[str, dict[str, dict[str, int]]] = {}
    for name in DOMAINS:
        sizes[name] = {}
        for split in SPLITS:
            docs = read_corpus(name, split)
            sizes[name][split] = {
                "documents": len(docs),
                "bytes": sum(len(d.encode()) for d in docs),
                "tokens": len(token_stream(tokenizer, docs)),  # includes one EOS per document
            }
    return sizes


def measure(model_dir: Path, max_windows: int, texts: dict[str, Path] | None = None) -> dict[str, object]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    ln_n = math.log(cfg.num_experts)
    per_corpus: dict[str, dict[str, object]] = {}
    counts: dict[str, torch.Tensor] = {}
    for name in DOMAINS:
        bound = UNSEEN_PPL_BOUND if name in UNSEEN_DOMAINS else PPL_BOUND
        train = token_stream(tokenizer, read_corpus(name, "train"))
        inputs, labels = windows(token_stream(tokenizer, read_corpus(name, "test")), max_windows)
        nll, counts[name] = model_pass(model, inputs, labels)
        ppl, uni = math.exp(nll), unigram_ppl(train, labels, len(tokenizer))
        ent = [entropy(c) for c in counts[name]]
        per_corpus[name] = {
            "role": ROLES[name],
            "test_windows": len(inputs),
            "test_tokens_scored": labels.numel(),
            "model_ppl": round(ppl, 3),
            "unigram_ppl": round(uni, 3),
            "ppl_ratio": round(ppl / uni, 4),
            "ppl_bound": bound,
            "ppl_bound_ok": ppl <= bound * uni,
            "routing_entropy": [round(e, 4) for e in ent],
            "routing_entropy_over_ln_n": [round(e / ln_n, 4) for e in ent],
            "entropy_bound_ok": all(e >= 0.7 * ln_n for e in ent),
            "routing_counts": counts[name].tolist(),
        }
    n = cfg.num_experts
    ks = (n // 4, n // 2, 3 * n // 4)
    # Baseline for reading the cross-corpus overlaps: the same corpus's test vs validation
    # split. Near-uniform routing makes frequency rankings partly noise; this shows how much.
    same_corpus = {}
    for name in CORPORA:
        v_inputs, v_labels = windows(token_stream(tokenizer, read_corpus(name, "validation")), max_windows)
        _, v_counts = model_pass(model, v_inputs, v_labels)
        same_corpus[name] = {
            f"K={k}": [round(top_overlap(counts[name][i], v_counts[i], k), 4) for i in range(len(v_counts))] for k in ks
        }
    overlaps = {
        f"K={k}": [
            round(top_overlap(counts["wiki"][layer], counts["web"][layer], k), 4)
            for layer in range(len(counts["wiki"]))
        ]
        for k in ks
    }
    return {
        "model": {
            "model_type": cfg.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "safetensors_bytes": (model_dir / "model.safetensors").stat().st_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "num_experts": n,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
            "norm_topk_prob": cfg.norm_topk_prob,
            "vocab_size": cfg.vocab_size,
        },
        "ln_num_experts": round(ln_n, 4),
        "seq_len": SEQ_LEN,
        "corpora": per_corpus,
        "top_expert_overlap_wiki_web": overlaps,
        "top_expert_overlap_test_vs_validation": same_corpus,
        "corpus_sizes": corpus_sizes(tokenizer),
        "local_texts": {name: local_text(model, tokenizer, path) for name, path in (texts or {}).items()},
    }


def print_report(r: dict) -> None:
    m = r["model"]
    print(f"ln N = {r['ln_num_experts']}  ({m['num_experts']} experts, top-{m['num_experts_per_tok']})")
    for name, c in r["corpora"].items():
        print(
            f"{name:5s} ppl {c['model_ppl']:8.2f}  unigram {c['unigram_ppl']:8.2f}"
            f"  ratio {c['ppl_ratio']:.3f} (<= {c['ppl_bound']}: {c['ppl_bound_ok']})"
            f"  entropy/lnN {c['routing_entropy_over_ln_n']}"
        )
    for name, c in r.get("local_texts", {}).items():
        print(
            f"{name} ({c['file']}) ppl {c['model_ppl']:8.2f}  unigram {c['unigram_ppl']:8.2f}"
            f"  ratio {c['ppl_ratio']:.3f}"
        )
    for k, v in r["top_expert_overlap_wiki_web"].items():
        print(f"top-expert overlap wiki/web {k}: {v}")
    for name, per_k in r["top_expert_overlap_test_vs_validation"].items():
        for k, v in per_k.items():
            print(f"top-expert overlap {name} test/validation {k}: {v}")


def markdown_tables(r: dict) -> str:
    """The report as markdown tables (pasted into docs/testbed.md)."""
    m = r["model"]
    lines = ["| corpus | split | documents | bytes | tokens |", "|---|---|---:|---:|---:|"]
    for name, splits in r["corpus_sizes"].items():
        for split, s in splits.items():
            lines.append(f"| {name} | {split} | {s['documents']} | {s['bytes']:,} | {s['tokens']:,} |")
    lines += ["", "| domain | role | test tokens scored | model ppl | unigram ppl | ratio | required |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for name, c in r["corpora"].items():
        lines.append(
            f"| {name} | {c['role']} | {c['test_tokens_scored']:,} | {c['model_ppl']:.1f} | {c['unigram_ppl']:.1f}"
            f" | {c['ppl_ratio']:.3f} | <= {c['ppl_bound']} |"
        )
    n_layers = m["num_hidden_layers"]
    header = " | ".join(f"layer {i}" for i in range(n_layers))
    lines += ["", f"| routing entropy / ln N (ln {m['num_experts']} = {r['ln_num_experts']}) | {header} |"]
    lines.append("|---|" + "---:|" * n_layers)
    for name, c in r["corpora"].items():
        vals = " | ".join(f"{v:.3f}" for v in c["routing_entropy_over_ln_n"])
        lines.append(f"| {name} | {vals} |")
    lines += ["", f"| top-K expert overlap | {header} |", "|---|" + "---:|" * n_layers]
    for k, v in r["top_expert_overlap_wiki_web"].items():
        lines.append(f"| wiki vs web, {k} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
    for name, per_k in r["top_expert_overlap_test_vs_validation"].items():
        for k, v in per_k.items():
            lines.append(f"| {name} test vs validation, {k} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--max-windows", type=int, default=0, help="0: the whole test split")
    ap.add_argument("--out", type=Path, default=BUNDLED / "testbed.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="also score a local text file (not shipped; e.g. a news sample), see local_text()",
    )
    ap.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = dict((name, Path(path)) for name, path in (t.split("=", 1) for t in args.text))
    report = measure(args.model, args.max_windows, texts)
    training = args.model / "training.json" if (args.model / "training.json").exists() else BUNDLED / "training.json"
    if training.exists():
        report["training"] = json.loads(training.read_text())
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    if args.markdown:
        print(markdown_tables(report))


if __name__ == "__main__":
    main()
