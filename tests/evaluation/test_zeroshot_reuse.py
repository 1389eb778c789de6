"""lm-eval objects built once per run (``reuse_lm_eval``) give the same per-request log-likelihoods, cell by
cell, as building TaskManager, tasks and HFLM afresh; and the eval batch size accepts N, auto, auto:N."""

from __future__ import annotations

from functools import partialmethod

import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from moeprune.errors import MoePruneError
from moeprune.evaluation.zeroshot import eval_batch_size, reuse_lm_eval, zero_shot
from moeprune.options import EvalSettings
from moeprune.planning.mask import ExpertMask, LayerMask
from moeprune.surgery import masked
from tests.evaluation import bundled_tokenizer, tiny_lm

LIMIT = 4


def _mask(kept: list[int]) -> ExpertMask:
    # tiny_lm: 2 MoE layers of 4 experts, top-2.
    layers = {layer: LayerMask(kept=list(kept)) for layer in (0, 1)}
    return ExpertMask("tiny", "hand", 0.5, 4, len(kept), layers)


def _grid(model, tok) -> list[tuple[list[float], dict]]:
    """Dense and two masks: each cell's log-likelihoods (every request, in order) and metrics."""
    cells = [_cell(model, tok)]
    for kept in ([0, 1], [2, 3]):
        with masked(model, _mask(kept)):
            cells.append(_cell(model, tok))
    return cells


def _cell(model, tok) -> tuple[list[float], dict]:
    _LOGLIK.clear()
    tasks = zero_shot(model, tok, EvalSettings(tasks="bundled", limit=LIMIT, eval_batch_size=4))["tasks"]
    return list(_LOGLIK), tasks


_LOGLIK: list[float] = []


@pytest.fixture()
def counted(monkeypatch) -> dict[str, int]:
    """Count TaskManager and HFLM constructions and record every log-likelihood HFLM returns.

    The managers skip lm-eval's own task folders (the bundled tasks are all these tests run): indexing them
    takes seconds per manager, and both paths compared here use the same managers."""
    counts = {"manager": 0, "hflm": 0}
    for name, cls, fixed in (("manager", TaskManager, {"include_defaults": False}), ("hflm", HFLM, {})):
        init = cls.__init__

        def counting(self, *args, _name=name, _init=init, _fixed=fixed, **kwargs):
            counts[_name] += 1
            _init(self, *args, **kwargs, **_fixed)

        monkeypatch.setattr(cls, "__init__", counting)
    loglikelihood = HFLM.loglikelihood

    def recording(self, requests, *args, **kwargs):
        out = loglikelihood(self, requests, *args, **kwargs)
        _LOGLIK.extend(float(ll) for ll, _ in out)
        return out

    monkeypatch.setattr(HFLM, "loglikelihood", recording)
    return counts


def test_reused_objects_give_fresh_results_per_cell(counted):
    tok = bundled_tokenizer()
    model = tiny_lm(len(tok))
    with reuse_lm_eval():
        reused = _grid(model, tok)
        with reuse_lm_eval():  # a nested block shares the outer one's objects
            again = _cell(model, tok)
    assert counted == {"manager": 1, "hflm": 1}
    fresh = _grid(model, tok)  # after the block, every call builds its own objects again
    assert counted == {"manager": 4, "hflm": 4}
    assert reused == fresh  # log-likelihoods exactly, and every metric
    assert again == fresh[0]
    # The masks change the model: a wrapper stuck on the dense model would differ from fresh here.
    assert fresh[1][0] != fresh[0][0] and fresh[2][0] != fresh[1][0]
    assert len(fresh[0][0]) > 3 * LIMIT  # three tasks, LIMIT docs, several choices each


@pytest.mark.parametrize(("given", "expected"), [(8, 8), ("16", 16), ("auto", "auto"), ("Auto:4", "auto:4")])
def test_eval_batch_size_accepts(given, expected):
    assert eval_batch_size(given) == expected


@pytest.mark.parametrize("given", [0, "-1", "auto:", "auto:0", "big", "4.5"])
def test_eval_batch_size_refuses(given):
    with pytest.raises(MoePruneError, match="auto:N"):
        eval_batch_size(given)


def test_auto_batch_size_reaches_lm_eval(counted, monkeypatch):
    # lm-eval tries max_batch_size (64 by default; 4 here, to keep the test fast) and halves it on
    # out-of-memory; a tiny model fits at once.
    monkeypatch.setattr(HFLM, "__init__", partialmethod(HFLM.__init__, max_batch_size=4))
    tok = bundled_tokenizer()
    settings = zero_shot(tiny_lm(len(tok)), tok, EvalSettings(tasks="bundled_wiki_cont", limit=2,
                                                             eval_batch_size="auto"))["settings"]
    assert settings["batch_size"] == "auto" and settings["batch_sizes_found"] == [4]


@pytest.mark.parametrize("verb", [["eval", "bundled"], ["experiment", "bundled", "--out", "x"]])
def test_cli_eval_batch_size(verb, capsys):
    from moeprune.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([*verb, "--eval-batch-size", "auto:2"]).eval_batch_size == "auto:2"
    assert parser.parse_args([*verb, "--eval-batch-size", "32"]).eval_batch_size == 32
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*verb, "--eval-batch-size", "large"])
    assert exit_info.value.code == 2 and "auto:N" in capsys.readouterr().err
