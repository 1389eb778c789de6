"""Router-only knowledge distillation (Router KD, arXiv 2603.02217): after pruning, train only the routing
parameters so that the pruned model's next-token distribution matches the dense model's.

One copy of the weights: the teacher is the loaded model with all its experts (outside ``masked``), the
student the same model inside ``surgery.masked(model, mask)``. What trains (:func:`routing_parameters`):
each MoE layer's router weight (its kept rows, after the mask), the router's bias where it has one, and a
shared-expert gate (Qwen's ``shared_expert_gate``). Those get float32 master copies, swapped into the model
(cast to its dtype) for each step's forward and backward; every other weight stays frozen in its dtype.
DeepSeek-V3's ``e_score_correction_bias`` is a buffer that only chooses experts (no gradient reaches it):
it is left as it is.

Loss: KL(dense || pruned) of the next-token distributions, averaged over every calibration token. The
teacher's targets are computed once per calibration set (:func:`teacher_targets`, kept on the CPU and
reusable across masks): the full log-probabilities when the vocabulary is at most FULL_VOCAB_LIMIT and they
fit in FULL_TARGET_BYTES, else
the top-k log-probabilities plus one "rest" bucket, and the KL is then that of the (k + 1)-bucket
distributions (a lower bound of the full KL).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.arch.view import decoder_layers, moe_layers
from moeprune.recovery.options import FULL_TARGET_BYTES, FULL_VOCAB_LIMIT, RecoveryOptions

log = logging.getLogger(__name__)

# Shared-expert gates that trains with the routers (Qwen2-MoE, Qwen1.5-MoE, ...).
SHARED_GATE = re.compile(r"(^|\.)shared_expert_gate$|(^|\.)shared_gate$")
# Student logits held at once (bytes, float32): micro-batches are cut so one fits.
LOGITS_BYTES = 1 << 30
CHECKPOINT_PARAMS = 200_000_000  # gradient checkpointing by default above this many parameters


@dataclass
class TeacherTargets:
    """The dense model's next-token distribution on ``windows [n, seq]`` (CPU).

    ``mode`` "full": ``logp [n, seq, V]``; "topk": ``logp [n, seq, k]`` at ``ids [n, seq, k]`` and ``rest
    [n, seq]`` the log of the probability outside the top k."""

    windows: torch.Tensor
    corpora: list[tuple[str, int, int]]  # (corpus, first window, end) in ``windows``
    mode: str
    logp: torch.Tensor
    ids: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    def slice(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"logp": self.logp[index]}
        if self.mode == "topk":
            out["ids"] = self.ids[index].long()
            out["rest"] = self.rest[index]
        return out

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "top_k": None if self.ids is None else int(self.ids.shape[-1]),
                "windows": int(self.windows.shape[0]), "seq_len": int(self.windows.shape[1])}


@torch.no_grad()
def teacher_targets(model: nn.Module, windows: dict[str, torch.Tensor], options: RecoveryOptions,
                    progress: bool = True) -> TeacherTargets:
    """Run the dense ``model`` once over every corpus's windows and keep its targets on the CPU."""
    names, spans, start = [], [], 0
    for name, w in windows.items():
        names.append(name)
        spans.append((name, start, start + w.shape[0]))
        start += w.shape[0]
    stacked = torch.cat([windows[n] for n in names])
    options.require_resolved()
    vocab = int(model.config.vocab_size if hasattr(model.config, "vocab_size") else model.get_output_embeddings()
                .weight.shape[0])
    n, seq = stacked.shape
    full = full_targets(n, seq, vocab)
    k = min(options.teacher_top_k, vocab)
    logp = torch.empty((n, seq, vocab if full else k), dtype=torch.float32)
    ids = None if full else torch.empty((n, seq, k), dtype=torch.int32)
    rest = None if full else torch.empty((n, seq), dtype=torch.float32)
    micro = _micro_batch(options.batch_size, seq, vocab)
    bar = tqdm(total=n, desc="router-kd: teacher", unit="window", disable=not progress)
    for lo in range(0, n, micro):
        hi = min(n, lo + micro)
        lp = torch.log_softmax(_logits(model, stacked[lo:hi]), dim=-1)
        if full:
            logp[lo:hi] = lp.cpu()
        else:
            top, where = lp.topk(k, dim=-1)
            logp[lo:hi], ids[lo:hi] = top.cpu(), where.int().cpu()
            rest[lo:hi] = _rest(lp, where).cpu()
        bar.update(hi - lo)
    bar.close()
    return TeacherTargets(stacked, spans, "full" if full else "topk", logp, ids, rest)


def full_targets(windows: int, seq_len: int, vocab: int) -> bool:
    """Whether the teacher keeps its full log-probabilities: a small vocabulary, and at most FULL_TARGET_BYTES of
    them on the CPU (else the top-k + rest buckets: bounded memory whatever the calibration size)."""
    return vocab <= FULL_VOCAB_LIMIT and windows * seq_len * vocab * 4 <= FULL_TARGET_BYTES


def routing_parameters(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """{parameter name: (module, attribute)} of what router-kd trains, in the model as it is now (call it
    inside ``masked``): every MoE layer's router weight and bias, and shared-expert gates."""
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, tuple[nn.Module, str]] = {}
    for layer in moe_layers(model):
        owners = [layer.router]
        owners += [m for n, m in layer.block.named_modules() if n and SHARED_GATE.search(n)]
        for module in owners:
            for attr, param in module._parameters.items():
                if param is not None and param.is_floating_point():
                    found[f"{names[id(module)]}.{attr}"] = (module, attr)
    return found


