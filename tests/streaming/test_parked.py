"""Parked activations above a budget spill to a temporary file inside the output folder (issue 24): results are
the same to the bit, the file is gone after success, an exception and Ctrl-C, and the log says how much spilled."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from moeprune import api
from moeprune.errors import MoePruneError
from moeprune.loading import ModelSource
from moeprune.options import EvalSettings
from moeprune.profiling.stats import SUM_FIELDS
from moeprune.streaming import layers as stream_layers
from moeprune.streaming import parked
from moeprune.streaming.parked import BUDGET_ENV, SPILL_NAME, ParkedStore, budget_from_env

CALIBRATION = {"samples": 6, "seq_len": 16, "batch_size": 2}  # three batches: every one spills at budget 0


def _src(path, stream: bool) -> ModelSource:
    return ModelSource.of(str(path), device="cpu", stream=stream)


def _spill_files(folder):
    return sorted(p.name for p in folder.glob(f".{SPILL_NAME}.*")) if folder.exists() else []


def _spilled(caplog) -> list[int]:
    return [int(n) for n in re.findall(r"spilled to disk \(([0-9]+) bytes", caplog.text)]


def test_store_keeps_the_budget_in_memory_and_the_rest_on_disk(tmp_path):
    tensors = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(b)) for b in range(4)]
    with ParkedStore(budget=2 * 2 * 5 * 8 * 4, folder=tmp_path) as store:  # two float32 batches fit
        for b, t in enumerate(tensors):
            store[b] = t
        assert store.spilled_batches == 2 and store.spilled_bytes == 2 * 320 and len(store) == 4
        assert len(_spill_files(tmp_path)) == 1
        for b, t in enumerate(tensors):
            assert torch.equal(store[b], t)
        store[3] = tensors[3].to(torch.bfloat16)  # a layer's output rewritten in place (smaller: same extent)
        store[2] = torch.ones(2, 9, 8)  # larger: a fresh extent at the end of the file
        assert torch.equal(store[3], tensors[3].to(torch.bfloat16)) and torch.equal(store[2], torch.ones(2, 9, 8))
        assert torch.equal(store[0], tensors[0]) and "2 spilled to disk" in store.describe()
    assert _spill_files(tmp_path) == []


def test_budget_env_var(monkeypatch):
    for value, expected in (("0", 0), ("512M", 512 << 20), ("2G", 2 << 30), ("1.5KiB", 1536), ("4096", 4096)):
        monkeypatch.setenv(BUDGET_ENV, value)
        assert budget_from_env() == expected
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(MoePruneError, match="MOEPRUNE_PARKED_BYTES='lots' is not a size"):
        budget_from_env()
    monkeypatch.delenv(BUDGET_ENV)
    assert budget_from_env() is None and parked.default_budget(1 << 20) > 0


def test_spilled_profile_equals_unspilled_and_in_memory(tiny_checkpoint, text_corpus, tmp_path, monkeypatch, caplog):
    corpora = [f"notes={text_corpus}"]
    kept = api.profile(_src(tiny_checkpoint, True), corpora, tmp_path / "kept", calibration=CALIBRATION,
                       progress=False)
    plain = api.profile(_src(tiny_checkpoint, False), corpora, tmp_path / "plain", calibration=CALIBRATION,
                        progress=False)
    monkeypatch.setenv(BUDGET_ENV, "0")  # every batch to disk
    seen = []
    free = stream_layers.DiskLayers.free
    monkeypatch.setattr(stream_layers.DiskLayers, "free",
                        lambda self, i: (seen.append(_spill_files(tmp_path / "spilled")), free(self, i)))
    with caplog.at_level(logging.INFO, logger="moeprune"):
        spilled = api.profile(_src(tiny_checkpoint, True), corpora, tmp_path / "spilled", calibration=CALIBRATION,
                              progress=False)
    assert any(seen) and all(len(s) <= 1 for s in seen)  # the spill file sat in the profile folder while it ran
    assert _spill_files(tmp_path / "spilled") == []  # and is gone
    hidden = tiny_checkpoint_hidden(tiny_checkpoint)
    assert _spilled(caplog) == [6 * 16 * hidden * 4]  # three batches of 2 x 16 tokens in float32
    a, b, c = (p.corpora["notes"] for p in (spilled, kept, plain))
    assert torch.equal(a.count, b.count) and torch.equal(a.count, c.count)
    for name in SUM_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name  # to the bit
        torch.testing.assert_close(getattr(a, name), getattr(c, name), rtol=1e-5, atol=1e-7, msg=name)


def tiny_checkpoint_hidden(path) -> int:
    return ModelSource.of(str(path)).config.hidden_size


def test_spilled_perplexity_equals_unspilled_and_in_memory(tiny_checkpoint, text_corpus, tmp_path, monkeypatch,
                                                           caplog):
    settings = EvalSettings(ppl_datasets=(str(text_corpus),), ppl_seq_len=24, max_windows=5, tasks="none",
                            eval_batch_size=2)
    kept = api.evaluate(_src(tiny_checkpoint, True), settings=settings, progress=False)
    plain = api.evaluate(_src(tiny_checkpoint, False), settings=settings, progress=False)
    monkeypatch.setenv(BUDGET_ENV, "0")
    with caplog.at_level(logging.INFO, logger="moeprune"):
        spilled = api.evaluate(_src(tiny_checkpoint, True), settings=settings, out=tmp_path / "eval" / "r.json",
                               progress=False)
    assert _spilled(caplog) and _spilled(caplog)[0] > 0
    assert str(tmp_path / "eval" / f".{SPILL_NAME}.") in caplog.text  # beside the result file
    assert _spill_files(tmp_path / "eval") == []
    (a,), (b,), (c,) = (r["perplexity"].values() for r in (spilled, kept, plain))
    assert a["nll"] == b["nll"] and a["ppl"] == b["ppl"]  # to the bit
    assert a["nll"] == pytest.approx(c["nll"], rel=1e-5)


@pytest.mark.parametrize("interrupt", [RuntimeError("injected"), KeyboardInterrupt()])
def test_the_spill_file_is_removed_on_an_exception_and_ctrl_c(tiny_checkpoint, text_corpus, tmp_path, monkeypatch,
                                                              interrupt):
    monkeypatch.setenv(BUDGET_ENV, "0")
    seen = []
    free = stream_layers.DiskLayers.free

    def failing(self, index):
        seen.append(_spill_files(tmp_path / "p"))
        if index == 1:
            raise interrupt
        free(self, index)

    monkeypatch.setattr(stream_layers.DiskLayers, "free", failing)
    with pytest.raises(type(interrupt)):
        api.profile(_src(tiny_checkpoint, True), [f"notes={text_corpus}"], tmp_path / "p", calibration=CALIBRATION,
                    progress=False)
    assert any(len(s) == 1 for s in seen)  # it was there mid-run
    assert _spill_files(tmp_path / "p") == []
