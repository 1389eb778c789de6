"""Tables from a list of experiment cells (pure functions: cells in, markdown/CSV strings out).

A cell is what ``experiment.run_cell`` writes: ``{"cell", "method", "retain", "seed", "kept_per_layer",
"summary": {"ppl": {dataset: ppl}, "tasks": {task: value}, "task_metrics": {task: metric},
"common_avg", "params", "bytes", "params_ratio", "bytes_ratio"}}``; the dense cell has method "dense".

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

DENSE = "dense"
METHOD_NAMES = {
    DENSE: "Dense",
    "random": "Random",
    "frequency": "Frequency",
    "reap": "REAP",
    "mean-score": "Mean-score",
    "max-score": "Max-score",
    "expert-sparsity": "ExpertSparsity",
    "tb-coverage": "TB-Coverage",
}
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
    "heldout_order": "order",
    "heldout_domain": "domain",
    "heldout_cloze": "cloze",
}
MISSING = "–"
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
    if any(c["summary"].get("common_avg") is not None for c in cells):
        cols.append(("common_avg", "Common Avg ↑", "high"))
    return [*cols, ("params_ratio", "Params (× dense)", ""), ("bytes_ratio", "Bytes (× dense)", "")]


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
    if key.startswith("task:") or key == "common_avg":
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
        rows.setdefault((float(cell["retain"]), cell["method"]), []).append(cell)
    methods = _ordered(c["method"] for c in cells)
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
            lines.append(_row([_retain_label(members[0]), _method_label(method, members), *texts]))
    return "\n".join(lines)


def _retain_label(cell: Mapping[str, Any]) -> str:
    if cell["method"] == DENSE:
        return "100%"
    k = cell.get("kept_per_layer")
    return f"{100 * float(cell['retain']):.0f}%" + (f" (K={k})" if k is not None else "")


def _method_label(method: str, members: Sequence[Mapping[str, Any]]) -> str:
    name = METHOD_NAMES.get(method, method)
    return f"{name} ({len(members)} seeds)" if len(members) > 1 else name


def _header(names: Sequence[str]) -> str:
    return _row(names) + "\n" + _row(["---"] * len(names))


def _row(texts: Sequence[str]) -> str:
    return "| " + " | ".join(texts) + " |"


def common_avg_note(cells: Sequence[Mapping[str, Any]]) -> str:
    """Which metric each task contributes to Common Avg, as recorded in the cells."""
    used: dict[str, str] = {}
    for cell in cells:
        used.update(cell["summary"].get("task_metrics", {}))
    if not used:
        return ""
    by_metric: dict[str, list[str]] = {}
    for task, metric in used.items():
        by_metric.setdefault(metric, []).append(TASK_NAMES.get(task, task))
    parts = "; ".join(f"{metric} for {', '.join(tasks)}" for metric, tasks in by_metric.items())
    return (
        f"Common Avg is the unweighted mean over the {len(used)} tasks of one metric each: {parts}. "
        "Accuracies in percent, 0-shot (lm-evaluation-harness)."
    )


# ------------------------------------------------------------------------------------------------ Table 2
def table2(cells: Sequence[Mapping[str, Any]], ours: str = "tb-coverage", baseline: str = "random") -> str:
    """Markdown: per retain ratio each ``baseline`` seed, ``ours``, and on how many seeds ours is better."""
    keys = [(f"ppl:{d}", f"{dataset_label(d)} PPL ↓", "low") for d in datasets_of(cells)]
    if any(c["summary"].get("common_avg") is not None for c in cells):
        keys.append(("common_avg", "Common Avg ↑", "high"))
    lines = [_header(["Retain", "Mask", *(h for _, h, _ in keys)])]
    found = False
    for retain, method, members in group_rows(cells):
        if method != baseline:
            continue
        mine = [c for c in cells if c["method"] == ours and float(c["retain"]) == retain]
        if not mine:
            continue
        found = True
        lines.extend(_seed_rows(members, mine[0], keys, baseline, ours))
    return "\n".join(lines) if found else ""


def _seed_rows(
    seeds: Sequence[Mapping[str, Any]], mine: Mapping[str, Any], keys, baseline: str, ours: str
) -> list[str]:
    label = _retain_label(mine)
    name = METHOD_NAMES.get(baseline, baseline)
    ordered = sorted(seeds, key=lambda c: c.get("seed") or 0)
    rows = [
        _row([label, f"{name} seed {c.get('seed')}", *(_fmt(k, _value(c, k)) for k, _, _ in keys)]) for c in ordered
    ]
    rows.append(_row([label, f"**{METHOD_NAMES.get(ours, ours)}**", *(_fmt(k, _value(mine, k)) for k, _, _ in keys)]))
    wins = [beats(mine, ordered, k, better) for k, _, better in keys]
    rows.append(_row([label, f"{METHOD_NAMES.get(ours, ours)} better than", *wins]))
    return rows


def beats(mine: Mapping[str, Any], others: Sequence[Mapping[str, Any]], key: str, better: str) -> str:
    """ "w/n": on how many of ``others`` ``mine`` is strictly better at ``key``."""
    own = _value(mine, key)
    values = [v for c in others if (v := _value(c, key)) is not None]
    if own is None or not values:
        return MISSING
    wins = sum(own < v if better == "low" else own > v for v in values)
    return f"{wins}/{len(values)}"


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
    note = common_avg_note(cells)
    if note:
        parts.append(note)
    parts.append(
        "Random: mean ± sample standard deviation over its seeds. Bold: best of the retain group "
        "(lowest PPL, highest accuracy). Params/Bytes: the pruned model's parameters and bytes over "
        "the dense model's."
    )
    second = table2(cells)
    if second:
        parts += ["## Table 2: TB-Coverage against each random seed", second]
    parts += _coverage_section(cells, settings)
    if images:
        parts += ["## Plots", "\n".join(f"![{name}]({path})" for name, path in images.items())]
    return "\n\n".join(parts) + "\n"


def _coverage_section(cells: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> list[str]:
    """Perplexity on the domains calibration never saw, as a ratio to dense (see evaluation/coverage.py)."""
    from moeprune.evaluation.coverage import coverage_table, wins_against_seeds

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


def _settings_text(settings: Mapping[str, Any]) -> str:
    if not settings:
        return ""
    cal, ev = settings.get("calibration", {}), settings.get("evaluation", {})
    return (
        f"Calibration: {', '.join(cal.get('corpora', []))}, {cal.get('samples')} x {cal.get('seq_len')} tokens; "
        f"perplexity windows of {ev.get('ppl_seq_len')} tokens; tasks: {', '.join(ev.get('tasks', [])) or 'none'}"
        f" (limit {ev.get('limit')}); random seeds {settings.get('seeds')}."
    )


def to_csv(cells: Sequence[Mapping[str, Any]]) -> str:
    """One row per cell: identifiers, ppl per dataset, each task's Common Avg metric, Common Avg, footprint."""
    datasets, tasks = datasets_of(cells), tasks_of(cells)
    fields = [
        "cell",
        "method",
        "retain",
        "seed",
        "kept_per_layer",
        *(f"ppl_{d}" for d in datasets),
        *tasks,
        "common_avg",
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
        row = {k: cell.get(k) for k in fields[:5]}
        row.update({f"ppl_{d}": s.get("ppl", {}).get(d) for d in datasets})
        row.update({t: s.get("tasks", {}).get(t) for t in tasks})
        row.update({k: s.get(k) for k in fields[-5:]})
        writer.writerow(row)
    return buffer.getvalue()
