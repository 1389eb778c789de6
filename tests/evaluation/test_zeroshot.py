"""lm-eval runs offline on the bundled tasks with an in-memory model; Common Avg is the documented mean."""

from __future__ import annotations

import json

import pytest

from moeprune.evaluation import evaluate, save_results
from moeprune.evaluation.zeroshot import COMMON_TASKS, common_avg, expand_tasks
from tests.evaluation import bundled_tokenizer, tiny_lm

LIMIT = 8


@pytest.fixture(scope="module")
def results():
    tok = bundled_tokenizer()
    return evaluate(tiny_lm(len(tok)), tok, ppl_datasets=("wiki",), seq_len=128, max_windows=2, tasks="bundled",
                    limit=LIMIT, batch_size=8, progress=False, metadata={"model": "tiny"})


def test_bundled_tasks_run(results):
    zs = results["zero_shot"]
    assert list(zs["tasks"]) == ["bundled_wiki_cont", "bundled_web_cont", "bundled_cross_cont"]
    for metrics in zs["tasks"].values():
        assert metrics["samples"] == LIMIT
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
        assert "acc_stderr" in metrics and "acc_norm_stderr" in metrics
    mean = sum(m["acc_norm"] for m in zs["tasks"].values()) / 3
    assert zs["common_avg"] == pytest.approx(mean)
    assert set(zs["common_avg_metrics"].values()) == {"acc_norm"}
    assert zs["settings"]["num_fewshot"] == 0 and zs["settings"]["limit"] == LIMIT
    assert zs["settings"]["lm_eval_version"] == results["versions"]["lm_eval"]


def test_evaluate_record_and_save(results, tmp_path):
    ppl = results["perplexity"]["wiki"]
    assert ppl["windows"] == 2 and ppl["tokens"] == 2 * 127 and ppl["ppl"] > 1
    assert results["metadata"] == {"model": "tiny"}
    assert set(results["versions"]) >= {"torch", "transformers", "lm_eval", "moeprune"}
    assert results["footprint"]["params_routed_experts"] > 0
    path = save_results(results, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))


def test_common_avg_metric_table():
    per_task = {
        "arc_challenge": {"acc": 0.1, "acc_norm": 0.2},
        "winogrande": {"acc": 0.6, "acc_norm": 0.9},  # table: acc, even though acc_norm is there
        "mmlu": {"acc": 0.3},  # not in the table, no acc_norm: acc
        "gsm8k": {"exact_match@strict-match": 0.05},  # no acc metric: left out
    }
    avg, used = common_avg(per_task)
    assert used == {"arc_challenge": "acc_norm", "winogrande": "acc", "mmlu": "acc"}
    assert avg == pytest.approx((0.2 + 0.6 + 0.3) / 3)


def test_expand_tasks():
    assert expand_tasks("common") == list(COMMON_TASKS)
    assert expand_tasks(["bundled_wiki_cont,bundled", "mmlu"]) == [
        "bundled_wiki_cont", "bundled_web_cont", "bundled_cross_cont", "mmlu"]
