"""lm-eval's HFLM with exact log-likelihoods when two requests split the same tokens at different points.

HFLM (lm-eval 0.4.13, ``logits_cache=True``, the default) groups log-likelihood requests by
``context + continuation[:-1]`` tokens and runs one forward pass per group: the member with the longest
continuation. Every other member then reads its continuation's log-probabilities with
``torch.gather(logits, 2, cont_toks)`` from the first ``len(cont_toks)`` positions of that representative's
continuation logits, not the last ones (only the greedy check uses the trailing slice). A request whose
whole text equals another's but whose context is longer, so its continuation shorter, is silently scored
at the wrong positions. lm-eval added the longest-continuation representative for the crash in
EleutherAI/lm-evaluation-harness#2984 (PR #2987); the gather was left as it was.

The held-out tasks hit this: a ``heldout_cloze`` item's context is a passage plus the start of a unit and
its gold choice the rest of that unit, while ``heldout_order``/``heldout_domain`` items on the same unit
have the passage as context and the whole unit as gold: the same text. Run in one call, 785 of the 1,200
cloze gold choices (and 5 one-token distractors) were scored at the wrong positions: 22.9% instead of 67.9%.

``SplitSafeHFLM`` keeps the grouping (it saves the forward passes of one-token choices, e.g. MMLU's
" A"/" B") but hands HFLM the requests in rounds, so that within one round all requests sharing
``context + continuation[:-1]`` have continuations of one length, which HFLM scores correctly.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from moeprune.streaming.layers import DiskLayers
from moeprune.streaming.runner import run_layer_major

# HFLM's request form: ((context, continuation) strings, context tokens, continuation tokens).
Request = tuple[tuple[str, str], list[int], list[int]]


def split_rounds(requests: list[Request]) -> list[list[int]]:
    """Indices of ``requests`` in rounds: requests with the same ``context + continuation[:-1]`` tokens go to
    the same round only if their continuations are equally long (round k takes the k-th shortest length)."""
    lengths: dict[tuple[int, ...], set[int]] = {}
    for _, context, continuation in requests:
        lengths.setdefault(tuple(context + continuation[:-1]), set()).add(len(continuation))
    rounds: list[list[int]] = []
    for index, (_, context, continuation) in enumerate(requests):
        k = sorted(lengths[tuple(context + continuation[:-1])]).index(len(continuation))
        rounds.extend([] for _ in range(k + 1 - len(rounds)))
        rounds[k].append(index)
    return rounds


class SplitSafeHFLM(HFLM):
    """HFLM whose grouped forward passes never serve continuations of different lengths (see the module).
    ``show_progress = False`` hides its log-likelihood progress bar (lm-eval passes no way to do so)."""

    show_progress: bool = True

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        disable_tqdm = disable_tqdm or not self.show_progress
        rounds = split_rounds(requests) if self.logits_cache else [list(range(len(requests)))]
        if len(rounds) == 1:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        out: list[Any] = [None] * len(requests)
        for indices in rounds:
            part = super()._loglikelihood_tokens(
                [requests[i] for i in indices], disable_tqdm=disable_tqdm, override_bs=override_bs
            )
            for i, answer in zip(indices, part, strict=True):
                out[i] = answer
        return out


class StreamedHFLM(SplitSafeHFLM):
    """Log-likelihoods of a model streamed from disk (:class:`~moeprune.streaming.layers.DiskLayers`), layer-major.

    HFLM's own loop runs twice over the same requests: a dry pass records the padded batches it would run (its
    model calls answered with zero logits, its answers dropped), then the real pass, whose model calls are answered
    from logits computed layer-major: the recorded batches from the call asked for onwards, as many as hold
    ``chunk_bytes`` of logits (at least one), every decoder layer read once per chunk. Same batches, same padding,
    same order as in memory, so the log-likelihoods are the in-memory ones.
    """

    chunk_bytes: int = 2 << 30

    def __init__(self, place: DiskLayers, **kwargs: Any) -> None:
        super().__init__(pretrained=place.model, **kwargs)
        self.place = place
        self._device = place.device
        self._mode: str | None = None
        self._recorded: list[torch.Tensor] = []
        self._logits: dict[int, torch.Tensor] = {}
        self._calls = 0

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        try:
            self._mode, self._recorded = "record", []
            super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            self._mode, self._calls, self._logits = "replay", 0, {}
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._mode, self._recorded, self._logits = None, [], {}

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        if self._mode == "record":
            self._recorded.append(inps.detach().cpu())
            return torch.zeros(*inps.shape, self.place.config.vocab_size, dtype=torch.float32, device=inps.device)
        if self._mode != "replay":
            raise RuntimeError("A streamed model answers log-likelihood requests only.")
        call, self._calls = self._calls, self._calls + 1
        if call not in self._logits:
            self._compute_from(call)
        return self._logits.pop(call).to(inps.device)

    def _compute_from(self, first: int) -> None:
        vocab, size = self.place.config.vocab_size, torch.tensor([], dtype=self.place.dtype).element_size()
        last, total = first, 0
        while last < len(self._recorded):
            total += self._recorded[last].numel() * vocab * size
            if last > first and total > self.chunk_bytes:
                break
            last += 1
        batches = [{"input_ids": ids} for ids in self._recorded[first:last]]

        def keep(b: int, logits: torch.Tensor) -> None:
            self._logits[first + b] = logits.to("cpu")

        run_layer_major(self.place, batches, on_logits=keep, progress=False, desc="lm-eval (streamed from disk)")
