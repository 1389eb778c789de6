"""Expert merging: fold each expert a mask drops into the kept expert whose outputs are most like its own.

The rule, per MoE layer (docs/merging.md states it with its sources, REAM and HC-SMoE, and where it differs):

1. **Sample.** The dense model (every expert, as loaded) runs on the calibration windows. Each MoE layer
   keeps the first ``max_tokens`` tokens that reach it (windows in order; they are a seeded random sample)
   and, over *all* calibration tokens, the router's choices and the weights the model applies.
2. **Similarity.** Every expert runs on the same sampled tokens, unweighted: ``f_e(h)``
   (:meth:`MoELayer.expert_forward`). ``sim(d, j)`` is the per-token cosine of ``f_d(h)`` and ``f_j(h)``
   averaged over the sample (a zero output has cosine 0 with everything).
3. **Assignment.** Each dropped expert ``d`` goes to the kept expert ``j`` with the largest ``sim(d, j)``;
   ties go to the lowest kept id.
4. **Mass.** ``m_e = sum over calibration tokens routed to e of g_e(x)``, the router weight the model
   applies to e on that token (the profile's ``gate_sum``).
5. **Merge.** With ``G_j = {j} + the dropped experts assigned to j`` and ``M_j = sum_{e in G_j} m_e``, every
   per-expert tensor of j becomes the mass-weighted average ``sum_{e in G_j} m_e W_e / M_j``, computed in
   float32 as ``W_j + sum_{d} (m_d / M_j) (W_d - W_j)`` (the same number, and exactly ``W_j`` where every
   dropped member equals j or has zero mass), then cast back to the parameter's dtype. When ``M_j = 0`` j
   is left as it is. Router rows, router biases and everything outside the routed experts are untouched.

:func:`merge_delta` returns the result as replacement tensors named in the *pruned* model's state_dict
(kept experts renumbered 0..K-1 by :func:`moeprune.surgery.slicing.apply_mask`): apply the mask, then
replace those Parameters. :func:`merge_supported` says up front whether a model's expert layout can be
merged this way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moeprune.arch.view import MoELayer, moe_layers
from moeprune.errors import MoePruneError
from moeprune.loading import model_name
from moeprune.planning.mask import ExpertMask
from moeprune.profiling.instrument import routed_forward

MERGEABLE_LAYOUTS = ("fused", "modulelist", "scaled_inputs")
# Bytes of float32 expert outputs held at once while computing similarities (all experts x a token chunk).
SIMILARITY_CHUNK_BYTES = 256 * 2**20
RULE = (
    "each dropped expert -> the kept expert with the highest mean per-token cosine of unweighted outputs on "
    "the sampled calibration tokens (ties: lowest id); kept weights := router-weight-mass-weighted average "
    "of the group, fp32; zero total mass: unchanged; routers untouched"
)


def merge_supported(model: nn.Module) -> str | None:
    """None when every MoE layer's expert layout can be merged; else one line saying why not."""
    try:
        layers = moe_layers(model)
    except MoePruneError as err:
        return str(err)
    for layer in layers:
        reason = _layer_refusal(layer)
        if reason is not None:
            return f"--recover merge cannot merge {_type_name(model)}'s experts (layer {layer.index}): {reason}."
    return None


