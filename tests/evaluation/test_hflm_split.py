"""A request whose text equals another's, split at a different point, is scored exactly (evaluation/hflm.py).

heldout_cloze item 25 and heldout_domain item 57 are such a pair: the cloze context is the domain item's
context plus the start of its gold unit, and both gold choices end the same text. lm-eval's HFLM groups the
two and scored the shorter (cloze) continuation at the wrong positions."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from moeprune.evaluation.hflm import SplitSafeHFLM, split_rounds
from moeprune.evaluation.tasks.data import read_items
from moeprune.evaluation.zeroshot import _hflm, zero_shot
from moeprune.options import EvalSettings
from tests.evaluation import bundled_tokenizer, tiny_lm

CLOZE, DOMAIN = 25, 57  # the first colliding pair in the committed task files


@pytest.fixture(scope="module")
def lm_and_tok():
    tok = bundled_tokenizer()
    return tiny_lm(len(tok), max_positions=512), tok


def _direct(model, tok, context: str, continuation: str) -> float:
    """Summed log-probability of the continuation, from one forward pass over context + continuation."""
    ids, n = tok(context + continuation)["input_ids"], len(tok(context)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return float(sum(logp[p - 1, ids[p]] for p in range(n, len(ids))))


def test_split_rounds_separate_only_different_continuation_lengths():
    same = [((" ", " "), [1, 2], [3, 4]), ((" ", " "), [1, 2], [3, 5]), ((" ", " "), [1, 2, 3], [4])]
    assert split_rounds(same) == [[2], [0, 1]]  # [1, 2, 3] + [] == [1, 2] + [3]: the lengths 1 and 2 split
    apart = [((" ", " "), [1], [2]), ((" ", " "), [1], [3]), ((" ", " "), [7], [8, 9])]
    assert split_rounds(apart) == [[0, 1, 2]]  # one-token choices of one context stay in one forward pass


def test_colliding_requests_match_direct_scoring(lm_and_tok):
    model, tok = lm_and_tok
    cloze, domain = read_items("heldout_cloze.jsonl")[CLOZE], read_items("heldout_domain.jsonl")[DOMAIN]
    assert cloze["context"] + cloze["choices"][cloze["gold"]] == domain["context"] + domain["choices"][domain["gold"]]
    pairs = [(cloze["context"], c) for c in cloze["choices"]] + [(domain["context"], c) for c in domain["choices"]]
    lm = _hflm(model, tok, 4, None)
    assert isinstance(lm, SplitSafeHFLM)
    got = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    want = [_direct(model, tok, *p) for p in pairs]
    assert got == pytest.approx(want, abs=1e-3)


def test_cloze_scores_the_same_alone_and_with_domain(lm_and_tok, monkeypatch):
    """Through zero_shot on the shipped task files: heldout_cloze's per-request log-likelihoods do not depend
    on heldout_domain running in the same lm-eval call."""
    model, tok = lm_and_tok
    init = TaskManager.__init__
    # lm-eval's own task folders are not needed here; indexing them takes seconds.
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **k: init(self, *a, **k, include_defaults=False))
    recorded: dict[tuple[str, int, int], float] = {}
    loglikelihood = SplitSafeHFLM.loglikelihood

    def recording(self, requests, *args, **kwargs):
        out = loglikelihood(self, requests, *args, **kwargs)
        recorded.update({(r.task_name, r.doc_id, r.idx): ll for r, (ll, _) in zip(requests, out, strict=True)})
        return out

    monkeypatch.setattr(SplitSafeHFLM, "loglikelihood", recording)
    runs = []
    for tasks in ("heldout_cloze", "heldout_cloze,heldout_domain"):
        recorded.clear()
        zero_shot(model, tok, EvalSettings(tasks=tasks, limit=DOMAIN + 1, eval_batch_size=8))
        runs.append({key: ll for key, ll in recorded.items() if key[0] == "heldout_cloze"})
    alone, together = runs
    assert len(alone) == 4 * (DOMAIN + 1) and alone.keys() == together.keys()
    assert list(together.values()) == pytest.approx(list(alone.values()), abs=1e-3)


@pytest.mark.parametrize("show", [True, False])
def test_loglikelihood_bar_follows_show_progress(lm_and_tok, capsys, show):
    model, tok = lm_and_tok
    lm = _hflm(model, tok, 4, None)
    lm.show_progress = show
    try:
        lm.loglikelihood([Instance("loglikelihood", {}, ("a b", " c"), 0)])
    finally:
        lm.show_progress = True  # the wrapper is cached and shared with the other tests
    assert ("Running loglikelihood requests" in capsys.readouterr().err) is show
