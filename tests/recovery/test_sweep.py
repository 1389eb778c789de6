"""Recovery on every MoE architecture the sweep builds: router-kd trains only routing tensors wherever pruning
works; merge merges or refuses with its reason (docs/support_matrix.md shows the same cases)."""

from __future__ import annotations

import pytest

from tests.arch_sweep import moe_model_types, run_recovery_case

MODEL_TYPES = moe_model_types()
# Merge tracebacks known at the time of writing (recovery.merge's expert forward on Inkling 2's softcapped
# SwiGLU experts): listed so that a fix shows up here as an unexpected pass.
MERGE_TRACEBACKS = {"inkling2_text", "inkling2_loop_text"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_router_kd_and_merge_work_or_refuse(model_type: str) -> None:
    kd, merge = run_recovery_case(model_type)
    if kd.status != "exact" and (kd.status, kd.reason) == (merge.status, merge.reason):
        # building or planning the tiny model failed, before any recovery: test_architecture_sweep's case
        pytest.skip(f"pruning itself: {kd.status}: {kd.reason[:80]}")
    assert kd.status == "exact", f"{model_type}: router-kd {kd.status}: {kd.reason}"
    if model_type in MERGE_TRACEBACKS:
        pytest.xfail(f"merge: {merge.reason}")
    assert merge.status in ("exact", "refused"), f"{model_type}: merge {merge.status}: {merge.reason}"
    if merge.status == "refused":
        assert merge.reason.startswith("--recover merge cannot merge"), merge.reason
