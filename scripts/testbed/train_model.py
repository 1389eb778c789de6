"""Train the bundled Qwen1.5-MoE-shaped testbed model on both corpora (CPU, time-boxed).

Usage::

    python scripts/testbed/train_model.py [--max-minutes 25] [--steps N] [--out DIR]

Architecture: ``qwen2_moe`` with 4 layers, hidden 256, 32 routed experts (top-4, no
top-k renormalisation, like Qwen1.5-MoE) plus a sigmoid-gated shared expert, tied
embeddings; about 9.2M parameters, saved in fp16 (< 20 MB).

Loss: next-token cross-entropy + ``--balance-coef`` x the mean over layers of a
Switch-style load-balancing loss computed *per layer* (N * sum_e f_e * P_e).
transformers' built-in aux loss pools the counts over layers, which hides per-layer
imbalance, so it is not used.

Reproducibility: initialisation and data order are seeded. With ``--steps N`` the
learning-rate schedule depends only on the step, so a run is deterministic up to float
non-associativity; without it the cosine schedule is stretched over ``--max-minutes`` of
wall time, so how many steps run depends on machine speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import BUNDLED, MODEL_DIR, REPO, TRAIN_DOMAINS, UNSEEN_DOMAINS, read_corpus
from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

from moeprune.surgery.tokenizer_files import make_portable

log = logging.getLogger("train_model")


def build_config(vocab_size: int, eos_id: int) -> Qwen2MoeConfig:
    return Qwen2MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,  # unused: every layer is sparse (decoder_sparse_step=1)
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        num_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=256,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=True,
        output_router_logits=False,
        router_aux_loss_coef=0.0,  # we use our own per-layer loss (see module doc)
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def tokenize_split(tokenizer: AutoTokenizer, name: str, split: str) -> torch.Tensor:
    """All documents of a split as one token stream, documents joined by EOS."""
    ids: list[int] = []
    for doc in read_corpus(name, split):
        ids.extend(tokenizer(doc)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Batcher:
    """Random windows, the domains taking turns row by row (so all are learned evenly)."""

    streams: list[torch.Tensor]
    seq_len: int
    batch_size: int
    generator: torch.Generator
    rows_drawn: int = 0

    def next(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch_size):
            stream = self.streams[self.rows_drawn % len(self.streams)]
            self.rows_drawn += 1
            hi = len(stream) - self.seq_len - 1
            start = int(torch.randint(0, hi, (1,), generator=self.generator))
            rows.append(stream[start : start + self.seq_len + 1])
        return torch.stack(rows)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Mean over layers of N * sum_e f_e * P_e (1.0 when routing is perfectly uniform)."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # [tokens, N]
        n = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        frac = F.one_hot(chosen, n).sum(dim=1).float().mean(dim=0) / top_k  # f_e
        losses.append(n * (frac * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def routing_entropy(router_logits: tuple[torch.Tensor, ...], top_k: int) -> list[float]:
    """Per layer entropy (nats) of the distribution of top-k routing counts."""
    out = []
    for logits in router_logits:
        counts = torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=logits.shape[-1])
        p = counts.float() / counts.sum()
        out.append(float(-(p[p > 0] * p[p > 0].log()).sum()))
    return out


def lr_at(progress: float, step: int, args: argparse.Namespace) -> float:
    """Linear warmup (by step) then cosine decay to 10% (by progress in [0, 1])."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def evaluate(model: Qwen2MoeForCausalLM, streams: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    """Validation cross-entropy on the first 16 non-overlapping windows per corpus."""
    model.eval()
    out = {}
    for name, stream in streams.items():
        n = min(16, (len(stream) - 1) // seq_len)
        x = stream[: n * seq_len + 1]
        inputs = x[:-1].view(n, seq_len)
        labels = x[1:].view(n, seq_len)
        logits = model(inputs).logits
        out[name] = float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()))
    model.train()
    return out


def save_fp16(model: Qwen2MoeForCausalLM, tokenizer: AutoTokenizer, out: Path) -> None:
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_portable(out)  # readable by transformers 4.x too


def train(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    train_streams = [tokenize_split(tokenizer, name, "train") for name in args.domains]
    # Validation also tracks the never-trained domains (the "unseen kind" of text).
    val_streams = {name: tokenize_split(tokenizer, name, "validation") for name in args.domains + UNSEEN_DOMAINS}
    log.info("train tokens per domain: %s", {n: len(s) for n, s in zip(args.domains, train_streams, strict=True)})

    config = build_config(len(tokenizer), tokenizer.eos_token_id)
    model = Qwen2MoeForCausalLM(config)
    if args.init:  # continue from an earlier model (same architecture and tokenizer)
        init = Qwen2MoeForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        log.info("initialised from %s", args.init)
    log.info("parameters: %d", sum(p.numel() for p in model.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    batcher = Batcher(train_streams, args.seq_len, args.batch_size, torch.Generator().manual_seed(args.seed))
    top_k = config.num_experts_per_tok

    start = last_ckpt = time.monotonic()
    budget = args.max_minutes * 60
    step, ce_ema = 0, None
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= budget or (args.steps and step >= args.steps):
            break
        progress = step / args.steps if args.steps else elapsed / budget
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, step, args)
        batch = batcher.next()
        out = model(batch[:, :-1], output_router_logits=True)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        balance = per_layer_balance_loss(out.router_logits, top_k)
        loss = ce + args.balance_coef * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ce_val = ce.item()
        ce_ema = ce_val if ce_ema is None else 0.95 * ce_ema + 0.05 * ce_val
        if step % args.log_every == 0:
            ent = routing_entropy(out.router_logits, top_k)
            tok_s = step * batch[:, :-1].numel() / (time.monotonic() - start)
            log.info(
                "step %d  ce %.3f (ema %.3f)  balance %.3f  lr %.2e  entropy/lnN %s  %.0f tok/s",
                step, ce_val, ce_ema, float(balance), opt.param_groups[0]["lr"],
                [round(e / math.log(config.num_experts), 3) for e in ent], tok_s,
            )  # fmt: skip
        if time.monotonic() - last_ckpt >= args.ckpt_minutes * 60:
            save_fp16(model, tokenizer, args.out)
            summary = _summary(args, model, step, start, ce_ema, evaluate(model, val_streams, args.seq_len))
            args.summary.write_text(json.dumps(summary, indent=2) + "\n")  # an early stop keeps it
            log.info("checkpoint at step %d; val ce %s", step, summary["val_ce"])
            last_ckpt = time.monotonic()

    save_fp16(model, tokenizer, args.out)
    summary = _summary(args, model, step, start, ce_ema, evaluate(model, val_streams, args.seq_len))
    log.info("done: %s", summary)
    return summary


def _summary(
    args: argparse.Namespace,
    model: Qwen2MoeForCausalLM,
    step: int,
    start: float,
    ce_ema: float | None,
    val: dict[str, float],
) -> dict[str, object]:
    return {
        "steps": step,
        "tokens": step * args.batch_size * args.seq_len,
        "minutes": round((time.monotonic() - start) / 60, 2),
        "final_train_ce_ema": round(ce_ema or float("nan"), 4),
        "val_ce": {k: round(v, 4) for k, v in val.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": {k: _portable(v) for k, v in vars(args).items()},
    }


def _portable(value: object) -> object:
    """Paths inside the repository are recorded relative to it (the summary is shipped)."""
    if isinstance(value, Path):
        return str(value.relative_to(REPO)) if value.is_relative_to(REPO) else str(value)
    return value


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=MODEL_DIR, help="the model (and tokenizer) is saved here")
    ap.add_argument("--tokenizer", type=Path, default=MODEL_DIR, help="train_tokenizer.py's output")
    ap.add_argument("--init", type=Path, default=None, help="start from this model's weights")
    ap.add_argument("--domains", nargs="+", default=list(TRAIN_DOMAINS), help="corpora whose train split is used")
    ap.add_argument("--max-minutes", type=float, default=25.0)
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (0: time-boxed schedule)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)  # 16 x 256 = 4096 tokens per step
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--balance-coef", type=float, default=0.05)
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--log-file", type=Path, default=Path("/tmp/moeprune_train_model.log"))
    ap.add_argument("--summary", type=Path, default=BUNDLED / "training.json")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.domains = tuple(args.domains)
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(args.log_file)],
    )
    torch.set_num_threads(args.threads)
    summary = train(args)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
