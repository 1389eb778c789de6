"""Write docs/support_matrix.md: every MoE causal LM of the installed transformers, pruned or refused.

Runs the same sweep as tests/test_architecture_sweep.py (tests/arch_sweep.py): a tiny random model per
model type, profile -> plan -> apply (export + reload), reloaded logits compared with the dense model
whose removed experts are taken out of routing; then expert-sparsity planning (its routing guard and the
reconstruction loss checked against the model's own MoE block output); then recovery: router-kd a few
steps on the REAP mask, and whether merge can merge the expert layout.

    PYTHONPATH=src:. python scripts/support_matrix.py [--out docs/support_matrix.md] [MODEL_TYPE ...]
"""

from __future__ import annotations

import argparse
import logging
import re
import time
import warnings
from pathlib import Path

import torch
import transformers

from tests.arch_sweep import (
    ATOL,
    CaseResult,
    moe_model_types,
    run_case,
    run_reconstruction_case,
    run_recovery_case,
    run_stream_case,
)

STATUS = {"exact": "exact", "refused": "refused", "wrong": "**WRONG**", "error": "**traceback**"}


STREAM_HELP = (
    "Column *stream* (`--stream`, weights read from disk one decoder layer at a time; `tests/arch_sweep.py` "
    "`run_stream_case`): *exact* when the model saved and streamed back through transformers' own conversions gives "
    "the in-memory profile (counts equal, sums to 1e-5) and logits (to the *exact* tolerance above); *refused* with "
    "the reason (a model whose layers hand the next one more than their hidden states cannot run layer by layer).")


def render(results: list[CaseResult], recon: dict[str, CaseResult] | None = None,
           recovery: dict[str, tuple[CaseResult, CaseResult]] | None = None,
           stream: dict[str, CaseResult] | None = None) -> str:
    counts = {status: sum(r.status == status for r in results) for status in STATUS}
    lines = [
        "# Support matrix",
        "",
        f"Every MoE causal-LM model type of transformers {transformers.__version__} (torch {torch.__version__}), "
        "swept by `scripts/support_matrix.py` (the same code as `tests/test_architecture_sweep.py`): a tiny "
        "random model per type (8 experts, top-2 where the family allows it, a dense layer and routing groups "
        "where the family has them), profiled, planned with REAP at retain 0.5, exported, reloaded, and its "
        "logits compared with the dense model whose removed experts are taken out of routing (router logits "
        f"at -inf, choice bias at -inf). *exact*: max |diff| <= {ATOL:g}. *refused*: moeprune stops with a "
        "`MoePruneError` naming the reason.",
        "",
        "Column *expert-sparsity*: planning with the reconstruction baseline (`tests/arch_sweep.py` "
        "`run_reconstruction_case`, see docs/expert_sparsity.md): *exact* when its routing guard passes and every "
        "layer's reconstruction loss equals the change of the model's own MoE block output to 1e-4; *refused* "
        "(the guard's finding in brackets) where moeprune's routing rules do not reproduce the router.",
        "",
        "Columns *router-kd* and *merge* (`--recover`, docs/recovery.md; `tests/arch_sweep.py` `run_recovery_case`): "
        "*yes* when router KD trains only routing tensors (router weight and bias, shared-expert gate) a few steps "
        "on the REAP mask, the trained tensors change the KL (noted where it rose on the random tiny model) and the "
        "dense model is left bit-identical, and when merge accepts the expert layout and replaces only kept "
        "experts' tensors; *no* with the reason where moeprune refuses it.",
        "",
        STREAM_HELP,
        "",
        f"**{counts['exact']} exact, {counts['refused']} refused, {counts['wrong']} wrong, "
        f"{counts['error']} tracebacks** of {len(results)} model types.",
        *_recon_counts(recon),
        *_recovery_counts(recovery),
        *_stream_counts(stream),
        "",
        "| model type | status | max abs diff | expert-sparsity | router-kd | merge | stream | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        diff = "" if result.diff is None else f"{result.diff:.1e}"
        reason = result.reason.replace("|", "\\|").replace("\n", " ")
        sparsity = _recon_cell((recon or {}).get(result.model_type))
        kd, merge = (_recovery_cell(r, result) for r in (recovery or {}).get(result.model_type, (None, None)))
        streamed = _stream_cell((stream or {}).get(result.model_type))
        lines.append(f"| {result.model_type} | {STATUS[result.status]} | {diff} | {sparsity} | {kd} | {merge} | "
                     f"{streamed} | {reason} |")
    return "\n".join(lines) + "\n"


def _recon_counts(recon: dict[str, CaseResult] | None) -> list[str]:
    if not recon:
        return []
    counts = {status: sum(r.status == status for r in recon.values()) for status in STATUS}
    return ["", f"expert-sparsity: **{counts['exact']} exact, {counts['refused']} refused, {counts['wrong']} wrong, "
            f"{counts['error']} tracebacks**."]


def _recovery_counts(recovery: dict[str, tuple[CaseResult, CaseResult]] | None) -> list[str]:
    if not recovery:
        return []
    out = []
    for i, name in enumerate(("router-kd", "merge")):
        yes = sum(r[i].status == "exact" for r in recovery.values())
        no = sum(r[i].status == "refused" for r in recovery.values())
        bad = len(recovery) - yes - no
        out.append(f"{name}: **{yes} yes, {no} no, {bad} wrong or tracebacks**.")
    return ["", " ".join(out)]


def _stream_counts(stream: dict[str, CaseResult] | None) -> list[str]:
    if not stream:
        return []
    counts = {status: sum(r.status == status for r in stream.values()) for status in STATUS}
    return ["", f"stream: **{counts['exact']} exact, {counts['refused']} refused, {counts['wrong']} wrong, "
            f"{counts['error']} tracebacks**."]


def _stream_cell(result: CaseResult | None) -> str:
    if result is None:
        return ""
    reason = f" ({result.reason.rstrip('.')})" if result.status != "exact" and result.reason else ""
    return f"{STATUS[result.status]}{reason}".replace("|", "\\|").replace("\n", " ")


def add_stream_column(markdown: str, stream: dict[str, CaseResult]) -> str:
    """The matrix with its *stream* column (re)computed for the types in ``stream``, the other cells as they were (a
    stream-only sweep); the column's count line is the whole column's."""
    lines = [line for line in markdown.splitlines() if not line.startswith("stream: **")]
    text = "\n".join(lines)
    if STREAM_HELP not in text:  # the column's description, before the count lines
        text = text.replace("\n\n**", f"\n\n{STREAM_HELP}\n\n**", 1)
    lines = re.sub(r"\n{3,}", "\n\n", text).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): i for i, line in enumerate(lines) if line.startswith("| ")}
    header = rows["model type"]
    if " stream |" not in lines[header]:
        lines[header] = lines[header].replace(" merge | reason |", " merge | stream | reason |")
        lines[header + 1] = "| --- " * 8 + "|"
        for name, i in rows.items():
            if name not in ("model type", "---"):
                cells = lines[i].split(" | ")
                lines[i] = " | ".join([*cells[:6], "", *cells[6:]])
    for name, result in stream.items():
        if name in rows:
            cells = lines[rows[name]].split(" | ")
            cells[6] = _stream_cell(result)
            lines[rows[name]] = " | ".join(cells)
    column = {name: lines[i].split(" | ")[6] for name, i in rows.items() if name not in ("model type", "---")}
    counts = {status: sum(cell.split(" (")[0] == shown for cell in column.values()) for status, shown in STATUS.items()}
    lines[header:header] = [f"stream: **{counts['exact']} exact, {counts['refused']} refused, {counts['wrong']} "
                            f"wrong, {counts['error']} tracebacks**.", ""]
    return "\n".join(lines) + "\n"


