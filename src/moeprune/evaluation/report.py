"""Tables from a list of experiment cells (pure functions: cells in, markdown/CSV strings out).

A cell is what ``experiment.run_cell`` writes: ``{"cell", "method", "retain", "seed", "kept_per_layer",
"variant", "summary": {"ppl": {dataset: ppl}, "tasks": {task: value}, "task_metrics": {task: metric},
"common_avg", "bundled_avg", "params", "bytes", "params_ratio", "bytes_ratio"}}``; the dense cell has
method "dense". Rows are told apart by ``variant`` (the method, or e.g. ``reap@code`` for REAP ranked on
one corpus, ``tb-coverage@B4`` in a protect-budget sweep).

Table 1 follows the paper's Table 1: a Dense row, then one group per retain ratio with a row per method
(random as mean ± sample std over its seeds), the best value of each group in bold. Table 2 sets each
random seed against TB-Coverage.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moeprune.evaluation.coverage import DENSE, coverage_table, recovery_table, wins_against_seeds

DATASET_NAMES = {"wikitext2": "WikiText2", "c4": "C4"}
TASK_NAMES = {
    "arc_challenge": "ARC-c",
    "arc_easy": "ARC-e",
    "hellaswag": "HellaSwag",
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "boolq": "BoolQ",
    "bundled_wiki_cont": "wiki-cont",
    "bundled_web_cont": "web-cont",
    "bundled_cross_cont": "cross-cont",
    "mmlu": "MMLU (5-shot)",
    "gsm8k": "GSM8K (5-shot)",
    "minerva_math500": "MATH-500 (4-shot)",
    "heldout_order": "order",
    "heldout_domain": "domain",
    "heldout_cloze": "cloze",
}
# Recovery kinds (a cell's variant ends in "+<kind>", e.g. reap+router-kd; method names hold no "+").
RECOVERY_NAMES = {"router-kd": "Router KD", "merge": "Merge", "merge+router-kd": "Merge + Router KD"}
AVERAGES = {"common_avg": "Common Avg ↑", "bundled_avg": "Bundled Avg ↑"}
CLAMPED = "†"  # marks TB-Coverage rows whose B >= K (round-robin alone, candidate unused)
MISSING = "–"
COMMON_SIX = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "boolq")  # = zeroshot.COMMON_TASKS
Stat = tuple[float, float | None]  # (mean, std over seeds or None)


# ------------------------------------------------------------------------------------------------ columns
def datasets_of(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    return _ordered(name for c in cells for name in c["summary"].get("ppl", {}))


def tasks_of(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    return _ordered(name for c in cells for name in c["summary"].get("tasks", {}))


def dataset_label(dataset: str) -> str:
    """WikiText2 / C4 as the paper writes them; a local file by its file name."""
    return DATASET_NAMES.get(dataset, Path(dataset).name)


def _ordered(names) -> list[str]:
    return list(dict.fromkeys(names))


def _columns(cells: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(key, header, better) per metric column; better is "low", "high" or "" (not ranked)."""
    cols = [(f"ppl:{d}", f"{dataset_label(d)} PPL ↓", "low") for d in datasets_of(cells)]
    cols += [(f"task:{t}", TASK_NAMES.get(t, t), "high") for t in tasks_of(cells)]
    cols += [(key, header, "high") for key, header in AVERAGES.items() if _has(cells, key)]
    return [*cols, ("params_ratio", "Params (× dense)", ""), ("bytes_ratio", "Bytes (× dense)", "")]