def merge_delta(
    model: nn.Module,
    mask: ExpertMask,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    max_tokens: int = 4096,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run the dense ``model`` (unmasked, as loaded) on calibration ``windows [n, seq]`` (token ids) and
    return ``(delta, record)``.

    ``delta`` maps parameter names of the *pruned* model's state_dict (after
    :func:`moeprune.surgery.slicing.apply_mask`) to full replacement tensors, same shape and dtype as the pruned
    model's parameter, on CPU: the kept experts' weights of every layer where a kept expert received a dropped
    one. ``record`` is JSON-able: per layer the assignment, similarities and masses; the settings.
    """
    _check_settings(windows, batch_size, max_tokens)
    reason = merge_supported(model)
    if reason is not None:
        raise MoePruneError(reason)
    layers = moe_layers(model)
    mask.check_model([layer.index for layer in layers], layers[0].num_experts, model_name(model))
    started = time.perf_counter()
    masses, samples = _observe_dense(model, layers, windows, batch_size, max_tokens, progress)
    names = _module_names(model)
    delta: dict[str, torch.Tensor] = {}
    layer_records: dict[str, Any] = {}
    from tqdm.auto import tqdm

    for layer in tqdm(layers, desc="merge experts", disable=not progress):
        kept = sorted(mask.kept(layer.index))
        dropped = [e for e in range(layer.num_experts) if e not in set(kept)]
        if not dropped:
            continue
        with torch.no_grad():
            similarity = expert_similarity(layer, samples[layer.index], dropped, kept)
        into = [kept[i] for i in similarity.argmax(dim=1).tolist()]  # argmax: first maximum, the lowest id
        groups = {j: [d for d, target in zip(dropped, into, strict=True) if target == j] for j in kept}
        mass = masses[layer.index]
        delta.update(_merged_tensors(layer, names[id(layer.experts)], kept, groups, mass))
        layer_records[str(layer.index)] = _layer_record(samples[layer.index].shape[0], kept, dropped, into,
                                                        similarity, mass, groups)
    record = {
        "method": "merge",
        "rule": RULE,
        "settings": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                     "tokens": int(windows.numel()), "max_tokens": max_tokens, "batch_size": batch_size},
        "layers": layer_records,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return delta, record


def _layer_record(tokens: int, kept: list[int], dropped: list[int], into: list[int], similarity: torch.Tensor,
                  mass: torch.Tensor, groups: dict[int, list[int]]) -> dict[str, Any]:
    assigned = {}
    for row, (d, j) in enumerate(zip(dropped, into, strict=True)):
        assigned[str(d)] = {"into": j, "similarity": float(similarity[row, kept.index(j)]), "mass": float(mass[d])}
    return {
        "tokens_sampled": int(tokens),
        "assigned": assigned,
        "mass": [float(m) for m in mass.tolist()],
        # Kept experts whose weights the merge leaves as they are: nothing assigned, or a group of mass 0.
        "unchanged": [j for j in kept if not groups[j] or float(mass[[j, *groups[j]]].sum()) == 0.0],
    }


def pruned_name(experts_name: str, layer: MoELayer, new_id: int, parameter: str) -> str:
    """The pruned model's state_dict name of kept expert ``new_id``'s (renumbered 0..K-1) ``parameter``.

    Fused experts hold every expert in one tensor, whose name does not change; a ModuleList's kept
    experts are renumbered, so ``experts.<new_id>.<parameter>``.
    """
    if layer.spec.layout == "modulelist":
        return f"{experts_name}.{new_id}.{parameter}"
    return f"{experts_name}.{parameter}"


def expert_similarity(layer: MoELayer, hidden: torch.Tensor, dropped: list[int], kept: list[int]) -> torch.Tensor:
    """``[len(dropped), len(kept)]`` float32: the mean over the tokens ``hidden [n, H]`` of the cosine of
    ``f_d(h)`` and ``f_j(h)`` (unweighted outputs, every expert on the same tokens)."""
    device = _expert_device(layer)
    experts = dropped + kept
    hidden_size = hidden.shape[-1]
    chunk = max(1, SIMILARITY_CHUNK_BYTES // (4 * hidden_size * len(experts)))
    total = torch.zeros(len(dropped), len(kept), dtype=torch.float64, device=device)
    for start in range(0, hidden.shape[0], chunk):
        tokens = hidden[start : start + chunk].to(device)
        outputs = torch.stack([layer.expert_forward(e, tokens).float() for e in experts])  # [E', c, H]
        # Unit vectors (a zero output stays zero: cosine 0 with everything).
        unit = outputs / torch.linalg.vector_norm(outputs, dim=-1, keepdim=True).clamp_min(1e-12)
        total += torch.einsum("dch,kch->dk", unit[: len(dropped)], unit[len(dropped) :]).double()
    return (total / max(1, hidden.shape[0])).float().cpu()


# --- observing the dense model ---------------------------------------------------------------


def _observe_dense(
    model: nn.Module, layers: list[MoELayer], windows: torch.Tensor, batch_size: int, max_tokens: int,
    progress: bool,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One pass of the dense model: per layer the router-weight mass of each expert (float64 ``[N]``, CPU) and
    the first ``max_tokens`` tokens reaching it (``[n, H]``, model dtype, CPU)."""
    from tqdm.auto import tqdm

    masses = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    pieces: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    undo = [layer.install_routed_call(_observer(layer, masses, pieces, max_tokens)) for layer in layers]
    runner = getattr(model, "base_model", model)  # the LM head's output is never needed
    device = _input_device(model)
    was_training = model.training
    model.eval()  # DeepSeek-MoE's remote code routes through moe_infer in eval mode only
    try:
        with torch.no_grad():
            for start in tqdm(range(0, windows.shape[0], batch_size), desc="merge: dense pass", disable=not progress):
                runner(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for restore in undo:
            restore()
        model.train(was_training)
    return masses, {index: torch.cat(parts) for index, parts in pieces.items()}


def _observer(layer: MoELayer, masses: dict[int, torch.Tensor], pieces: dict[int, list[torch.Tensor]],
              max_tokens: int) -> Callable:
    num_experts, mass, parts = layer.num_experts, masses[layer.index], pieces[layer.index]

    def call(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
        flat_index = index.reshape(-1)
        # Pairs routed past N (zero-compute experts) are not prunable and hold no weights to merge.
        routed = flat_index < num_experts
        sums = torch.bincount(flat_index[routed], weights=weights.reshape(-1)[routed].double(), minlength=num_experts)
        mass.add_(sums[:num_experts].cpu())
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        room = max_tokens - sum(p.shape[0] for p in parts)
        if room > 0:
            parts.append(flat_hidden[:room].to("cpu", copy=True))  # a copy: not a view of the batch
        if layer.spec.layout == "scaled_inputs":  # observe only: the model's own experts compute the output
            return None
        return routed_forward(layer, hidden, index, weights)

    return call


# --- merging weights ---------------------------------------------------------------------------


def _merged_tensors(layer: MoELayer, experts_name: str, kept: list[int], groups: dict[int, list[int]],
                    mass: torch.Tensor) -> dict[str, torch.Tensor]:
    """Replacement tensors (pruned names) for the kept experts that received at least one dropped expert."""
    out: dict[str, torch.Tensor] = {}
    if layer.spec.layout == "modulelist":
        for new_id, j in enumerate(kept):
            if not groups[j]:
                continue
            params = {e: dict(layer.experts[e].named_parameters()) for e in (j, *groups[j])}
            for name, param in params[j].items():
                merged = _weighted_average(param, [params[d][name] for d in groups[j]], mass, j, groups[j])
                out[pruned_name(experts_name, layer, new_id, name)] = merged
        return out
    if not any(groups.values()):
        return out
    for name, param in _per_expert_parameters(layer).items():
        rows = [_weighted_average(param[j], [param[d] for d in groups[j]], mass, j, groups[j]) for j in kept]
        out[pruned_name(experts_name, layer, 0, name)] = torch.stack(rows)
    return out


def _weighted_average(own: torch.Tensor, others: list[torch.Tensor], mass: torch.Tensor, j: int,
                      members: list[int]) -> torch.Tensor:
    """``W_j + sum_d (m_d / M) (W_d - W_j)`` in float32, cast back; ``W_j`` itself when ``M = 0``."""
    total = float(mass[[j, *members]].sum())
    result = own.detach().float().cpu().clone()
    if total == 0.0:
        return result.to(own.dtype)
    for d, other in zip(members, others, strict=True):
        share = float(mass[d]) / total
        if share:
            result += share * (other.detach().float().cpu() - own.detach().float().cpu())
    return result.to(own.dtype)


def _per_expert_parameters(layer: MoELayer) -> dict[str, torch.Tensor]:
    """The experts module's own parameters with the expert on dim 0 (what slicing slices)."""
    n = layer.num_experts
    return {name: p for name, p in layer.experts._parameters.items()
            if p is not None and p.dim() > 0 and p.shape[0] == n}


# --- checks ------------------------------------------------------------------------------------


def _layer_refusal(layer: MoELayer) -> str | None:
    layout = layer.spec.layout
    if layout not in MERGEABLE_LAYOUTS:
        return (f"its '{layout}' expert layout has no per-expert weight tensors to average (merging supports "
                f"{', '.join(MERGEABLE_LAYOUTS)}); use --recover none or router-kd")
    if layout == "modulelist":
        return _modulelist_refusal(layer) or _probe_refusal(layer)
    n = layer.num_experts
    own = [(name, t) for name, t in (*layer.experts._parameters.items(), *layer.experts._buffers.items())
           if t is not None and t.dim() > 0]
    padded = [name for name, t in own if t.shape[0] > n and t.dim() >= 2]
    if padded:
        return (f"experts tensors {padded} have {max(t.shape[0] for _, t in own)} rows for {n} routed experts "
                "(padding or zero-compute rows), which merging cannot place; use --recover none or router-kd")
    buffers = [name for name, t in layer.experts._buffers.items() if t is not None and t.dim() > 0 and t.shape[0] == n]
    if buffers:
        return f"per-expert buffers {buffers} (not weights) cannot be averaged; use --recover none or router-kd"
    # Ergo's per-expert post-norm lives in a submodule of the experts: it acts on each route's output, so f_e
    # is not linear in the projections and averaging them while keeping one norm row is not a merge.
    nested = [f"{sub}.{name}" for sub, module in layer.experts.named_modules() if sub
              for name, t in (*module._parameters.items(), *module._buffers.items())
              if t is not None and t.dim() > 0 and t.shape[0] == n]
    if nested:
        return (f"per-expert tensors {nested} sit in a submodule of the experts (a per-expert norm?), so the "
                "expert output is not linear in the weights merging averages; use --recover none or router-kd")
    per_expert = _per_expert_parameters(layer)
    if not per_expert:
        return "no experts parameter has the expert on its first dimension"
    not_float = [name for name, p in per_expert.items() if not p.is_floating_point()]
    if not_float:
        return f"experts parameters {not_float} are not floating point (quantised?) and cannot be averaged"
    return _probe_refusal(layer)


@torch.no_grad()
def _probe_refusal(layer: MoELayer) -> str | None:
    """Merging compares experts by their outputs f_e(h): an expert that moeprune cannot run on its own
    (e.g. Inkling 2's experts, whose forward takes more than the hidden states) is refused here, not as a
    traceback halfway through. Runs on one token, also on a meta-device skeleton."""
    weight = layer.router.weight
    probe = torch.zeros(1, weight.shape[-1], dtype=weight.dtype, device=weight.device)
    try:
        layer.expert_forward(0, probe)
    except Exception as err:  # any failure of the model's own expert code means: not mergeable here
        text = str(err) if len(str(err)) <= 120 else str(err)[:117] + "..."
        return (f"its experts cannot be run one at a time ({type(err).__name__}: {text}); "
                "use --recover none or router-kd")
    return None


def _modulelist_refusal(layer: MoELayer) -> str | None:
    shapes = [{name: (tuple(p.shape), p.dtype) for name, p in expert.named_parameters()} for expert in layer.experts]
    if any(s != shapes[0] for s in shapes[1:]):
        return "its experts do not all hold the same parameters (names, shapes, dtypes)"
    if any(not dtype.is_floating_point for _, dtype in shapes[0].values()):
        return "its experts hold non-floating-point (quantised?) parameters, which cannot be averaged"
    if any(b is not None and b.dim() > 0 for expert in layer.experts for b in expert.buffers()):
        return "its experts hold buffers (quantisation state?), which cannot be averaged"
    return None


def _check_settings(windows: torch.Tensor, batch_size: int, max_tokens: int) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise MoePruneError(f"Merge calibration windows must be a non-empty [samples, seq_len] tensor, got {shape}.")
    if windows.is_floating_point():
        raise MoePruneError("Merge calibration windows must hold token ids (an integer tensor), not floats.")
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
        if not isinstance(value, int) or value < 1:
            raise MoePruneError(f"Merge {name} must be a positive integer, got {value!r}.")


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _expert_device(layer: MoELayer) -> torch.device:
    return next(layer.experts.parameters()).device


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _type_name(model: nn.Module) -> str:
    return str(getattr(model.config, "model_type", type(model).__name__))
