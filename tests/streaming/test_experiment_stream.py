"""``experiment --stream`` (issue 24): the grid streamed from disk gives the cells of the grid in memory; recovery is
refused up front."""

from __future__ import annotations

import json
import math
import time

import pytest

from moeprune.cli import main
from moeprune.experiment import run_experiment
from moeprune.loading import ModelSource
from tests.grid_options import typed
from tests.streaming.test_streaming import CALIBRATION, _refused, no_reads  # noqa: F401 - a fixture

METHODS = ["frequency", "reap", "tb-coverage"]  # tb-coverage's candidate: expert-sparsity, planned streamed
IGNORED = {"seconds", "metadata", "file"}  # wall time; the stream flag; the mask's path under each --out


def _grid(text_corpus) -> dict:
    return dict(retains=(0.5,), methods=METHODS, seeds=(0,), corpora=[f"notes={text_corpus}"], samples=4,
                seq_len=16, batch_size=2, ppl_datasets=[str(text_corpus)], ppl_seq_len=24, max_windows=2,
                tasks=["bundled"], limit=3, eval_batch_size=4, reconstruction={"samples": 4, "seq_len": 16},
                reap_corpus="none", plots=False, progress=False)


def _same(a, b, where: str = "") -> None:
    """``a`` equals ``b``, floats to rtol 1e-5, keys in IGNORED skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(set(a) - IGNORED) == sorted(set(b) - IGNORED), where
        for key in set(a) - IGNORED:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
        assert a == pytest.approx(b, rel=1e-5), where
    else:
        assert a == b or (a != a and b != b), where


@pytest.fixture(scope="module")
def in_memory(tiny_checkpoint, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid-memory")
    start = time.perf_counter()
    source = ModelSource.of(str(tiny_checkpoint), device="cpu", stream=False)
    run_experiment(source, out, **typed(_grid(text_corpus)))
    return json.loads((out / "results.json").read_text()), time.perf_counter() - start


def test_streamed_experiment_equals_in_memory(in_memory, tiny_checkpoint, text_corpus, tmp_path, caplog):
    plain, plain_s = in_memory
    start = time.perf_counter()
    source = ModelSource(str(tiny_checkpoint), device="cpu", stream=True)
    with caplog.at_level("INFO", logger="moeprune"):
        run_experiment(source, tmp_path, **typed(_grid(text_corpus)))
    streamed_s = time.perf_counter() - start
    streamed = json.loads((tmp_path / "results.json").read_text())
    assert [c["cell"] for c in streamed["cells"]] == ["dense", "frequency-0.50", "reap-0.50", "tb-coverage-0.50"]
    _same(streamed, plain)
    assert all(c["metadata"]["stream"] is True for c in streamed["cells"])
    assert not any("stream" in c["metadata"] for c in plain["cells"])
    tb = streamed["cells"][-1]
    assert tb["mask"]["candidate"] == "expert-sparsity" and tb["summary"]["tasks"]  # lm-eval items ran
    assert "read " in caplog.text and "layer loads" in caplog.text  # the layers came from disk
    print(f"tiny experiment: in memory {plain_s:.1f} s, streamed {streamed_s:.1f} s")


def test_cli_experiment_stream_equals_in_memory(in_memory, tiny_checkpoint, text_corpus, tmp_path):
    plain, _ = in_memory
    argv = ["experiment", tiny_checkpoint, "--corpus", f"notes={text_corpus}", "--samples", "4", "--seq-len", "16",
            "--batch-size", "2", "--retain", "0.5", "--methods", *METHODS, "--ppl", text_corpus,
            "--ppl-seq-len", "24", "--ppl-windows", "2", "--tasks", "bundled", "--limit", "3", "--eval-batch-size",
            "4", "--recon-samples", "4", "--recon-seq-len", "16", "--reap-corpus", "none", "--device", "cpu",
            "--stream", "--quiet", "--out", tmp_path / "grid"]
    assert main([str(a) for a in argv]) == 0
    streamed = json.loads((tmp_path / "grid" / "results.json").read_text())
    _same(streamed["cells"], plain["cells"])


def test_experiment_refuses_recovery_when_streaming_up_front(tiny_checkpoint, tmp_path, capsys, no_reads):  # noqa: F811
    _refused(capsys, ["experiment", tiny_checkpoint, *CALIBRATION, "--methods", "frequency", "--ppl-seq-len", "32",
                      "--device", "cpu", "--stream", "--recover", "router-kd", "--recover-seq-len", "32",
                      "--out", tmp_path / "grid"], "--recover needs the whole model in memory", "streamed from disk")
    assert not (tmp_path / "grid").exists()
