"""``expert-sparsity``: the reconstruction baseline of Lu et al. (2024), "Not All Experts are Equal".

Per MoE layer keep the K experts whose mask minimises ``||Z - Z_mask||_F`` over calibration tokens
(see :mod:`.loss` for the exact Gram formulation, the global and NAEE's per-batch norm, and
:mod:`.search` for the search). The pipeline:

0. :func:`~.guard.check_routing` refuses a model whose router the routing rule does not reproduce
   exactly (one forward on a few calibration tokens);
1. :func:`capture_moe_inputs` runs the dense model once and stores every MoE layer's input in
   ``<workdir>/reconstruction/<key>/`` (skipped when already there), at most ``token_budget`` tokens;
2. per layer, :class:`LayerProblem` caches router logits and the expert Gram matrices;
3. :func:`search_layer_many` picks K experts for every requested K from the same Gram (one greedy
   elimination path for all K where routing is ungrouped).

:func:`reconstruction_selection` (settings: :class:`SearchSettings`) returns ``{K: {decoder layer: SearchResult}}``;
:func:`selections` turns one K into ``{layer: kept ids}`` for ``planning.plan(..., precomputed=...)``
or as TB-Coverage's ``candidate_masks``; :func:`expert_sparsity_mask` builds the mask directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeprune.arch.view import moe_layers, top_k_of
from moeprune.errors import MoePruneError
from moeprune.loading import config_hash, model_name
from moeprune.planning.mask import ExpertMask, LayerMask, kept_count
from moeprune.reconstruction.capture import WorkDir, capture_moe_inputs, within_budget
from moeprune.reconstruction.guard import (
    GUARD_TOKENS,
    Observed,
    check_observed_layer,
    check_routing,
    guard_tokens,
    observe,
)
from moeprune.reconstruction.loss import DEFAULT_TOKEN_CHUNK, LOSSES, LayerProblem
from moeprune.reconstruction.search import (
    EXACT_LIMIT,
    MAX_SWAP_PASSES,
    SearchResult,
    search_layer,
    search_layer_many,
)
from moeprune.streaming.layers import DiskLayers
from moeprune.streaming.runner import run_layer_major

# NAEE's loss (Lu et al. 2024, their code's defaults): summed over batches of 8 windows. Their calibration
# (128 windows of 2048 tokens of C4) is the paper preset's (moeprune.presets).
DEFAULT_LOSS = "per-batch"
DEFAULT_LOSS_BATCH = 8  # windows per term of the per-batch loss (NAEE's inference batch)

Results = dict[int, dict[int, SearchResult]]  # K -> decoder layer -> result


@dataclass(frozen=True)
class SearchSettings:
    """How the expert-sparsity search runs, with resolved values (the api fills ``loss`` and ``token_budget`` from
    :class:`~moeprune.options.ReconstructionOptions`; the rest are the engine's knobs).

    ``loss``: ``global`` (one Frobenius norm) or ``per-batch`` (NAEE: the sum of the norms of batches of
    ``loss_batch`` windows). ``token_budget`` keeps the first whole windows within that many tokens before capture;
    ``max_tokens`` instead thins the captured tokens evenly when building each Gram. ``batch_size`` windows per
    forward of the capture, ``token_chunk`` tokens per Gram step, ``exact_limit`` and ``max_swap_passes`` bound the
    search (:mod:`.search`)."""

    loss: str = DEFAULT_LOSS
    loss_batch: int = DEFAULT_LOSS_BATCH
    token_budget: int | None = None
    max_tokens: int | None = None
    batch_size: int = 4
    token_chunk: int = DEFAULT_TOKEN_CHUNK
    exact_limit: int = EXACT_LIMIT
    max_swap_passes: int = MAX_SWAP_PASSES

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise MoePruneError(f"Unknown reconstruction loss {self.loss!r}; use one of {', '.join(LOSSES)}.")

    def batch_tokens(self, windows: torch.Tensor) -> int | None:
        """Tokens per term of the per-batch loss (None: the global loss)."""
        return self.loss_batch * windows.shape[1] if self.loss == "per-batch" else None

__all__ = [
    "DEFAULT_LOSS",
    "DEFAULT_LOSS_BATCH",
    "LOSSES",
    "LayerProblem",
    "SearchResult",
    "SearchSettings",
    "WorkDir",
    "capture_moe_inputs",
    "check_routing",
    "expert_sparsity_mask",
    "reconstruction_selection",
    "reconstruction_selection_streamed",
    "search_layer",
    "search_layer_many",
    "selections",
    "within_budget",
]


def reconstruction_selection(
    model: nn.Module,
    token_windows: torch.Tensor,
    kept_per_layer: int | list[int],
    work: WorkDir,
    settings: SearchSettings | None = None,
    *,
    corpus: str | None = None,
    progress: bool = True,
) -> Results:
    """``{K: {decoder layer: SearchResult}}`` for every K, sharing one capture (into ``work``, recording ``corpus``)
    and one Gram per layer; ``settings``: :class:`SearchSettings` (None: its defaults)."""
    from tqdm.auto import tqdm

    settings = settings or SearchSettings()
    ks = sorted({kept_per_layer} if isinstance(kept_per_layer, int) else set(kept_per_layer))
    token_windows = within_budget(token_windows, settings.token_budget)
    check_routing(model, token_windows)  # refuse a router the rule does not reproduce, before the capture
    capture_moe_inputs(model, token_windows, work.root, work.key, batch_size=settings.batch_size, progress=progress,
                       corpus=corpus)
    batch_tokens = settings.batch_tokens(token_windows)
    results: Results = {k: {} for k in ks}
    for layer in tqdm(moe_layers(model), desc="expert-sparsity search", disable=not progress):
        hidden = work.load_layer(layer.index)
        problem = LayerProblem.build(layer, model.config, hidden, settings.token_chunk, settings.max_tokens,
                                     batch_tokens=batch_tokens)
        for k, result in search_layer_many(problem, ks, settings.exact_limit, settings.max_swap_passes).items():
            results[k][layer.index] = result
        del problem  # free this layer's Gram before the next one is built
    return results


def reconstruction_selection_streamed(
    place: DiskLayers,
    token_windows: torch.Tensor,
    kept_per_layer: int | list[int],
    settings: SearchSettings | None = None,
    *,
    progress: bool = True,
) -> Results:
    """:func:`reconstruction_selection` for a model streamed from disk, in one layer-major pass that reads every
    layer once: the routing guard's tokens run first as their own batch (observed as :func:`check_routing` observes
    them), then the calibration batches, each MoE layer's inputs kept in memory for that layer only; once a layer has
    run on every batch, the guard checks it and the search runs on its inputs before it is freed. Nothing is
    written to the work directory."""
    settings = settings or SearchSettings()
    ks = sorted({kept_per_layer} if isinstance(kept_per_layer, int) else set(kept_per_layer))
    token_windows = within_budget(token_windows, settings.token_budget)
    model = place.model
    layers = {layer.index: layer for layer in moe_layers(model)}
    batches = [{"input_ids": guard_tokens(token_windows, GUARD_TOKENS)}]
    batches += [{"input_ids": b} for b in torch.split(token_windows, settings.batch_size)]
    batch_tokens = settings.batch_tokens(token_windows)
    results: Results = {k: {} for k in ks}
    seen: dict[str, Any] = {}
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach().reshape(-1, hidden.shape[-1]).to("cpu").contiguous())

    def on_inputs(index: int, batch: int, _hidden: torch.Tensor) -> None:
        layer = layers.get(index)
        if layer is None:
            return
        if batch == 0:  # the guard's tokens
            seen["observed"] = Observed([], [], [])
            seen["undo"] = observe(layer, seen["observed"])
        elif batch == 1:
            seen.pop("undo")()
            seen["hook"] = layer.block.register_forward_pre_hook(capture, with_kwargs=True)

    def on_done(index: int, _module: nn.Module) -> None:
        layer = layers.get(index)
        if layer is None:
            return
        seen.pop("hook").remove()
        check_observed_layer(model, layer, seen.pop("observed"))
        hidden = torch.cat(captured)
        captured.clear()
        problem = LayerProblem.build(layer, model.config, hidden, settings.token_chunk, settings.max_tokens,
                                     batch_tokens=batch_tokens)
        for k, result in search_layer_many(problem, ks, settings.exact_limit, settings.max_swap_passes).items():
            results[k][index] = result

    run_layer_major(place, batches, on_layer_inputs=on_inputs, on_layer_done=on_done, progress=progress,
                    desc="expert-sparsity (streamed from disk)")
    return results


def selections(results: Results, kept: int) -> dict[int, list[int]]:
    """``{decoder layer: kept ids}`` for one K, as ``plan(..., precomputed=...)`` takes it."""
    if kept not in results:
        raise MoePruneError(f"No expert-sparsity search for K={kept}; searched K in {sorted(results)}.")
    return {layer: list(result.kept) for layer, result in results[kept].items()}


def expert_sparsity_mask(
    model: nn.Module,
    token_windows: torch.Tensor,
    retain: float,
    work: WorkDir,
    settings: SearchSettings | None = None,
    *,
    corpus: str | None = None,
    progress: bool = True,
) -> ExpertMask:
    """The ``expert-sparsity`` mask keeping K = floor(retain * N) experts per layer (arguments as
    :func:`reconstruction_selection`'s)."""
    settings = settings or SearchSettings()
    num_experts = moe_layers(model)[0].num_experts
    kept = kept_count(retain, num_experts, top_k_of(model))
    results = reconstruction_selection(model, token_windows, kept, work, settings, corpus=corpus,
                                       progress=progress)[kept]
    layers = {
        index: LayerMask(r.kept, [], {"reconstruction_loss": r.loss, "search": r.search})
        for index, r in results.items()
    }
    used = within_budget(token_windows, settings.token_budget)
    extra = {"config_hash": config_hash(model.config), "calibration": work.key, "tokens": int(used.numel()),
             "loss": settings.loss}
    if corpus:
        extra["corpora"] = [corpus]
    return ExpertMask(
        model=model_name(model),
        method="expert-sparsity",
        retain=retain,
        num_experts=num_experts,
        kept_per_layer=kept,
        layers=layers,
        extra=extra,
    )