def _has(cells: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(c["summary"].get(key) is not None for c in cells)


def variant_of(cell: Mapping[str, Any]) -> str:
    """The row a cell belongs to: its variant (cells written before variants existed: the method)."""
    return str(cell.get("variant") or (cell.get("mask") or {}).get("variant") or cell["method"])


def candidate_unused(cell: Mapping[str, Any]) -> bool:
    """TB-Coverage with B >= K: the mask's record, or (older cells) B equal to K."""
    mask = cell.get("mask") or {}
    if mask.get("candidate_used") is not None:
        return not mask["candidate_used"]
    budget, kept = mask.get("protect_budget"), mask.get("kept_per_layer")
    return budget is not None and kept is not None and budget >= kept


def _name(method: str) -> str:
    """The method as tables print it (its registry label; "Dense" for the unpruned model)."""
    from moeprune.planning import registry  # lazy: planning pulls in torch, a report reads only result files

    return "Dense" if method == DENSE else registry.label(method)


def split_recovery(variant: str) -> tuple[str, str]:
    """``reap+router-kd`` -> ("reap", "router-kd"); a plain variant -> (variant, "none")."""
    base, _, kind = variant.partition("+")
    return base, kind or "none"


def recovery_of(cell: Mapping[str, Any]) -> str:
    """The cell's recovery kind ("none" for plain pruning and the dense cell)."""
    return str(cell.get("recover") or split_recovery(variant_of(cell))[1])


def method_label(variant: str, variants: Sequence[str] = ()) -> str:
    """``reap@code`` -> "REAP (code)", ``tb-coverage@B4`` -> "TB-Coverage (B=4)", ``reap+router-kd`` ->
    "REAP + Router KD"; plain REAP is "REAP (generic)" when a corpus-calibrated REAP is in the same table."""
    from moeprune.planning import registry  # lazy: planning pulls in torch, a report reads only result files

    variant, kind = split_recovery(variant)
    if kind != "none":
        return f"{method_label(variant, variants)} + {RECOVERY_NAMES.get(kind, kind)}"
    method, _, detail = variant.partition("@")
    name = _name(method)
    spec = registry.REGISTRY.get(method)
    if detail.startswith("B") and spec is not None and spec.protects:
        return f"{name} (B={detail[1:]})"
    if detail:
        return f"{name} ({detail})"
    if spec is not None and spec.one_corpus and any(v.startswith(f"{method}@") for v in variants):
        return f"{name} (generic)"
    return name


def _value(cell: Mapping[str, Any], key: str) -> float | None:
    summary = cell["summary"]
    if key.startswith("ppl:"):
        return summary.get("ppl", {}).get(key[4:])
    if key.startswith("task:"):
        return summary.get("tasks", {}).get(key[5:])
    return summary.get(key)


def _stat(cells: Sequence[Mapping[str, Any]], key: str) -> Stat | None:
    values = [v for c in cells if (v := _value(c, key)) is not None]
    if not values:
        return None
    if len(cells) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(key: str, value: float | None) -> str:
    """PPL as is, accuracies in percent (as the paper prints them), ratios with 3 decimals."""
    if value is None:
        return MISSING
    if key.startswith("task:") or key in AVERAGES:
        return f"{100 * value:.2f}"
    if key.endswith("_ratio"):
        return f"{value:.3f}"
    return f"{value:.2f}"


def _cell_text(key: str, stat: Stat | None, bold: bool) -> str:
    if stat is None:
        return MISSING
    # Footprints are the same for every seed (same K), so no ± there.
    spread = stat[1] is not None and not key.endswith("_ratio")
    text = _fmt(key, stat[0]) + (f" ± {_fmt(key, stat[1])}" if spread else "")
    return f"**{text}**" if bold else text


# ------------------------------------------------------------------------------------------------ Table 1
def group_rows(cells: Sequence[Mapping[str, Any]]) -> list[tuple[float, str, list[Mapping[str, Any]]]]:
    """(retain, method, cells) per table row: dense first, then retain ratios high to low, methods in the
    order they first appear; a seeded method's seeds share one row."""
    rows: dict[tuple[float, str], list[Mapping[str, Any]]] = {}
    for cell in cells:
        rows.setdefault((float(cell["retain"]), variant_of(cell)), []).append(cell)
    methods = _ordered(variant_of(c) for c in cells)
    order = sorted(rows, key=lambda rm: (rm[1] != DENSE, -rm[0], methods.index(rm[1])))
    return [(retain, method, rows[(retain, method)]) for retain, method in order]


def _best(stats: list[Stat | None], key: str, better: str) -> set[int]:
    """Indices whose shown value equals the best shown value (ties are all bold)."""
    shown = [(i, s[0]) for i, s in enumerate(stats) if s is not None]
    if not better or not shown:
        return set()
    pick = min if better == "low" else max
    best = _fmt(key, pick(v for _, v in shown))
    return {i for i, v in shown if _fmt(key, v) == best}


def table1(cells: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: Dense on top, then per retain ratio one row per method; best per group in bold."""
    cols = _columns(cells)
    lines = [_header(["Retain", "Method", *(h for _, h, _ in cols)])]
    variants = _ordered(variant_of(c) for c in cells)
    groups: dict[float, list[tuple[str, list[Mapping[str, Any]]]]] = {}
    for retain, method, members in group_rows(cells):
        groups.setdefault(-1.0 if method == DENSE else retain, []).append((method, members))
    for retain, rows in groups.items():
        stats = [[_stat(members, key) for key, _, _ in cols] for _, members in rows]
        bold = [
            set() if retain < 0 else _best([s[j] for s in stats], key, better)
            for j, (key, _, better) in enumerate(cols)
        ]
        for i, (method, members) in enumerate(rows):
            texts = [_cell_text(key, stats[i][j], i in bold[j]) for j, (key, _, _) in enumerate(cols)]
            lines.append(_row([_retain_label(members[0]), _method_label(method, members, variants), *texts]))
    return "\n".join(lines)


def _retain_label(cell: Mapping[str, Any]) -> str:
    if cell["method"] == DENSE:
        return "100%"
    k = cell.get("kept_per_layer")
    return f"{100 * float(cell['retain']):.0f}%" + (f" (K={k})" if k is not None else "")


def _method_label(variant: str, members: Sequence[Mapping[str, Any]], variants: Sequence[str] = ()) -> str:
    name = method_label(variant, variants) + (CLAMPED if any(candidate_unused(c) for c in members) else "")
    return f"{name} ({len(members)} seeds)" if len(members) > 1 else name


def _header(names: Sequence[str]) -> str:
    return _row(names) + "\n" + _row(["---"] * len(names))


def _row(texts: Sequence[str]) -> str:
    return "| " + " | ".join(texts) + " |"


def common_avg_note(cells: Sequence[Mapping[str, Any]]) -> str:
    """What each task column and average is, from the metrics recorded in the cells."""
    used: dict[str, str] = {}
    for cell in cells:
        used.update(cell["summary"].get("task_metrics", {}))
    if not used:
        return ""
    by_metric: dict[str, list[str]] = {}
    for task, metric in used.items():
        by_metric.setdefault(metric, []).append(TASK_NAMES.get(task, task))
    parts = "; ".join(f"{metric} for {', '.join(tasks)}" for metric, tasks in by_metric.items())
    lines = [f"Task columns (lm-evaluation-harness; 0-shot unless marked, accuracies in percent): {parts}."]
    if _has(cells, "common_avg"):
        lines.append(
            "Common Avg: the unweighted mean over the six tasks ARC-c, ARC-e, HellaSwag, PIQA, WinoGrande and "
            "BoolQ only (other tasks, such as the stress tests, never enter it)."
        )
    elif any(t in COMMON_SIX for t in used):
        lines.append("Common Avg: not reported, since not all six of its tasks were evaluated.")
    if _has(cells, "bundled_avg"):
        lines.append(
            "Bundled Avg: the mean over the testbed's offline tasks (the heldout tasks when they ran, else the three "
            "continuation tasks; not the paper's Common Avg)."
        )
    return " ".join(lines)


def clamp_note(cells: Sequence[Mapping[str, Any]]) -> str:
    """Which TB-Coverage rows had B >= K, so that the candidate played no part."""
    hit = [c for c in cells if candidate_unused(c)]
    if not hit:
        return ""
    where = sorted({(float(c["retain"]), c.get("kept_per_layer"), _budget_text(c)) for c in hit}, reverse=True)
    text = "; ".join(f"{100 * r:.0f}% (K={k}, {b})" for r, k, b in where)
    names = ", ".join(sorted({str((c.get("mask") or {}).get("candidate")) for c in hit}))
    return (
        f"{CLAMPED} TB-Coverage with B >= K at {text}: B is clamped to K, so every kept expert is protected by "
        f"round-robin over the corpus rankings and the candidate ({names}) is not used; those rows are the "
        "round-robin alone."
    )


def _budget_text(cell: Mapping[str, Any]) -> str:
    mask = cell.get("mask") or {}
    asked, used = mask.get("protect_budget_requested"), mask.get("protect_budget")
    return f"B={asked} asked, {used} used" if asked is not None and asked != used else f"B={used}"


# ------------------------------------------------------------------------------------------------ Table 2
def table2(cells: Sequence[Mapping[str, Any]], ours: str = "tb-coverage", baseline: str = "random") -> str:
    """Markdown: per retain ratio each ``baseline`` seed, ``ours``, and on how many seeds ours is better."""
    keys = [(f"ppl:{d}", f"{dataset_label(d)} PPL ↓", "low") for d in datasets_of(cells)]
    keys += [(key, header, "high") for key, header in AVERAGES.items() if _has(cells, key)]
    lines = [_header(["Retain", "Mask", *(h for _, h, _ in keys)])]
    found = False
    for retain, method, members in group_rows(cells):
        if method != baseline:
            continue
        mine = [c for c in cells if variant_of(c) == ours and float(c["retain"]) == retain]
        if not mine:
            continue
        found = True
        lines.extend(_seed_rows(members, mine[0], keys, baseline, ours))
    return "\n".join(lines) if found else ""


def _seed_rows(
    seeds: Sequence[Mapping[str, Any]], mine: Mapping[str, Any], keys, baseline: str, ours: str
) -> list[str]:
    label = _retain_label(mine)
    name = _name(baseline)
    ordered = sorted(seeds, key=lambda c: c.get("seed") or 0)
    rows = [
        _row([label, f"{name} seed {c.get('seed')}", *(_fmt(k, _value(c, k)) for k, _, _ in keys)]) for c in ordered
    ]
    rows.append(_row([label, f"**{_name(ours)}**", *(_fmt(k, _value(mine, k)) for k, _, _ in keys)]))
    wins = [beats(mine, ordered, k, better) for k, _, better in keys]
    rows.append(_row([label, f"{_name(ours)} better than", *wins]))
    return rows


def beats(mine: Mapping[str, Any], others: Sequence[Mapping[str, Any]], key: str, better: str) -> str:
    """ "w/n": on how many of ``others`` ``mine`` is strictly better at ``key``."""
    own = _value(mine, key)
    values = [v for c in others if (v := _value(c, key)) is not None]
    if own is None or not values:
        return MISSING
    wins = sum(own < v if better == "low" else own > v for v in values)
    return f"{wins}/{len(values)}"


# ------------------------------------------------------------------------------------------------ B sweep
def sweep_cells(cells: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """TB-Coverage cells of a protect-budget sweep (variants ``tb-coverage@B<b>``)."""
    return [c for c in cells if variant_of(c).startswith("tb-coverage@B")]


def budget_used(cell: Mapping[str, Any]) -> int | None:
    return (cell.get("mask") or {}).get("protect_budget")


def budget_table(cells: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per retain ratio (high to low) each B of the sweep, as asked and as used, and the metrics."""
    sweep = sweep_cells(cells)
    if not sweep:
        return ""
    keys = [(f"ppl:{d}", f"{dataset_label(d)} PPL ↓") for d in datasets_of(cells)]
    keys += [(key, header) for key, header in AVERAGES.items() if _has(cells, key)]
    lines = [_header(["Retain", "B asked", "B used", *(h for _, h in keys)])]
    ordered = sorted(sweep, key=lambda c: (-float(c["retain"]), budget_used(c) or 0, variant_of(c)))
    for cell in ordered:
        asked = variant_of(cell).split("@B", 1)[1]
        used = f"{budget_used(cell)}{CLAMPED if candidate_unused(cell) else ''}"
        lines.append(_row([_retain_label(cell), asked, used, *(_fmt(k, _value(cell, k)) for k, _ in keys)]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ files
def render_report(
    cells: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any] | None = None,
    images: Mapping[str, str | Path] | None = None,
) -> str:
    """The whole report.md: settings, Table 1 with its note, Table 2, the plots."""
    settings = settings or {}
    parts = [
        f"# Expert pruning: {settings.get('model', 'model')}",
        _settings_text(settings),
        "## Table 1: methods per retain ratio",
        table1(cells),
    ]
    parts += [note for note in (common_avg_note(cells), clamp_note(cells)) if note]
    parts.append(
        "Random: mean ± sample standard deviation over its seeds. Bold: best of the retain group "
        "(lowest PPL, highest accuracy). Params/Bytes: the pruned model's parameters and bytes over "
        "the dense model's."
    )
    second = table2(cells)
    if second:
        parts += ["## Table 2: TB-Coverage against each random seed", second]
    sweep = budget_table(cells)
    if sweep:
        parts += [
            "## Protect budget sensitivity",
            sweep,
            "B used: B asked, clamped to K; `auto` picks B per ratio by held-out NLL on the calibration corpora "
            "(never evaluation data; the tried budgets and scores are in the mask's `extra.auto_budget`).",
        ]
    parts += _coverage_section(cells, settings)
    parts += _recovery_section(cells, settings)
    if images:
        parts += ["## Plots", "\n".join(f"![{name}]({path})" for name, path in images.items())]
    return "\n\n".join(parts) + "\n"


def _coverage_section(cells: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> list[str]:
    """Perplexity on the domains calibration never saw, as a ratio to dense (see evaluation/coverage.py)."""
    calibration = settings.get("calibration", {}).get("corpora", [])
    table = coverage_table(cells, calibration)
    if not table:
        return []
    wins = wins_against_seeds(cells, calibration, "tb-coverage")
    note = (
        "Each entry is the pruned model's perplexity on a domain that calibration never used, divided by the "
        "dense model's (1.000 = nothing lost); worst and mean over those domains."
    )
    if wins:
        note += (
            " TB-Coverage's worst-domain ratio is lower than that many random seeds: "
            + ", ".join(f"{100 * r:.0f}% {w}" for r, w in sorted(wins.items(), reverse=True))
            + "."
        )
    return ["## Unseen-domain coverage", table, note]


def _recovery_section(cells: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> list[str]:
    """Each method with and without recovery: the worst unseen-domain ratio per kind."""
    rec = settings.get("recovery")
    table = recovery_table(cells, settings.get("calibration", {}).get("corpora", []))
    if not rec or not table:
        return []
    corpora = ", ".join(rec.get("corpora") or []) or "the profiled corpora"
    note = (
        f"Recovery calibration: {rec.get('samples')} windows x {rec.get('seq_len')} tokens of {corpora} (train "
        f"splits, sampling seed {rec.get('data_seed')}); router KD: {rec.get('epochs')} epochs, Adam lr "
        f"{rec.get('lr')}, batch {rec.get('batch_size')}, seed {rec.get('seed')} (docs/recovery.md). Entries: "
        "worst unseen-domain perplexity ratio to dense (lower is better), and in brackets the change against the "
        "same method without recovery."
    )
    return ["## Recovery after pruning", table, note]


def _settings_text(settings: Mapping[str, Any]) -> str:
    if not settings:
        return ""
    cal, ev = settings.get("calibration", {}), settings.get("evaluation", {})
    reap = cal.get("reap_corpus")
    extras = f"; REAP (code) on {reap['corpus']}, {reap['samples']} x {reap['seq_len']} tokens" if reap else ""
    if cal.get("protect_budget") is not None:
        extras += f"; TB-Coverage B: {cal['protect_budget']}"
    return (
        f"Calibration: {', '.join(cal.get('corpora', []))}, {cal.get('samples')} x {cal.get('seq_len')} tokens"
        f"{extras}; perplexity windows of {ev.get('ppl_seq_len')} tokens; tasks: "
        f"{', '.join(ev.get('tasks', [])) or 'none'} (limit {ev.get('limit')}); random seeds {settings.get('seeds')}."
    )


def to_csv(cells: Sequence[Mapping[str, Any]]) -> str:
    """One row per cell: identifiers, ppl per dataset, each task's metric, the averages, footprint."""
    datasets, tasks = datasets_of(cells), tasks_of(cells)
    fields = [
        "cell",
        "method",
        "variant",
        "retain",
        "seed",
        "kept_per_layer",
        "recover",
        *(f"ppl_{d}" for d in datasets),
        *tasks,
        "common_avg",
        "bundled_avg",
        "params",
        "bytes",
        "params_ratio",
        "bytes_ratio",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        s = cell["summary"]
        row = {k: cell.get(k) for k in fields[:7]}
        row["variant"] = variant_of(cell)
        row["recover"] = None if cell["method"] == DENSE else recovery_of(cell)
        row.update({f"ppl_{d}": s.get("ppl", {}).get(d) for d in datasets})
        row.update({t: s.get("tasks", {}).get(t) for t in tasks})
        row.update({k: s.get(k) for k in fields[-6:]})
        writer.writerow(row)
    return buffer.getvalue()