def train_routers(model: nn.Module, targets: TeacherTargets, options: RecoveryOptions,
                  progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the routing parameters of ``model`` (already masked, and merged if merging) towards ``targets``.

    Returns ``(delta, record)``: the trained parameters (float32, CPU) by name, and the KL before/after per
    corpus, the settings and what trained. ``model`` is left as it was (the masters are swapped out)."""
    started = time.perf_counter()
    owners = routing_parameters(model)
    masters = {name: m._parameters[a].detach().float().clone().requires_grad_(True) for name, (m, a) in
               owners.items()}
    checkpoint = options.checkpointing
    if checkpoint is None:
        checkpoint = sum(p.numel() for p in model.parameters()) > CHECKPOINT_PARAMS
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    n, seq = targets.windows.shape
    batch = min(options.batch_size, n)
    micro = _micro_batch(batch, seq, targets.logp.shape[-1] if targets.mode == "full" else
                         int(model.get_output_embeddings().weight.shape[0]))
    steps_per_epoch = math.ceil(n / batch)
    with _frozen(model):
        before = _kl_per_corpus(model, targets, micro)
        log.info("router-kd: KL(dense || pruned) before %s", _fmt(before))
        optimizer = torch.optim.Adam(list(masters.values()), lr=options.lr, foreach=False)
        bar = tqdm(total=options.epochs * steps_per_epoch, desc="router-kd", unit="step", disable=not progress)
        running = None
        with _checkpointed(model, checkpoint):
            for _ in range(options.epochs):
                order = torch.randperm(n, generator=generator)
                for lo in range(0, n, batch):
                    index = order[lo:lo + batch]
                    optimizer.zero_grad(set_to_none=True)
                    tokens = index.numel() * seq
                    total = 0.0
                    with _swapped(owners, masters):
                        for part in index.split(micro):
                            kl = _token_kl(_logits(model, targets.windows[part], grad=True), targets.slice(part))
                            loss = kl.sum() / tokens
                            loss.backward()
                            total += float(loss.detach())
                    optimizer.step()
                    running = total if running is None else 0.9 * running + 0.1 * total
                    bar.set_postfix(kl=f"{running:.4f}")
                    bar.update(1)
        bar.close()
        with _swapped(owners, masters):
            after = _kl_per_corpus(model, targets, micro)
    log.info("router-kd: KL(dense || pruned) after %s", _fmt(after))
    delta = {name: master.detach().cpu() for name, master in masters.items()}
    record = {
        "kind": "router-kd",
        "kl_before": before,
        "kl_after": after,
        "teacher": targets.describe(),
        "trained": {"tensors": len(masters), "parameters": int(sum(m.numel() for m in masters.values())),
                    "names": sorted(masters)},
        "steps": options.epochs * steps_per_epoch,
        "gradient_checkpointing": bool(checkpoint),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return delta, record


# ------------------------------------------------------------------------------------------------ pieces
def _logits(model: nn.Module, ids: torch.Tensor, grad: bool = False) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids.to(device), use_cache=False).logits.float()


def _rest(logp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside ``top_ids`` (stable: a logsumexp over the other entries)."""
    return logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)


def _token_kl(logits: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(teacher || student) per token, ``[b, seq]``."""
    logq = torch.log_softmax(logits, dim=-1)
    logp = target["logp"].to(logits.device)
    if "ids" not in target:
        return (logp.exp() * (logp - logq)).sum(-1)
    ids, rest_p = target["ids"].to(logits.device), target["rest"].to(logits.device)
    logq_top = logq.gather(-1, ids)
    rest_q = _rest(logq, ids)
    top = (logp.exp() * (logp - logq_top)).sum(-1)
    p_rest = rest_p.exp()
    tail = torch.where(p_rest > 0, p_rest * (rest_p - rest_q), torch.zeros_like(p_rest))
    return top + tail


@torch.no_grad()
def _kl_per_corpus(model: nn.Module, targets: TeacherTargets, micro: int) -> dict[str, float]:
    out = {}
    for name, lo, hi in targets.corpora:
        total, count = 0.0, 0
        for start in range(lo, hi, micro):
            index = torch.arange(start, min(hi, start + micro))
            kl = _token_kl(_logits(model, targets.windows[index]), targets.slice(index))
            total += float(kl.double().sum())
            count += kl.numel()
        out[name] = total / max(count, 1)
    return out


def _micro_batch(batch: int, seq: int, vocab: int) -> int:
    return max(1, min(batch, LOGITS_BYTES // max(1, seq * vocab * 4)))


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No gradient for any weight of the model (its own Parameters); restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _swapped(owners: dict[str, tuple[nn.Module, str]], masters: dict[str, torch.Tensor]) -> Iterator[None]:
    """The float32 masters (cast to each parameter's dtype, in the graph) in place of the parameters."""
    saved = {name: m._parameters[a] for name, (m, a) in owners.items()}
    try:
        for name, (module, attr) in owners.items():
            live = saved[name]
            module._parameters[attr] = masters[name].to(live.dtype)  # the master itself when already float32
        yield
    finally:
        for name, (module, attr) in owners.items():
            module._parameters[attr] = saved[name]


@contextmanager
def _checkpointed(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing of every decoder layer (recomputed in the backward), whatever the model's own
    support for it and in eval mode (no dropout, no router jitter)."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(model))
    for layer in layers:
        original = layer.forward

        def forward(*args, _original=original, **kwargs):
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in values.items())
