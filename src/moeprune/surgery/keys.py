"""Checkpoint key rules of model-free apply: which safetensors names hold experts and routers, by name alone.

Read by the shard writer (:mod:`moeprune.surgery.shards`) and by its checks
(:mod:`moeprune.surgery.shard_checks`), so both sides agree on one set of rules.
"""

from __future__ import annotations

import re

from moeprune.arch.adapters import DECODER_LISTS, ROUTER_ATTRS
from moeprune.planning.mask import ExpertMask

_BLOCK = r".*\.(?:" + "|".join(DECODER_LISTS) + r")\.(?P<layer>[0-9]+)\.[^.]+\."  # ...layers.{i}.<block>.
EXPERT_KEY = re.compile(r"^(?P<head>" + _BLOCK + r"experts)\.(?P<expert>[0-9]+)\.(?P<rest>.+)$")
# DBRX's expert matrices sit one module deeper (experts.mlp.w1), and its router linear inside the router
# (router.layer); other routers with an inner linear also keep per-expert vectors this rule would miss.
FUSED_KEY = re.compile(r"^" + _BLOCK + r"experts\.(?:mlp\.)?[^.]+$")
ROUTER_KEY = re.compile(
    r"^" + _BLOCK + r"(?:" + "|".join(ROUTER_ATTRS) + r")(?:\.layer)?\.(?:weight|bias|e_score_correction_bias)$"
)


def sliced_shape(shape: tuple[int, ...], mask: ExpertMask, flat: bool) -> tuple[int, ...] | None:
    """The shape of an expert or router tensor once sliced to the kept experts, or None when it does not have
    one row per expert (``[N, ...]``), or in the flat layout one block of rows per expert (``[N * I, ...]``)."""
    n = mask.num_experts
    if not shape or (shape[0] != n if not flat else shape[0] % n):
        return None
    return (shape[0] // n * mask.kept_per_layer, *shape[1:])