def _recovery_cell(result: CaseResult | None, pruning: CaseResult) -> str:
    """yes / no (reason) / **WRONG**; "no" without a reason where pruning itself is refused (its reason)."""
    if result is None:
        return ""
    if result.status == "exact":
        return f"yes ({result.reason} in the sweep's few steps)" if result.reason else "yes"
    if result.status == "refused":
        if pruning.status == "refused":
            return "no"
        reason = re.sub(r"^--recover merge cannot merge \S+ experts \(layer \d+\): ", "", result.reason)
        return f"no ({reason.rstrip('.')})".replace("|", "\\|")
    return STATUS[result.status]


def _recon_cell(result: CaseResult | None) -> str:
    if result is None:
        return ""
    found = re.search(r"layer \d+: (.*)\); plan with", result.reason)
    finding = f" ({found.group(1)})" if found and result.status == "refused" else ""
    return f"{STATUS[result.status]}{finding}".replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="default: every MoE causal LM of transformers")
    parser.add_argument("--out", type=Path, default=Path("docs/support_matrix.md"))
    parser.add_argument("--stream-only", action="store_true",
                        help="sweep only the stream column and write it into the existing --out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    if args.stream_only:
        stream = {}
        for model_type in args.model_types or moe_model_types():
            stream[model_type] = run_stream_case(model_type)
            print(f"{model_type:22s} {stream[model_type].status:8s} {stream[model_type].reason[:90]}", flush=True)
        args.out.write_text(add_stream_column(args.out.read_text(), stream))
        print(f"wrote {args.out}")
        return
    results, recon, recovery, stream = [], {}, {}, {}
    for model_type in args.model_types or moe_model_types():
        start = time.perf_counter()
        results.append(run_case(model_type))
        recon[model_type] = run_reconstruction_case(model_type)
        recovery[model_type] = run_recovery_case(model_type)
        stream[model_type] = run_stream_case(model_type)
        print(f"{model_type:22s} {results[-1].status:8s} {recon[model_type].status:8s} "
              f"{recovery[model_type][0].status:8s} {recovery[model_type][1].status:8s} "
              f"{time.perf_counter() - start:5.1f}s", flush=True)
    args.out.write_text(render(results, recon, recovery, stream))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
