"""Unseen-domain coverage: how much perplexity a pruned model loses on domains calibration never saw.

For each cell and each held-out domain (a perplexity dataset that is not a calibration corpus), the
ratio ``ppl(pruned) / ppl(dense)``; per cell the worst (largest) and the mean ratio over those
domains. 1.0 means the domain lost nothing; the worst-domain ratio is the number a generic-pruning
method is meant to keep low. Pure functions: cells (as ``experiment.run_cell`` writes them) in,
numbers and markdown out.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

DENSE = "dense"  # the dense model's cell id and method in every result (one definition for the report and grid)


def heldout_domains(cells: Sequence[Mapping[str, Any]], calibration: Sequence[str]) -> list[str]:
    """Perplexity datasets of the cells that calibration did not use, in first-seen order."""
    names = dict.fromkeys(d for c in cells for d in c["summary"].get("ppl", {}))
    return [d for d in names if d not in set(calibration)]


def ratios(cell: Mapping[str, Any], dense: Mapping[str, Any], domains: Sequence[str]) -> dict[str, float]:
    """ppl(cell) / ppl(dense) per domain that both cells measured."""
    mine, base = cell["summary"].get("ppl", {}), dense["summary"].get("ppl", {})
    return {d: mine[d] / base[d] for d in domains if d in mine and d in base and base[d]}


def summary(cell: Mapping[str, Any], dense: Mapping[str, Any], domains: Sequence[str]) -> dict[str, float] | None:
    """{"worst": max ratio, "mean": mean ratio, <domain>: ratio ...}, or None without any domain."""
    per_domain = ratios(cell, dense, domains)
    if not per_domain:
        return None
    return {"worst": max(per_domain.values()), "mean": statistics.fmean(per_domain.values()), **per_domain}


def coverage_table(cells: Sequence[Mapping[str, Any]], calibration: Sequence[str]) -> str:
    """Markdown: per retain ratio and method, ppl ratio to dense per held-out domain, worst and mean.

    A seeded method (random) shows mean ± sample std over its seeds. Empty without a dense cell or
    without a held-out domain."""
    dense = next((c for c in cells if c["method"] == DENSE), None)
    domains = heldout_domains(cells, calibration)
    if dense is None or not domains:
        return ""
    keys = [*domains, "worst", "mean"]
    lines = [
        "| Retain | Method | " + " | ".join(f"{d} ×" for d in domains) + " | worst × ↓ | mean × ↓ |",
        "|---|---|" + "---:|" * len(keys),
    ]
    rows: dict[tuple[float, str], list[dict[str, float]]] = {}
    for cell in cells:
        if cell["method"] != DENSE and (s := summary(cell, dense, domains)) is not None:
            rows.setdefault((float(cell["retain"]), row_of(cell)), []).append(s)
    for (retain, method), members in sorted(rows.items(), key=lambda kv: -kv[0][0]):
        texts = [_stat_text([m[k] for m in members if k in m]) for k in keys]
        label = f"{method} ({len(members)} seeds)" if len(members) > 1 else method
        lines.append(f"| {100 * retain:.0f}% | {label} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def wins_against_seeds(
    cells: Sequence[Mapping[str, Any]], calibration: Sequence[str], ours: str, baseline: str = "random"
) -> dict[float, str]:
    """Per retain ratio: on how many ``baseline`` seeds ``ours`` has the strictly lower worst-domain ratio."""
    dense = next((c for c in cells if c["method"] == DENSE), None)
    domains = heldout_domains(cells, calibration)
    out: dict[float, str] = {}
    if dense is None or not domains:
        return out
    for mine in (c for c in cells if row_of(c) == ours):
        retain = float(mine["retain"])
        own = summary(mine, dense, domains)
        others = [
            s["worst"]
            for c in cells
            if row_of(c) == baseline and float(c["retain"]) == retain and (s := summary(c, dense, domains))
        ]
        if own is not None and others:
            out[retain] = f"{sum(own['worst'] < o for o in others)}/{len(others)}"
    return out


def row_of(cell: Mapping[str, Any]) -> str:
    """A table row: the cell's variant (method, ``reap@code``, ``tb-coverage@B4``, ``reap+router-kd``, ...)."""
    return str(cell.get("variant") or (cell.get("mask") or {}).get("variant") or cell["method"])


def recovery_table(cells: Sequence[Mapping[str, Any]], calibration: Sequence[str]) -> str:
    """Markdown: per retain ratio and method, the worst unseen-domain ratio for each recovery kind present
    (``none`` first), with the change against no recovery; seeded methods as the mean over their seeds.
    Empty when no cell was recovered."""
    dense = next((c for c in cells if c["method"] == DENSE), None)
    domains = heldout_domains(cells, calibration)
    kinds = list(dict.fromkeys(_kind(c) for c in cells if c["method"] != DENSE))
    if dense is None or not domains or kinds == ["none"] or not kinds:
        return ""
    kinds = ["none", *[k for k in kinds if k != "none"]]
    worst: dict[tuple[float, str], dict[str, list[float]]] = {}
    for cell in cells:
        if cell["method"] != DENSE and (s := summary(cell, dense, domains)) is not None:
            base = row_of(cell).partition("+")[0]
            worst.setdefault((float(cell["retain"]), base), {}).setdefault(_kind(cell), []).append(s["worst"])
    lines = ["| Retain | Method | " + " | ".join(f"{k} worst × ↓" for k in kinds) + " |",
             "|---|---|" + "---:|" * len(kinds)]
    for (retain, method), by_kind in sorted(worst.items(), key=lambda kv: -kv[0][0]):
        plain = statistics.fmean(by_kind["none"]) if by_kind.get("none") else None
        texts = []
        for kind in kinds:
            values = by_kind.get(kind)
            if not values:
                texts.append("–")
                continue
            mean = statistics.fmean(values)
            change = "" if kind == "none" or plain is None else f" ({100 * (mean / plain - 1):+.1f}%)"
            texts.append(f"{mean:.3f}{change}")
        label = f"{method} ({len(by_kind.get('none', []))} seeds)" if len(by_kind.get("none", [])) > 1 else method
        lines.append(f"| {100 * retain:.0f}% | {label} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def _kind(cell: Mapping[str, Any]) -> str:
    return str(cell.get("recover") or row_of(cell).partition("+")[2] or "none")


def _stat_text(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"
