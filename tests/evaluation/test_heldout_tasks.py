"""The held-out-domain tasks are well formed, built from test text of never-calibrated domains, and up to date."""

from __future__ import annotations

from collections import Counter

import pytest

from moeprune.bundled import BUNDLED_CORPORA, read_bundled_corpus
from moeprune.evaluation.tasks import HELDOUT_TASKS, TASKS_DIR
from moeprune.evaluation.tasks.build_heldout import DOMAINS, ITEMS, build_all, swap_adjacent
from moeprune.evaluation.tasks.data import read_items
from moeprune.evaluation.zeroshot import expand_tasks

CHOICES = {"heldout_order": 2, "heldout_domain": 4, "heldout_cloze": 4}


@pytest.fixture(scope="module")
def items():
    return {task: read_items(f"{task}.jsonl") for task in HELDOUT_TASKS}


@pytest.fixture(scope="module")
def corpora():
    return {(d, s): read_bundled_corpus(d, s) for d in DOMAINS for s in ("train", "validation", "test")}


def test_shape_and_size(items):
    assert not set(DOMAINS) & set(BUNDLED_CORPORA)  # never the calibration corpora
    for task, rows in items.items():
        assert (TASKS_DIR / f"{task}.yaml").is_file()
        assert len(rows) >= 1000 and len(rows) <= ITEMS  # standard error <= 1.5 points at 50% accuracy
        assert len({r["id"] for r in rows}) == len(rows)
        for row in rows:
            assert len(row["choices"]) == CHOICES[task] == len(set(row["choices"]))
            assert row["context"] and all(row["choices"])
        assert {r["gold"] for r in rows} == set(range(CHOICES[task]))  # the answer position is shuffled
        counts = Counter(r["domain"] for r in rows)
        assert set(counts) == set(DOMAINS) and max(counts.values()) - min(counts.values()) <= len(rows) // 20


def test_gold_is_verbatim_test_text_never_trained_verbatim(items, corpora):
    for rows in items.values():
        for row in rows:
            doc = corpora[(row["domain"], "test")][row["doc"]]
            gold = row["choices"][row["gold"]]
            # The task template has no delimiter: context + gold choice is the document's own text.
            assert row["context"] + gold in doc
            seen = corpora[(row["domain"], "train")] + corpora[(row["domain"], "validation")]
            # a cloze choice is the end of a unit: check the unit's last 250 characters with it
            text = (row["context"] + gold)[-250:] if row["id"].startswith("heldout_cloze") else gold
            assert not any(text.strip() in d for d in seen)


def test_order_pairs_differ_only_by_one_adjacent_swap(items):
    for row in items["heldout_order"]:
        gold, other = row["choices"][row["gold"]], row["choices"][1 - row["gold"]]
        sep = gold[: len(gold) - len(gold.lstrip())]
        assert other.startswith(sep)  # both continue the passage the same way
        a, b = gold[len(sep) :].split(" "), other[len(sep) :].split(" ")
        assert sorted(a) == sorted(b)
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert len(diff) == 2 and diff[1] == diff[0] + 1


def test_domain_distractors_come_from_the_other_domains(items, corpora):
    for row in items["heldout_domain"][:200]:
        wrong = [c.strip() for j, c in enumerate(row["choices"]) if j != row["gold"]]
        homes = {d for c in wrong for d in DOMAINS if any(c in doc for doc in corpora[(d, "test")])}
        assert row["domain"] not in homes and len(homes) == 3


def test_swap_adjacent_needs_two_different_words():
    import random

    assert swap_adjacent(random.Random(0), "same same same") is None
    assert swap_adjacent(random.Random(0), "one two") == "two one"


def test_heldout_preset_expands():
    assert expand_tasks("heldout") == list(HELDOUT_TASKS)


def test_committed_data_match_a_fresh_build(items):
    assert build_all() == items
