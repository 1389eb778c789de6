"""The committed bundled-task data are well formed, built from TEST text only, and up to date."""

from __future__ import annotations

import pytest

from moeprune.bundled import read_bundled_corpus
from moeprune.evaluation.tasks import BUNDLED_TASKS, TASKS_DIR
from moeprune.evaluation.tasks.build import build_all
from moeprune.evaluation.tasks.data import read_items

CHOICES = {"bundled_wiki_cont": 4, "bundled_web_cont": 4, "bundled_cross_cont": 2}


@pytest.fixture(scope="module")
def items():
    return {task: read_items(f"{task}.jsonl") for task in BUNDLED_TASKS}


@pytest.fixture(scope="module")
def corpora():
    return {(c, s): read_bundled_corpus(c, s) for c in ("wiki", "web") for s in ("train", "validation", "test")}


def test_shape(items):
    for task, rows in items.items():
        assert (TASKS_DIR / f"{task}.yaml").is_file()
        assert len(rows) == 300
        assert len({r["id"] for r in rows}) == len(rows)
        for row in rows:
            assert len(row["choices"]) == CHOICES[task] == len(set(row["choices"]))
            assert 0 <= row["gold"] < CHOICES[task]
            assert row["context"] and all(row["choices"])
        golds = {r["gold"] for r in rows}
        assert golds == set(range(CHOICES[task]))  # the answer position is shuffled


def test_contexts_come_from_test_split_only(items, corpora):
    seen = {c: "\n".join(corpora[(c, "train")] + corpora[(c, "validation")]) for c in ("wiki", "web")}
    for rows in items.values():
        for row in rows:
            corpus, other = row["corpus"], "web" if row["corpus"] == "wiki" else "wiki"
            doc = corpora[(corpus, "test")][row["doc"]]
            # context + lm-eval's " " + the gold choice is verbatim text of that test document.
            assert f"{row['context']} {row['choices'][row['gold']]}" in doc
            assert row["context"] not in seen[corpus]
            for j, choice in enumerate(row["choices"]):
                if j != row["gold"]:
                    assert choice not in doc  # distractors come from other documents
                    pool = corpora[(other if row["id"].startswith("bundled_cross") else corpus, "test")]
                    assert any(choice in d for d in pool)


def test_cross_task_mixes_corpora(items):
    assert {r["corpus"] for r in items["bundled_cross_cont"][:20]} == {"wiki", "web"}


def test_committed_data_match_a_fresh_build(items):
    assert build_all() == items
