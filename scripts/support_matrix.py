"""Write docs/support_matrix.md: every MoE causal LM of the installed transformers, pruned or refused.

Runs the same sweep as tests/test_architecture_sweep.py (tests/arch_sweep.py): a tiny random model per
model type, profile -> plan -> apply (export + reload), reloaded logits compared with the dense model
whose removed experts are taken out of routing.

    PYTHONPATH=src:. python scripts/support_matrix.py [--out docs/support_matrix.md] [MODEL_TYPE ...]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch
import transformers

from tests.arch_sweep import ATOL, CaseResult, moe_model_types, run_case

STATUS = {"exact": "exact", "refused": "refused", "wrong": "**WRONG**", "error": "**traceback**"}


def render(results: list[CaseResult]) -> str:
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
        f"**{counts['exact']} exact, {counts['refused']} refused, {counts['wrong']} wrong, "
        f"{counts['error']} tracebacks** of {len(results)} model types.",
        "",
        "| model type | status | max abs diff | reason |",
        "| --- | --- | --- | --- |",
    ]
    for result in results:
        diff = "" if result.diff is None else f"{result.diff:.1e}"
        reason = result.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {result.model_type} | {STATUS[result.status]} | {diff} | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="default: every MoE causal LM of transformers")
    parser.add_argument("--out", type=Path, default=Path("docs/support_matrix.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    results = []
    for model_type in args.model_types or moe_model_types():
        start = time.perf_counter()
        results.append(run_case(model_type))
        print(f"{model_type:22s} {results[-1].status:8s} {time.perf_counter() - start:5.1f}s", flush=True)
    args.out.write_text(render(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
