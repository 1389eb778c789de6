"""Refuse reconstruction where moeprune's routing rule does not reproduce the model's own router.

Reconstruction (:mod:`.loss`) never runs the router again: it re-routes cached router logits with
the rule named in the architecture's table row (:mod:`moeprune.arch.routing`). A model type whose
router differs from that rule (sigmoid scores, a choice bias, a normalised input, a rule moeprune
does not know) would get silently wrong losses and masks. :func:`check_routing` runs the dense
model once on a few calibration tokens, observes each MoE layer's input and the experts the model
actually routes every token to, with their weights (the same seam profiling uses,
:meth:`~moeprune.arch.view.MoELayer.install_routed_call`), and compares them with the rule applied
to the router logits of the same input. Any disagreement beyond float tolerance is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moeprune.arch.routing import route, router_logits
from moeprune.arch.view import MoELayer, moe_layers
from moeprune.errors import MoePruneError
from moeprune.profiling.instrument import routed_forward

GUARD_TOKENS = 256  # calibration tokens the check routes (one forward of this many tokens)
# Tokens whose expert sets may differ: exact ties between the k-th and (k+1)-th score break either way.
SET_MISMATCH_FRACTION = 0.01
WEIGHT_RTOL = 1e-4  # relative weight tolerance, or the weights' dtype resolution when coarser (bf16)
WEIGHT_ATOL = 1e-6
# The Gram loss measures the routed experts' output R; it is the block's loss only if the block adds R as is.
OUTPUT_RTOL = 1e-4


@dataclass
class Observed:
    """One MoE layer's input and the routing the model itself applied to it."""

    hidden: list[torch.Tensor]
    index: list[torch.Tensor]
    weights: list[torch.Tensor]  # float32 copies
    routed: list[torch.Tensor] = field(default_factory=list)  # the routed output of the block call in progress
    weight_dtype: torch.dtype = torch.float32  # the dtype the model handed its experts the weights in
    # max |block(h; 2R) - block(h; R) - R| / max |R| with R the routed output: 0 when the block adds R as is
    output_gap: float = 0.0
    doubling: bool = False  # inside the second block call, whose routed output is 2R


def check_routing(model: nn.Module, token_windows: torch.Tensor, max_tokens: int = GUARD_TOKENS) -> None:
    """Raise :class:`MoePruneError` unless the routing rule reproduces every MoE layer's own routing.

    Runs the dense model on the first ``max_tokens`` tokens of ``token_windows [S, L]`` (whole windows
    cut short; at least one window's worth of positions when ``max_tokens`` < L).
    """
    layers = moe_layers(model)
    tokens = guard_tokens(token_windows, max_tokens)
    observed = _observe(model, layers, tokens)
    for layer in layers:
        check_observed_layer(model, layer, observed[layer.index])


def check_observed_layer(model: nn.Module, layer: MoELayer, seen: Observed) -> None:
    """Raise :class:`MoePruneError` unless the rule reproduces what ``layer`` was seen routing (:func:`observe`)."""
    if not seen.index:
        return  # the layer routed nothing on these tokens (cannot happen for an MoE block in use)
    problem = compare_layer(layer, model.config, seen)
    if problem:
        raise refusal(model, layer, problem)
    tolerance = max(OUTPUT_RTOL, 4 * torch.finfo(next(model.parameters()).dtype).eps)
    if layer.spec.layout != "scaled_inputs" and seen.output_gap > tolerance:
        model_type = getattr(model.config, "model_type", "?")
        raise MoePruneError(
            f"expert-sparsity cannot reconstruct {model_type}'s MoE output exactly (layer {layer.index}: the "
            f"block transforms its routed experts' output, e.g. a norm after the experts: off by "
            f"{seen.output_gap:.3g}); plan with another method, or TB-Coverage with --candidate reap."
        )


def compare_layer(layer: MoELayer, config, seen: Observed) -> str:
    """'' when the rule matches the observed routing of ``layer``, else what differs."""
    hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h in seen.hidden])
    index = torch.cat([i.reshape(-1, i.shape[-1]) for i in seen.index]).long()
    weights = torch.cat([w.reshape(index.shape[0], -1) for w in seen.weights])
    if hidden.shape[0] != index.shape[0]:
        return f"the router saw {hidden.shape[0]} tokens but the experts received {index.shape[0]}"
    with torch.no_grad():
        try:
            rule_index, rule_weights = route(layer, config, router_logits(layer, hidden))
        except MoePruneError as err:
            return str(err)
        except (RuntimeError, AttributeError, TypeError) as err:  # a router that is not one linear layer (ZAYA's MLP)
            return f"the rule cannot run on this router ({type(err).__name__}: {err})"
    if rule_index.shape != index.shape:
        return f"the rule picks {rule_index.shape[-1]} experts per token, the model {index.shape[-1]}"
    rtol = max(WEIGHT_RTOL, 2 * torch.finfo(seen.weight_dtype).eps)  # bf16 routers round their weights
    return _difference(rule_index, rule_weights, index.to(rule_index.device), weights.to(rule_weights.device), rtol)


