"""The reconstruction loss of one MoE layer, for any expert mask, from cached logits and Gram matrices.

Lu et al. (2024) keep the experts whose removal changes the layer output least:
``loss(S) = ||Z - Z_S||_F`` over calibration tokens, with Z the dense MoE block output and Z_S the
output when the router re-routes among the kept experts S by its own rule. Shared experts add the
same term to both and cancel, so only the routed part matters. For token t,

    Z(t) - Z_S(t) = sum_e delta_e(t) f_e(x_t),   delta = w_dense - w_S   ([N], zero off the top-k),

hence ``loss^2 = sum_t delta(t)^T G(t) delta(t)`` with ``G(t) = F(t) F(t)^T`` the ``[N, N]`` Gram
matrix of the expert outputs at token t. This is an identity, not an approximation: G is computed
once per layer (every expert on every token, in token chunks), and then any mask costs a re-route
from cached logits plus a gather of G at <= 2k experts per token; no expert runs again. We expand
``delta^T G delta = ||Z_d||^2 - 2 w_d^T G[d, m] w_m + w_m^T G[m, m] w_m`` (d, m: dense and masked
top-k) so the constant first term is computed once; the per-token terms are summed in float64.

Two ways to sum over the calibration tokens (``LayerProblem.batch_ids``):

- ``global``: one Frobenius norm over all tokens, ``sqrt(sum_t q_t)`` with ``q_t = delta^T G delta``;
- ``per-batch`` (NAEE's own code, Lu et al. 2024): the sum over calibration batches of each batch's
  Frobenius norm, ``sum_b sqrt(sum_{t in b} q_t)``; their batches are 8 windows of 2048 tokens.

The two agree on a single batch and can rank masks differently otherwise (a batch whose error is
large counts less than under the global norm).

Memory: the Gram takes T x N^2 x 4 bytes (65,536 tokens x 60^2 x 4 B = 0.94 GB for Qwen1.5-MoE;
N = 128 would need 4.3 GB: pass ``max_tokens`` (e.g. 16,384 -> 1.07 GB)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moeprune.arch.adapters import ArchSpec
from moeprune.arch.routing import (
    group_count,
    positional_groups,
    route,
    route_local,
    router_bias,
    router_logits,
    uses_groups,
)
from moeprune.arch.view import MoELayer
from moeprune.errors import MoePruneError

LOSSES = ("global", "per-batch")
DEFAULT_TOKEN_CHUNK = 512  # tokens per expert pass while building G: peak memory chunk x N x H
# Elements (masks x tokens x per-token work) evaluated at once; bounds memory to a few hundred MB.
EVAL_ELEMENTS = 1 << 24


@dataclass
class LayerProblem:
    """Everything needed to evaluate ``loss(kept)`` for one MoE layer, without the model."""

    layer: int  # decoder-layer index
    spec: ArchSpec
    config: Any
    logits: torch.Tensor  # [T, N] float32 router logits
    bias: torch.Tensor | None  # [N] V3 choice bias
    gram: torch.Tensor  # [T, N, N] float32, G[t, i, j] = <f_i(x_t), f_j(x_t)>
    dense_index: torch.Tensor  # [T, k] experts of the dense router
    dense_weights: torch.Tensor  # [T, k] their weights
    dense_energy: torch.Tensor  # [T] float64, ||routed part of Z(t)||^2
    batch_ids: torch.Tensor | None = None  # [T] calibration batch of each token (per-batch loss); None: global

    @classmethod
    def build(
        cls,
        layer: MoELayer,
        config: Any,
        hidden: torch.Tensor,
        token_chunk: int = DEFAULT_TOKEN_CHUNK,
        max_tokens: int | None = None,
        device: torch.device | str | None = None,
        batch_tokens: int | None = None,
    ) -> LayerProblem:
        """From the captured inputs ``hidden [T, H]`` of ``layer`` (evenly thinned to ``max_tokens``).

        ``batch_tokens``: the per-batch loss over consecutive batches of that many captured tokens
        (windows per batch x window length); None: the global norm.
        """
        device = device or layer.router.weight.device
        positions = torch.arange(hidden.shape[0])
        if max_tokens is not None and hidden.shape[0] > max_tokens:
            positions = torch.linspace(0, hidden.shape[0] - 1, max_tokens).long()
            hidden = hidden[positions]
        batch_ids = None if batch_tokens is None else (positions // batch_tokens).to(device)
        with torch.no_grad():
            hidden = hidden.to(device)
            logits = router_logits(layer, hidden)
            bias = router_bias(layer)
            index, weights = route(layer, config, logits, bias=bias)
            gram = expert_gram(layer, hidden, token_chunk)
        energy = _quadratic(weights, _gather(gram, index, index), weights)
        return cls(layer.index, layer.spec, config, logits, bias, gram, index, weights, energy, batch_ids)

    @property
    def num_experts(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_groups(self) -> int:
        """Groups a mask keeps equally many experts of: config n_group for DeepSeek (as planning does)."""
        return group_count(self.spec, self.config)

    def group_of(self, expert: int) -> int:
        return expert // (self.num_experts // self.num_groups)

    def loss(self, kept: Sequence[int] | torch.Tensor) -> float:
        """``||Z - Z_kept||_F`` over the calibration tokens (summed per batch for the per-batch loss)."""
        return float(self.losses([sorted(int(e) for e in kept)])[0])

    def losses(self, masks: Sequence[Sequence[int]] | torch.Tensor, original_groups: bool = False) -> torch.Tensor:
        """``[M]`` float64 losses of M masks of equal size (rows of sorted kept ids).

        Grouped routers form groups as the sliced model does (K / n_group consecutive kept experts);
        with ``original_groups`` each kept expert stays in its original group instead, which is the
        same for masks that keep equally many per group and also defines masks that do not (search
        intermediates).
        """
        kept = torch.as_tensor(masks, dtype=torch.int64, device=self.logits.device)
        if kept.dim() != 2:
            raise MoePruneError(f"Masks must be [M, K] kept ids, got shape {tuple(kept.shape)}.")
        kept = kept.sort(dim=1).values
        tokens, k = self.dense_index.shape
        per_mask = tokens * (kept.shape[1] + 2 * k * k)
        step = max(1, EVAL_ELEMENTS // per_mask)
        return torch.cat([self._losses(kept[i : i + step], original_groups) for i in range(0, len(kept), step)])

    def _losses(self, kept: torch.Tensor, original_groups: bool) -> torch.Tensor:
        index, weights = self._route(kept, original_groups)  # [M, T, k]
        cross = _quadratic(self.dense_weights, _gather(self.gram, self.dense_index, index), weights)
        masked = _quadratic(weights, _gather(self.gram, index, index), weights)
        per_token = self.dense_energy - 2 * cross + masked  # [M, T]
        if self.batch_ids is None:
            squared = per_token.sum(dim=-1, keepdim=True)
        else:
            squared = per_token.new_zeros(len(kept), int(self.batch_ids.max()) + 1)
            squared.index_add_(1, self.batch_ids, per_token)
        # Rounding can leave a tiny negative where the mask changes nothing.
        return squared.clamp_min(0.0).sqrt().sum(dim=-1)

    def _route(self, kept: torch.Tensor, original_groups: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Route M masks at once: (original ids, weights), each ``[M, T, k]``."""
        logits = self.logits[:, kept].transpose(0, 1)  # [M, T, K]
        bias = None if self.bias is None else self.bias[kept][:, None, :]
        if not uses_groups(self.spec, self.config):
            groups = None
        elif original_groups:
            groups = (kept // (self.num_experts // self.num_groups))[:, None, :]
        else:
            groups = positional_groups(self.spec, self.config, kept.shape[1]).to(kept.device)
        local, weights = route_local(self.spec.routing, self.config, logits, bias, groups)
        index = kept[:, None, :].expand(-1, logits.shape[1], -1).gather(-1, local)
        return index, weights


def expert_gram(layer: MoELayer, hidden: torch.Tensor, token_chunk: int = DEFAULT_TOKEN_CHUNK) -> torch.Tensor:
    """``[T, N, N]`` float32 Gram matrices of all experts' outputs, token chunk by token chunk."""
    tokens, n = hidden.shape[0], layer.num_experts
    gram = torch.empty(tokens, n, n, dtype=torch.float32, device=hidden.device)
    for start in range(0, tokens, token_chunk):
        x = hidden[start : start + token_chunk]
        outputs = torch.stack([layer.expert_forward(e, x).float() for e in range(n)], dim=1)  # [c, N, H]
        gram[start : start + token_chunk] = torch.bmm(outputs, outputs.transpose(1, 2))
    return gram


def _gather(gram: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``G[t, rows[..., t, i], cols[..., t, j]]`` as ``[..., T, k, k]`` (leading mask dims broadcast)."""
    tokens, n = gram.shape[0], gram.shape[1]
    rows, cols = torch.broadcast_tensors(rows, cols)
    flat = (rows[..., :, None] * n + cols[..., None, :]).reshape(*rows.shape[:-1], -1)  # [..., T, k*k]
    source = gram.reshape(tokens, n * n).expand(*flat.shape[:-1], n * n)
    return source.gather(-1, flat).reshape(*rows.shape, cols.shape[-1])


def _quadratic(left: torch.Tensor, matrix: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Per token ``left^T M right`` in float64, ``[..., T]``."""
    return torch.einsum("...ti,...tij,...tj->...t", left.double(), matrix.double(), right.double())
