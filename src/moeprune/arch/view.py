"""One generic view of a model's MoE layers, whatever the architecture.

:func:`moe_layers` finds every decoder layer whose feed-forward is a routed MoE block (checking
the module, not the layer index: Qwen's ``decoder_sparse_step`` and DeepSeek's
``first_k_dense_replace`` leave some layers dense) and wraps it in a :class:`MoELayer`, which
knows how to run one expert on its tokens and how routed-expert calls are made, so that profiling,
reconstruction and surgery never look at the architecture again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from moeprune.arch.adapters import (
    BLOCK_ATTRS,
    DECODER_LISTS,
    ROUTER_ATTRS,
    ROUTER_LINEARS,
    ArchSpec,
    config_value,
    spec_for,
)
from moeprune.errors import MoePruneError

# (hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> routed output [T, H]
RoutedCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MoELayer:
    index: int  # decoder-layer index
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    spec: ArchSpec

    # The module whose subtree holds the block's per-expert vectors, when the block is a whole decoder
    # layer (Gemma 4 keeps router and experts on the layer): surgery then looks no further than this.
    vector_scope: nn.Module | None = None
    # The block attribute the router weight was found under (the router itself, or e.g. Ergo's gate around
    # gate.linear): it may hold the router's choice bias.
    router_owner: nn.Module | None = None

    @property
    def num_experts(self) -> int:
        """Routed (prunable) experts; router rows past this are zero-compute or shared experts, never pruned."""
        if isinstance(self.experts, nn.ModuleList):
            return len(self.experts)
        if self.spec.layout == "flat":
            return int(self.experts.num_experts)
        return min(int(t.shape[0]) for t in self.experts.parameters() if t.dim() == 3)

    @property
    def router_rows(self) -> int:
        return int(self.router.weight.shape[0])

    def expert_forward(self, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        """The expert's unweighted output f_e(h) on the tokens ``hidden [n, H]``."""
        if self.spec.layout == "modulelist":
            return self.experts[expert](hidden)
        if self.spec.layout == "scaled_inputs":  # Llama 4: gate_up_proj [E, H, 2I], down_proj [E, I, H]
            gate, up = (hidden @ self.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            return (up * self.experts.act_fn(gate)) @ self.experts.down_proj[expert]
        if self.spec.layout == "flat" or not self._standard_gated(hidden):
            # Ungated (Nemotron-H), flat (DBRX) or otherwise laid out experts (Aria's [E, H, 2I], HY-V4 without
            # act_fn, Ergo's transposed up_proj/down_proj and per-expert post-norm): the model's own experts
            # forward, top-1, weight 1.
            index = torch.full((hidden.shape[0], 1), expert, dtype=torch.long, device=hidden.device)
            return self.unweighted_pairs(hidden, index).reshape(-1, hidden.shape[-1])
        # Same operations, in the same order, as transformers' eager experts forward.
        gate, up = nn.functional.linear(hidden, self.experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(self.experts.act_fn(gate) * up, self.experts.down_proj[expert])

    def _standard_gated(self, hidden: torch.Tensor) -> bool:
        """transformers' usual fused experts: gate_up_proj [E, 2I, H] and an act_fn."""
        gate_up = getattr(self.experts, "gate_up_proj", None)
        return (isinstance(gate_up, torch.Tensor) and gate_up.shape[-1] == hidden.shape[-1]
                and callable(getattr(self.experts, "act_fn", None)))

    def unweighted_pairs(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """f_e(h) for every (token, slot) pair, token-major (row t * k + j is slot j of token t).

        Fused experts are run through the model's own experts implementation (grouped_mm, batched_mm,
        eager or a hub kernel: whatever the model is configured with) as a top-1 call with weight 1 per
        pair, so profiling costs what the model's forward costs. ModuleList experts run expert by expert
        on their routed tokens, as the model's own loop does.
        """
        top_k = top_k_index.shape[-1]
        flat_index = top_k_index.reshape(-1)
        if self.spec.layout in ("fused", "flat"):
            pairs = hidden.repeat_interleave(top_k, dim=0)
            index = flat_index[:, None].expand(-1, self.spec.call_slots)
            weights = torch.zeros(index.shape, dtype=hidden.dtype, device=hidden.device)
            weights[:, 0] = 1.0  # extra slots weigh 0: f(h) * 1 + f(h) * 0 is exactly f(h)
            return type(self.experts).forward(self.experts, pairs, index, weights)
        out = hidden.new_empty(flat_index.shape[0], hidden.shape[-1])
        order = torch.argsort(flat_index, stable=True)
        start = 0
        for expert, n in enumerate(torch.bincount(flat_index, minlength=self.num_experts).tolist()):
            if n:
                pairs = order[start : start + n]
                out[pairs] = self.expert_forward(expert, hidden[pairs // top_k]).to(out.dtype)
                start += n
        return out

    def install_routed_call(self, call: RoutedCall) -> Callable[[], None]:
        """Replace the model's routed-expert computation by ``call``; returns a function that undoes it."""
        if self.spec.layout == "modulelist":
            top_k = _block_top_k(self.block)

            def moe_infer(x, flat_expert_indices, flat_expert_weights):
                index = flat_expert_indices.view(-1, top_k)
                weights = flat_expert_weights.view(-1, top_k)
                return call(x, index, weights)

            self.block.moe_infer = moe_infer
            return lambda: self.block.__dict__.pop("moe_infer", None)
        if self.spec.layout == "scaled_inputs":
            return self._observe_scaled_inputs(call)
        self.experts.forward = call
        return lambda: self.experts.__dict__.pop("forward", None)

    def _observe_scaled_inputs(self, call: RoutedCall) -> Callable[[], None]:
        """Llama 4 runs every expert on score-scaled inputs (``experts(score * h)``), so ``call`` cannot replace
        that computation: it is handed the router's (hidden, top-k index, top-k scores) to observe, and the
        model's own experts still compute the output."""
        seen: dict[str, torch.Tensor] = {}
        top_k, original = _block_top_k(self.block), type(self.experts).forward

        def remember(module, args, output):
            seen["hidden"], seen["scores"] = args[0], output[0]

        def forward(routed_in):
            weights, index = seen["scores"].topk(top_k, dim=-1)
            call(seen["hidden"], index, weights)
            return original(self.experts, routed_in)

        hook = self.router.register_forward_hook(remember)
        self.experts.forward = forward

        def undo() -> None:
            hook.remove()
            self.experts.__dict__.pop("forward", None)

        return undo


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (``model.model.layers`` for every supported architecture)."""
    base = getattr(model, "base_model", model)
    for name in DECODER_LISTS:  # DBRX names them blocks
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise MoePruneError(f"Could not find the decoder layers (a ModuleList named 'layers') in {type(model).__name__}.")


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of ``model``, in order; an error naming what was missing if there is none."""
    spec = spec_for(model.config)
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        for block in _blocks(layer):
            router, owner = _router_of(block, spec)
            experts = getattr(block, spec.experts_attr, None)
            if router is None or not isinstance(experts, nn.Module):
                continue
            scope = owner if block is layer else None
            found.append(MoELayer(index, block, router, experts, _resolve_layout(spec, experts, block), scope, owner))
            break
    if not found:
        raise MoePruneError(
            f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) has no MoE layer that moeprune "
            f"recognises: looked for a block {list(BLOCK_ATTRS)} holding a router {list(ROUTER_ATTRS)} with a "
            f"[num_experts, hidden] weight and an '{spec.experts_attr}' module. Is this a Mixture-of-Experts model?"
        )
    return found


def top_k_of(model: nn.Module) -> int:
    spec = spec_for(model.config)
    value = config_value(model.config, spec.top_k_key)
    if not isinstance(value, int):
        raise MoePruneError(f"Config has no integer {spec.top_k_key!r} (experts per token).")
    return value


def _blocks(layer: nn.Module) -> list[nn.Module]:
    """Candidate MoE blocks of a decoder layer: its feed-forward attributes, then the layer itself (Gemma 4)."""
    return [getattr(layer, a) for a in BLOCK_ATTRS if isinstance(getattr(layer, a, None), nn.Module)] + [layer]


def _router_of(block: nn.Module, spec: ArchSpec) -> tuple[nn.Module | None, nn.Module | None]:
    """(the module holding the [rows, hidden] router weight, the block attribute it was found under)."""
    names = (spec.router_attr, *[a for a in ROUTER_ATTRS if a != spec.router_attr])
    for name in names:
        module = getattr(block, name, None)
        if not isinstance(module, nn.Module):
            continue
        for candidate in (module, *(_get_path(module, inner) for inner in ROUTER_LINEARS)):
            weight = getattr(candidate, "weight", None)
            if isinstance(candidate, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                return candidate, module
    return None, None


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, nn.Module) else None


def _resolve_layout(spec: ArchSpec, experts: nn.Module, block: nn.Module) -> ArchSpec:
    """Check the experts module matches the spec's layout (and pick one for duck-typed models)."""
    if isinstance(experts, nn.ModuleList):
        if not hasattr(block, "moe_infer"):
            raise MoePruneError(
                f"{type(block).__name__} holds ModuleList experts but no moe_infer(x, indices, weights) method; "
                "moeprune cannot observe its routing. Add an ArchSpec for it."
            )
        return spec if spec.layout == "modulelist" else replace(spec, layout="modulelist")
    stacked = [t for t in experts.parameters() if t.dim() == 3]
    if stacked and spec.layout == "scaled_inputs":
        return spec
    if spec.layout == "flat" and isinstance(getattr(experts, "num_experts", None), int):
        return spec
    if stacked and _takes_routing(experts):
        return spec if spec.layout == "fused" else replace(spec, layout="fused")
    raise MoePruneError(
        f"{type(experts).__name__} is neither fused experts (3D per-expert tensors, called as "
        "experts(hidden, top_k_index, top_k_weights)) nor a ModuleList of expert MLPs; moeprune cannot "
        "observe which expert each token uses. Add an ArchSpec for it."
    )


def _takes_routing(experts: nn.Module) -> bool:
    """Whether the experts' forward receives the routing (hidden, top_k_index, top_k_weights)."""
    try:
        parameters = inspect.signature(type(experts).forward).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in parameters.values()):  # a wrapper (experts implementations)
        return True
    return len([p for p in parameters.values() if p.kind != p.VAR_KEYWORD]) >= 4  # self + three


def _block_top_k(block: nn.Module) -> int:
    for owner in (block, getattr(block, "gate", None), getattr(block, "config", None)):
        for name in ("num_experts_per_tok", "top_k"):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
    raise MoePruneError(f"Cannot find top-k on {type(block).__name__}.")
