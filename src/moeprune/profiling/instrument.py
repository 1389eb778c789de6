"""The instrumented MoE forward: the model's own routed-expert computation, observed on the way.

We replace each MoE layer's routed-expert call (see :meth:`MoELayer.install_routed_call`) by
:func:`routed_forward`, which computes what the model computes (same experts, same tokens, same
weights; only the order of the k-term sums may differ in the last bit) but takes the norm of each
expert's *unweighted* output before weighting it. The experts run through the model's own experts
implementation, and only on the tokens routed to them, so profiling costs one forward pass, not
one pass per expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from moeprune.arch.view import MoELayer
from moeprune.profiling.stats import SUM_FIELDS, ExpertStats

# observer(flat_expert_index [T*k], flat_weights [T*k], flat_norms [T*k], top_k): one call per layer and batch,
# with ||f_e(h)||_2 of every (token, slot) pair, pairs in token-major order (pair p belongs to token p // k).
Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]


def routed_forward(
    layer: MoELayer,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    observer: Observer | None = None,
) -> torch.Tensor:
    """sum_k w_k * f_{e_k}(h) for every token, handing the norms of the unweighted outputs to ``observer``."""
    shape = hidden.shape  # [T, H], or [batch, seq, H] where the block does not flatten (DBRX)
    hidden = hidden.reshape(-1, shape[-1])
    tokens, top_k = top_k_index.shape
    unweighted = layer.unweighted_pairs(hidden, top_k_index).reshape(-1, hidden.shape[-1])  # [T * k, H]
    if observer is not None:
        norms = torch.linalg.vector_norm(unweighted, dim=-1, dtype=torch.float32)
        observer(top_k_index.reshape(-1), top_k_weights.reshape(-1), norms, top_k)
    weighted = unweighted.view(tokens, top_k, -1) * top_k_weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(hidden.dtype).view(shape)


class StatsRecorder:
    """Accumulates :class:`ExpertStats` sums while installed on a model's MoE layers.

    Set :attr:`valid_tokens` (bool ``[batch * seq]``, flattened like the MoE block flattens its input)
    before each forward so padding is excluded.
    """

    def __init__(self, layers: list[MoELayer], device: torch.device | str = "cpu") -> None:
        self.layers = layers
        self.rows = {layer.index: row for row, layer in enumerate(layers)}
        self.num_experts = layers[0].num_experts
        shape = (len(layers), self.num_experts)
        self.sums = {name: torch.zeros(shape, dtype=torch.float64, device=device) for name in SUM_FIELDS}
        self.valid_tokens: torch.Tensor | None = None

    def observer_for(self, layer: MoELayer) -> Observer:
        row = self.rows[layer.index]

        def observe(flat_index: torch.Tensor, flat_weights: torch.Tensor, norms: torch.Tensor, top_k: int) -> None:
            # One bincount per statistic and layer: no per-expert work on the hot path. Counts past N
            # (zero-compute identity experts, never pruned) are cut off.
            n = self.num_experts
            gates, norms = flat_weights.double(), norms.double()
            if self.valid_tokens is None:
                count = torch.bincount(flat_index, minlength=n)[:n].double()
            else:  # padding: weight every pair by its token's validity
                valid = self.valid_tokens.to(norms.device).repeat_interleave(top_k).double()
                gates, norms = gates * valid, norms * valid
                count = torch.bincount(flat_index, weights=valid, minlength=n)[:n]
            # .to(): with a model spread over GPUs (device_map="auto") this layer may sit on another device.
            home = self.sums["count"].device
            self.sums["count"][row] += count.to(home)
            self.sums["gate_sum"][row] += torch.bincount(flat_index, weights=gates, minlength=n)[:n].to(home)
            self.sums["reap_sum"][row] += torch.bincount(flat_index, weights=gates * norms, minlength=n)[:n].to(home)
            self.sums["norm_sum"][row] += torch.bincount(flat_index, weights=norms, minlength=n)[:n].to(home)

        return observe
    @contextmanager
    def installed(self) -> Iterator[StatsRecorder]:
        """Observe every MoE layer inside the ``with`` block; the model is restored afterwards."""
        undo = []
        try:
            for layer in self.layers:
                observer = self.observer_for(layer)

                def call(hidden, index, weights, _layer=layer, _observer=observer):
                    return routed_forward(_layer, hidden, index, weights, _observer)

                undo.append(layer.install_routed_call(call))
            yield self
        finally:
            for restore in undo:
                restore()

    def take(self, meta: dict | None = None) -> ExpertStats:
        """The sums so far as :class:`ExpertStats` on CPU; the recorder starts again from zero."""
        stats = ExpertStats(
            layers=torch.tensor([layer.index for layer in self.layers], dtype=torch.int64),
            meta=dict(meta or {}),
            **{name: tensor.cpu().clone() for name, tensor in self.sums.items()},
        )
        for tensor in self.sums.values():
            tensor.zero_()
        return stats
