"""PNG plots of an experiment (matplotlib, Agg backend: no display needed).

- ``common_avg.png`` / ``bundled_avg.png``: that average vs retain ratio per method (random: mean with
  std error bars);
- ``ppl_<dataset>.png``: perplexity vs retain ratio per method, log scale, dense as a dashed line;
- ``budget_<metric>.png`` (a protect-budget sweep): TB-Coverage's metric vs B per retain ratio, ``auto`` as
  a star at the B it chose;
- ``recovery_worst.png`` (a grid with recovery): the worst unseen-domain perplexity ratio to dense vs retain
  ratio, one panel per recovery kind (``none`` first), a line per method; the other plots show plain
  pruning only (``none``), so that they stay readable;
- ``ranking_overlap.png``: per MoE layer, how much the corpora agree on the top-K experts by REAP score,
  ``|top-K(A) ∩ top-K(B)| / K`` for K = N/4, N/2, 3N/4 (mean over corpus pairs when there are more than two).
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moeprune.evaluation.coverage import heldout_domains, summary
from moeprune.evaluation.report import (
    DENSE,
    budget_used,
    dataset_label,
    datasets_of,
    method_label,
    recovery_of,
    split_recovery,
    sweep_cells,
    variant_of,
)
from moeprune.io import atomic_file, make_dirs
from moeprune.profiling.stats import Profile

OVERLAP_FRACTIONS = (0.25, 0.5, 0.75)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported anywhere; headless servers have no display
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    cells: Sequence[Mapping[str, Any]], out_dir: str | Path, profile_dir: str | Path | None = None,
    calibration: Sequence[str] = (),
) -> dict[str, Path]:
    """Every plot the data allows, as {name: path}; ``calibration``: the calibration corpora (the domains that
    are not unseen, for the recovery plot)."""
    out = make_dirs(Path(out_dir))  # below an experiment's --out: never through a link
    files: dict[str, Path] = {}
    every = cells
    cells = [c for c in cells if recovery_of(c) == "none"]
    if len(cells) < len(every):
        files.update(recovery_plot(every, out / "recovery_worst.png", calibration))
    for key, title in (("common_avg", "Common Avg"), ("bundled_avg", "Bundled Avg")):
        if any(c["summary"].get(key) is not None for c in cells):
            files[key] = plot_metric(cells, lambda c, k=key: c["summary"].get(k), title, out / f"{key}.png")
    for dataset in datasets_of(cells):
        # A dataset may be a file path: name the PNG after the file only.
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(dataset).name)
        files[f"ppl_{stem}"] = plot_metric(
            cells,
            lambda c, d=dataset: c["summary"]["ppl"].get(d),
            f"{dataset_label(dataset)} perplexity",
            out / f"ppl_{stem}.png",
            log=True,
        )
    if sweep_cells(cells):
        files.update(_budget_plots(cells, out))
    if profile_dir is not None and Path(profile_dir).is_dir():
        prof = Profile.load(profile_dir)
        if len(prof.names) > 1:
            files["ranking_overlap"] = plot_overlap(
                prof.reap_scores(), prof.layer_ids, prof.names, out / "ranking_overlap.png"
            )
    return files


def series(
    cells: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None]
) -> dict[str, list[tuple[float, float, float]]]:
    """{variant: [(retain, mean, std)]} over the pruned cells; std is 0 for a variant with one cell per ratio."""
    grouped: dict[str, dict[float, list[float]]] = {}
    for cell in cells:
        v = value(cell)
        if cell["method"] != DENSE and v is not None:
            grouped.setdefault(variant_of(cell), {}).setdefault(float(cell["retain"]), []).append(float(v))
    return {
        method: [
            (r, statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0) for r, vs in sorted(by.items())
        ]
        for method, by in grouped.items()
    }


def plot_metric(
    cells: Sequence[Mapping[str, Any]],
    value: Callable[[Mapping[str, Any]], float | None],
    label: str,
    path: Path,
    log: bool = False,
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = series(cells, value)
    for variant, points in lines.items():
        xs, ys, errs = zip(*points, strict=True)
        legend = method_label(variant, list(lines))
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=legend)
    dense = [v for c in cells if c["method"] == DENSE and (v := value(c)) is not None]
    if dense:
        ax.axhline(dense[0], color="black", linestyle="--", linewidth=1, label="Dense")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("retain ratio")
    ax.set_ylabel(label)
    return _save(plt, fig, ax, path)


def recovery_plot(cells: Sequence[Mapping[str, Any]], path: Path, calibration: Sequence[str] = ()) \
        -> dict[str, Path]:
    """``recovery_worst.png``: worst unseen-domain ratio vs retain, a panel per recovery kind, a line per method."""
    dense = next((c for c in cells if c["method"] == DENSE), None)
    domains = heldout_domains(cells, calibration)
    if dense is None or not domains:
        return {}
    kinds = ["none", *dict.fromkeys(k for c in cells if (k := recovery_of(c)) != "none" and c["method"] != DENSE)]

    def worst(cell: Mapping[str, Any]) -> float | None:
        found = summary(cell, dense, domains) if cell["method"] != DENSE else None
        return None if found is None else found["worst"]

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        members = [c for c in cells if recovery_of(c) == kind and c["method"] != DENSE]
        lines = series(members, worst)
        for variant, points in lines.items():
            xs, ys, errs = zip(*points, strict=True)
            base = split_recovery(variant)[0]
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3,
                        label=method_label(base, [split_recovery(v)[0] for v in lines]))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_title("no recovery" if kind == "none" else kind, fontsize="small")
        ax.set_xlabel("retain ratio")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"worst unseen-domain ppl ratio ({', '.join(domains)})", fontsize="small")
    axes[0][-1].legend(fontsize="x-small")
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
    return {"recovery_worst": path}


def _budget_plots(cells: Sequence[Mapping[str, Any]], out: Path) -> dict[str, Path]:
    """``budget_<metric>.png``: the metric vs B per retain ratio, for each average and perplexity set."""
    metrics: list[tuple[str, Callable[[Mapping[str, Any]], float | None], str, bool]] = [
        (key, lambda c, k=key: c["summary"].get(k), title, False)
        for key, title in (("common_avg", "Common Avg"), ("bundled_avg", "Bundled Avg"))
        if any(c["summary"].get(key) is not None for c in cells)
    ]
    for dataset in datasets_of(cells):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(dataset).name)
        title = f"{dataset_label(dataset)} PPL"
        metrics.append((f"ppl_{stem}", lambda c, d=dataset: c["summary"]["ppl"].get(d), title, True))
    return {
        f"budget_{name}": plot_budget(cells, value, label, out / f"budget_{name}.png", log=log)
        for name, value, label, log in metrics
    }


def budget_series(
    cells: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None]
) -> dict[float, dict[str, list[tuple[int, float]]]]:
    """{retain: {"fixed": [(B used, value)] sorted by B, "auto": [(B chosen, value)]}} over a B sweep."""
    out: dict[float, dict[str, list[tuple[int, float]]]] = {}
    for cell in sweep_cells(cells):
        v, b = value(cell), budget_used(cell)
        if v is None or b is None:
            continue
        kind = "auto" if variant_of(cell).endswith("@Bauto") else "fixed"
        out.setdefault(float(cell["retain"]), {"fixed": [], "auto": []})[kind].append((int(b), float(v)))
    for series_ in out.values():
        series_["fixed"].sort()
    return out


def plot_budget(
    cells: Sequence[Mapping[str, Any]],
    value: Callable[[Mapping[str, Any]], float | None],
    label: str,
    path: Path,
    log: bool = False,
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for retain, points in sorted(budget_series(cells, value).items(), reverse=True):
        line = None
        if points["fixed"]:
            xs, ys = zip(*points["fixed"], strict=True)
            (line,) = ax.plot(xs, ys, marker="o", label=f"retain {retain:.0%}")
        for b, v in points["auto"]:
            color = line.get_color() if line is not None else None
            ax.plot([b], [v], marker="*", markersize=14, linestyle="", color=color, label=f"auto, retain {retain:.0%}")
    if log:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # B is a count of experts
    ax.set_xlabel("protect budget B (as used: at most K)")
    ax.set_ylabel(label)
    ax.set_title(f"TB-Coverage: {label} vs protect budget", fontsize="small")
    return _save(plt, fig, ax, path)


def ranking_overlap(scores: torch.Tensor, k: int) -> list[float]:
    """Per MoE layer, mean over corpus pairs of |top-k(A) ∩ top-k(B)| / k; ``scores`` is [corpora, layers, N]."""
    top = scores.topk(k, dim=-1).indices  # [corpora, layers, k]
    layers = scores.shape[1]
    pairs = list(itertools.combinations(range(scores.shape[0]), 2))
    out = []
    for layer in range(layers):
        shared = [len(set(top[a, layer].tolist()) & set(top[b, layer].tolist())) / k for a, b in pairs]
        out.append(statistics.fmean(shared) if shared else 1.0)
    return out


def plot_overlap(scores: torch.Tensor, layer_ids: Sequence[int], names: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    num_experts = scores.shape[-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for fraction in OVERLAP_FRACTIONS:
        k = max(1, round(fraction * num_experts))
        label = f"K={k} ({fraction:.0%} of {num_experts})"
        ax.plot(list(layer_ids), ranking_overlap(scores, k), marker="o", label=label)
    ax.set_xticks(list(layer_ids))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("top-K overlap")
    ax.set_title(f"REAP top-K agreement between corpora ({', '.join(names)})", fontsize="small")
    return _save(plt, fig, ax, path)


def _save(plt, fig, ax, path: Path) -> Path:
    """Legend, grid, tight layout, PNG at 120 dpi, and the figure closed (matplotlib keeps them otherwise)."""
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
    return path


def _savefig(fig: Any, path: Path) -> None:
    """A PNG written like every other output (io.atomic_file: no link followed, renamed in when complete)."""
    with atomic_file(path) as handle:
        fig.savefig(handle, dpi=120, format="png")
