"""A killed profiling run resumes to the uninterrupted result; torchrun data parallelism equals one process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from moeprune.profiling.stats import SUM_FIELDS, ExpertStats

ARGS = ["--corpus", "wiki", "--samples", "48", "--seq-len", "32", "--batch-size", "2"]
# The CLI, with the process killing itself (SIGKILL: no cleanup runs) right after its third checkpoint.
KILLED_AFTER_THIRD_CHECKPOINT = """
import os, signal, sys
from moeprune.profiling.stats import ExpertStats
real_save, saves = ExpertStats.save, []
def save(self, path):
    real_save(self, path)
    saves.append(path)
    if len(saves) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
ExpertStats.save = save
from moeprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moeprune", "profile", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _assert_same(a: ExpertStats, b: ExpertStats) -> None:
    assert torch.equal(a.count, b.count)
    for name in SUM_FIELDS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-9, msg=name)


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_checkpoint, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(
        _cli(str(tiny_checkpoint), *ARGS, "--out", str(reference)), check=True, env=_env(), capture_output=True
    )

    resumed = tmp_path / "resumed"
    partial = resumed / "wiki.partial.safetensors"
    # SIGKILL at a fixed point (right after the third checkpoint), not after a race against the clock.
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_THIRD_CHECKPOINT, "profile", str(tiny_checkpoint), *ARGS,
         "--checkpoint-every", "1", "--out", str(resumed)],
        env=_env(),
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (resumed / "wiki.safetensors").exists()
    assert ExpertStats.load(partial).meta["windows_done"] == 3 * 2  # three batches of two

    subprocess.run(
        _cli(str(tiny_checkpoint), *ARGS, "--checkpoint-every", "1", "--out", str(resumed)),
        check=True,
        env=_env(),
        capture_output=True,
    )
    assert not partial.exists(), "the checkpoint is removed once the corpus is finished"
    _assert_same(ExpertStats.load(resumed / "wiki.safetensors"), ExpertStats.load(reference / "wiki.safetensors"))


def test_torchrun_two_processes_equal_one(tiny_checkpoint, tmp_path):
    single = tmp_path / "single"
    subprocess.run(_cli(str(tiny_checkpoint), *ARGS, "--out", str(single)), check=True, env=_env(), capture_output=True)
    parallel = tmp_path / "parallel"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "-m",
            "moeprune",
            "profile",
            str(tiny_checkpoint),
            *ARGS,
            "--checkpoint-every",
            "5",
            "--out",
            str(parallel),
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = ExpertStats.load(single / "wiki.safetensors"), ExpertStats.load(parallel / "wiki.safetensors")
    _assert_same(two, one)
    assert two.meta["world_size"] == 2 and two.meta["tokens"] == one.meta["tokens"]


def _free_port() -> int:
    """A port no one listens on now: a fixed one collides with any other run of this test on the machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_ranks_stream_their_own_batches(tiny_checkpoint, tmp_path):
    """Each rank streams every layer over its share of the batches; the all-reduced sums are one process's."""
    args = ["--corpus", "wiki", "--samples", "8", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]
    single = tmp_path / "single"
    subprocess.run(_cli(str(tiny_checkpoint), *args, "--no-stream", "--out", str(single)), check=True, env=_env(),
                   capture_output=True)
    parallel = tmp_path / "parallel"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "moeprune", "profile",
         str(tiny_checkpoint), *args, "--stream", "--out", str(parallel)],
        env=_env(), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = ExpertStats.load(single / "wiki.safetensors"), ExpertStats.load(parallel / "wiki.safetensors")
    assert torch.equal(two.count, one.count)
    for name in SUM_FIELDS:
        torch.testing.assert_close(getattr(two, name), getattr(one, name), rtol=1e-5, atol=1e-7, msg=name)
    assert two.meta["world_size"] == 2 and two.meta["stream"] is True and two.meta["tokens"] == one.meta["tokens"]
