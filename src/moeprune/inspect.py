"""``moeprune inspect``: a short human-readable summary of a model, a profile directory or a mask."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeprune.arch import decoder_layers, moe_layers, spec_for, top_k_of
from moeprune.errors import MoePruneError
from moeprune.loading import load_config, resolve_model_path
from moeprune.planning.mask import ExpertMask
from moeprune.profiling.stats import Profile
from moeprune.quant import checkpoint_bytes, format_of
from moeprune.quant import describe as describe_format


def describe(target: str, trust_remote_code: bool = False) -> str:
    path = Path(target)
    mask = path.suffix == ".json" and path.is_file()
    prof = not mask and path.is_dir() and any(path.glob("*.safetensors")) and not (path / "config.json").exists()
    if trust_remote_code and (mask or prof):
        raise MoePruneError(f"--trust-remote-code has no effect here: it applies only to a model, and {target} is a "
                            f"{'mask' if mask else 'profile folder'}; drop it.")
    if mask:
        return describe_mask(path)
    if prof:
        return describe_profile(path)
    return describe_model(target, trust_remote_code)


def describe_model(target: str, trust_remote_code: bool = False) -> str:
    """Architecture, MoE layers, experts and parameters, from the config (weights on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(target, trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    spec = spec_for(config)
    layers = moe_layers(model)
    routed = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    total = sum(p.numel() for p in model.parameters())
    output, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and output is not None and output.weight is not embed.weight:
        total -= output.weight.numel()  # on the meta device ties are not made; tied weights are one tensor
    return "\n".join(
        [
            f"model        {target}",
            f"architecture {config.model_type} (adapter {spec.name}, {spec.layout} experts, routing {spec.routing})",
            f"MoE layers   {len(layers)} of {len(list(_decoder_layers(model)))}: {[layer.index for layer in layers]}",
            f"experts      {layers[0].num_experts} routed per layer, top-{top_k_of(model)}"
            + (f", shared: {', '.join(spec.shared)}" if spec.shared else ""),
            f"parameters   {total / 1e6:.2f}M total, {routed / 1e6:.2f}M in routed experts ({routed / total:.1%})",
            *_weights_lines(target, config),
        ]
    )


def _weights_lines(target: str, config) -> list[str]:
    """The weights' format (moeprune.quant) and, for a local folder, their bytes; for a moeprune export, the
    source's bytes as its mask.json recorded them."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    fmt = format_of(quantization, name=target)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "?").removeprefix("torch.")
    lines = [f"weights      {describe_format(fmt) if fmt is not None else dtype + ' (unquantized)'}"]
    folder = Path(resolve_model_path(target))
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        size = checkpoint_bytes(folder)
        line = f"bytes        {size:,} in tensors"
        record = _export_record(folder)
        if record.get("bytes_before"):
            line += f" (source {record['bytes_before']:,}: {1 - size / record['bytes_before']:.1%} fewer)"
        lines.append(line)
    return lines


def _export_record(folder: Path) -> dict:
    try:
        return dict(ExpertMask.load(folder / "mask.json").extra.get("export") or {})
    except (MoePruneError, OSError):
        return {}


def describe_profile(path: Path) -> str:
    profile = Profile.load(path)
    meta = profile.meta
    lines = [
        f"profile of {meta.get('model', '?')} ({profile.num_experts} experts, top-{meta.get('top_k', '?')}, "
        f"{len(profile.layer_ids)} MoE layers)"
    ]
    for name, stats in profile.corpora.items():
        lines.append(
            f"  corpus {name}: {int(stats.meta.get('samples', 0))} x {stats.meta.get('seq_len', '?')} "
            f"tokens = {int(stats.tokens)}"
        )
    scores = profile.reap_scores()
    k = max(1, profile.num_experts // 4)
    lines.append(f"per layer: top-{k} experts by REAP score on each corpus, and their overlap")
    for row, layer in enumerate(profile.layer_ids):
        tops = [
            set(torch.argsort(scores[c, row], descending=True, stable=True)[:k].tolist())
            for c in range(scores.shape[0])
        ]
        overlap = len(set.intersection(*tops)) / k
        shown = "  ".join(f"{name}={sorted(top)}" for name, top in zip(profile.names, tops, strict=True))
        lines.append(f"  layer {layer:3d}: overlap {overlap:.2f}  {shown}")
    return "\n".join(lines)


def describe_mask(path: Path) -> str:
    try:
        mask = ExpertMask.load(path)
    except (KeyError, TypeError) as err:
        raise MoePruneError(f"{path} is not a moeprune mask: {err}") from err
    lines = [
        f"mask {path.name}: method {mask.method}, retain {mask.retain}, keeps {mask.kept_per_layer} of "
        f"{mask.num_experts} experts in {len(mask.layers)} layers (model {mask.model or '?'})"
    ]
    if mask.protect_budget is not None:
        asked = mask.protect_budget_requested
        asked_text = f" (asked {asked})" if asked is not None and asked != mask.protect_budget else ""
        lines.append(f"  protect budget B={mask.protect_budget}{asked_text}, candidate {mask.candidate}")
    lines += [f"  note: {note}" for note in mask.notes]
    for layer in sorted(mask.layers):
        entry = mask.layers[layer]
        extra = {k: v for k, v in entry.extra.items() if isinstance(v, int | float | str)}
        lines.append(
            f"  layer {layer:3d}: kept {entry.kept}"
            + (f" protected {entry.protected}" if entry.protected else "")
            + (f" {json.dumps(extra)}" if extra else "")
        )
    return "\n".join(lines)


def _decoder_layers(model):
    return decoder_layers(model)
