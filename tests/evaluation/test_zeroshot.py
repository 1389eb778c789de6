"""lm-eval runs offline on the bundled tasks with an in-memory model; Common Avg is the documented mean."""

from __future__ import annotations

import json

import pytest

from moeprune.evaluation import evaluate, save_results
from moeprune.evaluation.tasks import BUNDLED_TASKS
from moeprune.evaluation.zeroshot import (
    COMMON_TASKS,
    FEWSHOT,
    bundled_avg,
    common_avg,
    expand_tasks,
    task_metrics,
    zero_shot,
)
from moeprune.options import EvalSettings
from tests.evaluation import bundled_tokenizer, tiny_lm

LIMIT = 8


@pytest.fixture(scope="module")
def results():
    tok = bundled_tokenizer()
    settings = EvalSettings(ppl_datasets=("wiki",), ppl_seq_len=128, max_windows=2, tasks="bundled", limit=LIMIT,
                            eval_batch_size=8)
    return evaluate(tiny_lm(len(tok)), tok, settings, progress=False, metadata={"model": "tiny"})


def test_bundled_tasks_run(results):
    zs = results["zero_shot"]
    assert list(zs["tasks"]) == ["bundled_wiki_cont", "bundled_web_cont", "bundled_cross_cont"]
    for metrics in zs["tasks"].values():
        assert metrics["samples"] == LIMIT
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
        assert "acc_stderr" in metrics and "acc_norm_stderr" in metrics
    mean = sum(m["acc_norm"] for m in zs["tasks"].values()) / 3
    # The bundled tasks have their own average; Common Avg needs the six named tasks.
    assert zs["bundled_avg"] == pytest.approx(mean) and zs["common_avg"] is None
    assert set(zs["task_metrics"].values()) == {"acc_norm"}
    assert set(zs["settings"]["num_fewshot"].values()) == {0} and zs["settings"]["limit"] == LIMIT
    assert zs["settings"]["lm_eval_version"] == results["versions"]["lm_eval"]


def test_evaluate_record_and_save(results, tmp_path):
    ppl = results["perplexity"]["wiki"]
    assert ppl["windows"] == 2 and ppl["tokens"] == 2 * 127 and ppl["ppl"] > 1
    assert results["metadata"] == {"model": "tiny"}
    assert set(results["versions"]) >= {"torch", "transformers", "lm_eval", "moeprune"}
    assert results["footprint"]["params_routed_experts"] > 0
    path = save_results(results, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))


def _six(**extra):
    per_task = {task: {"acc": 0.1 * i, "acc_norm": 0.1 * i + 0.05} for i, task in enumerate(COMMON_TASKS, 1)}
    return {**per_task, **extra}


def test_common_avg_is_the_six_tasks_only():
    expected = (0.15 + 0.25 + 0.35 + 0.45 + 0.5 + 0.6) / 6  # acc_norm for ARC/HellaSwag/PIQA, acc for WG/BoolQ
    avg, used = common_avg(_six())
    assert avg == pytest.approx(expected) and used["winogrande"] == "acc" and used["piqa"] == "acc_norm"
    # Adding MMLU, GSM8K or a bundled task never moves the headline.
    more = _six(mmlu={"acc": 0.9}, gsm8k={"exact_match@strict-match": 0.02}, bundled_web_cont={"acc_norm": 0.99})
    assert common_avg(more)[0] == pytest.approx(expected)
    assert task_metrics(more)["gsm8k"] == "exact_match@strict-match" and task_metrics(more)["mmlu"] == "acc"
    # Five of the six: no Common Avg at all rather than a different average under the same name.
    five = {t: m for t, m in _six().items() if t != "boolq"}
    assert common_avg(five) == (None, {})
    assert bundled_avg(more) is None
    three = {t: {"acc_norm": v} for t, v in zip(BUNDLED_TASKS, (0.3, 0.4, 0.8), strict=True)}
    assert bundled_avg(three) == pytest.approx(0.5)


def test_stress_tasks_run_with_their_shots(monkeypatch):
    import lm_eval

    calls = []

    def fake_evaluate(*, tasks, num_fewshot, **kwargs):
        calls.append((list(tasks), num_fewshot))
        return {"results": {t: {"acc,none": 0.5, "exact_match,strict-match": 0.25} for t in tasks}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    tok = bundled_tokenizer()
    out = zero_shot(tiny_lm(len(tok)), tok, EvalSettings(tasks="stress,bundled_wiki_cont"))
    assert calls == [(["bundled_wiki_cont"], 0), (["minerva_math500"], 4), (["mmlu", "gsm8k"], 5)]
    assert out["settings"]["num_fewshot"] == {**FEWSHOT, "bundled_wiki_cont": 0}
    assert out["tasks"]["gsm8k"]["exact_match@strict-match"] == 0.25 and out["common_avg"] is None


def test_expand_tasks():
    assert expand_tasks("common") == list(COMMON_TASKS)
    assert expand_tasks(["bundled_wiki_cont,bundled", "mmlu"]) == [
        "bundled_wiki_cont", "bundled_web_cont", "bundled_cross_cont", "mmlu"]


def test_bundled_avg_is_the_heldout_tasks_when_they_ran():
    from moeprune.evaluation.tasks import HELDOUT_TASKS

    heldout = {"heldout_order": {"acc": 0.9, "acc_norm": 0.1}, "heldout_domain": {"acc_mutual_info": 0.7, "acc": 0.2},
               "heldout_cloze": {"acc": 0.5, "acc_norm": 0.0}}
    assert set(heldout) == set(HELDOUT_TASKS)
    assert bundled_avg(heldout) == pytest.approx(0.7)  # each task's own metric, not acc_norm/acc
    continuation = {t: {"acc_norm": v} for t, v in zip(BUNDLED_TASKS, (0.3, 0.4, 0.8), strict=True)}
    assert bundled_avg({**heldout, **continuation}) == pytest.approx(0.7)  # the preset's tasks win
    two = {t: heldout[t] for t in ("heldout_order", "heldout_domain")}
    assert bundled_avg(two) is None  # two of three: no average
