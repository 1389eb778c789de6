"""The short README.md model card written next to every pruned checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeprune import __version__
from moeprune.planning.mask import ExpertMask


@dataclass
class CardInfo:
    source: str
    out_dir: str
    mask: ExpertMask
    params_before: int
    params_after: int


def render_model_card(info: CardInfo) -> str:
    mask = info.mask
    k, n = mask.kept_per_layer, mask.num_experts
    saved = 1 - info.params_after / info.params_before if info.params_before else 0.0
    budget = "none" if mask.protect_budget is None else str(mask.protect_budget)
    lines = [
        "---",
        f"base_model: {info.source}",
        "tags: [moeprune, moe, expert-pruning]",
        "---",
        "",
        f"# {Path(info.out_dir).name}",
        "",
        f"`{info.source}` with routed experts pruned by moeprune {__version__}: "
        f"every MoE layer keeps **K={k} of N={n}** experts (retain {mask.retain:g}).",
        "",
        "| | |",
        "|---|---|",
        f"| Method | {mask.variant}"
        + (f" (candidate {mask.candidate}{'' if mask.candidate_used is not False else ', unused: B >= K'})"
           if mask.candidate else "")
        + " |",
        f"| Retain ratio | {mask.retain:g} |",
        f"| Experts kept per layer | {k} of {n} |",
        f"| Protected budget B | {budget} |",
        f"| Seed | {mask.seed} |",
        f"| Parameters | {info.params_before:,} -> {info.params_after:,} ({saved:.1%} fewer) |",
        "",
        "Kept experts are renumbered 0..K-1 in their original order; `mask.json` maps them back.",
        "",
        "| Decoder layer | Kept original expert ids | Protected |",
        "|---|---|---|",
    ]
    for layer in sorted(mask.layers):
        protected = sorted(mask.layers[layer].protected)
        lines.append(f"| {layer} | {_ids(mask.kept(layer))} | {_ids(protected) if protected else '-'} |")
    lines += [
        "",
        "Reproduce:",
        "",
        "```bash",
        f"moeprune apply {info.source} mask.json --out {info.out_dir}",
        "```",
        "",
    ]
    return "\n".join(lines)


def _ids(ids: list[int]) -> str:
    return " ".join(str(e) for e in ids)