def refusal(model: nn.Module, layer: MoELayer, problem: str) -> MoePruneError:
    model_type = getattr(model.config, "model_type", "?")
    return MoePruneError(
        f"expert-sparsity cannot re-route {model_type}'s router exactly (routing rule {layer.spec.routing!r}, "
        f"layer {layer.index}: {problem}); plan with another method, or TB-Coverage with --candidate reap."
    )


def _difference(
    rule_index: torch.Tensor, rule_weights: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, rtol: float
) -> str:
    rule_index, order = rule_index.sort(dim=-1)
    rule_weights = rule_weights.gather(-1, order).float()
    index, order = index.sort(dim=-1)
    weights = weights.float().gather(-1, order)
    same_set = (rule_index == index).all(dim=-1)
    mismatched = int((~same_set).sum())
    if mismatched > SET_MISMATCH_FRACTION * index.shape[0]:
        return f"other experts chosen for {mismatched} of {index.shape[0]} tokens"
    gap = (rule_weights - weights).abs()[same_set]
    allowed = (rtol * weights.abs() + WEIGHT_ATOL)[same_set]
    if bool((gap > allowed).any()):
        worst = float((gap / weights.abs()[same_set].clamp_min(1e-12)).max())
        return f"routing weights differ by up to {worst:.3g} (relative)"
    return ""


def guard_tokens(token_windows: torch.Tensor, max_tokens: int) -> torch.Tensor:
    if token_windows.dim() != 2 or token_windows.numel() == 0:
        raise MoePruneError(f"Token windows must be a non-empty [samples, seq_len], got {tuple(token_windows.shape)}.")
    seq_len = token_windows.shape[1]
    windows = max(1, max_tokens // seq_len)
    return token_windows[:windows, : min(seq_len, max_tokens)]


def _observe(model: nn.Module, layers: list[MoELayer], tokens: torch.Tensor) -> dict[int, Observed]:
    """Each layer's input and its routed (index, weights), from one instrumented forward on ``tokens``."""
    observed = {layer.index: Observed([], [], []) for layer in layers}
    undo = []
    try:
        for layer in layers:
            undo.append(observe(layer, observed[layer.index]))
        runner = getattr(model, "base_model", model)
        with torch.no_grad():
            runner(input_ids=tokens.to(next(model.parameters()).device), use_cache=False)
    finally:
        for restore in undo:
            restore()
    return observed


def observe(layer: MoELayer, seen: Observed) -> Callable[[], None]:
    """Record into ``seen`` what ``layer`` is given and how it routes, until the returned undo is called."""
    hooks = [layer.block.register_forward_pre_hook(_input_recorder(seen), with_kwargs=True),
             layer.block.register_forward_hook(_output_checker(seen), with_kwargs=True)]
    restore = layer.install_routed_call(_routing_recorder(layer, seen))

    def undo() -> None:
        for hook in hooks:
            hook.remove()
        restore()

    return undo


def _input_recorder(seen: Observed):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if seen.doubling:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.hidden.append(hidden.detach().reshape(-1, hidden.shape[-1]))

    return hook


def _output_checker(seen: Observed):
    """Calls the block again on the same input with its routed output doubled: out(2R) - out(R) must be R."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if seen.doubling or not seen.routed:
            return
        seen.doubling = True
        try:
            doubled = module(*args, **kwargs)
        finally:
            seen.doubling = False
        routed = seen.routed.pop()
        once, twice = (_first(out).reshape(-1, routed.shape[-1]).float() for out in (output, doubled))
        # Relative to the larger of R and the block output: a bf16 block rounds its output, shared experts included.
        scale = torch.maximum(routed.float().abs().max(), once.abs().max()).clamp_min(1e-12)
        gap = (twice - once - routed.float()).abs().max() / scale
        seen.output_gap = max(seen.output_gap, float(gap))

    return hook


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _routing_recorder(layer: MoELayer, seen: Observed):
    def call(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        routed = routed_forward(layer, hidden, top_k_index, top_k_weights)
        if seen.doubling:
            return routed * 2
        if top_k_weights.is_floating_point():
            seen.weight_dtype = top_k_weights.dtype
        seen.index.append(top_k_index.detach())
        seen.weights.append(top_k_weights.detach().float())
        seen.routed.append(routed.detach().reshape(-1, routed.shape[-1]))
        return routed

    return call
