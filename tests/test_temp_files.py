"""Folders without a lock (profiles, reconstruction captures): a run deletes the temporary files of killed
writers only.

Temporary files carry their writer's pid and host; a leftover of a SIGKILLed writer is removed by the next
run, a live writer's file (another profiling run saving into the same folder right now) survives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeprune.cli import main
from moeprune.io import TEMP_FILE_MAX_AGE_S, remove_orphan_temp_files, temp_file_beside

# A writer that creates its temporary file beside the profile's, writes a few KB, reports the name, then
# either dies by SIGKILL (no cleanup runs) or waits, alive, until the test closes its stdin.
WRITER = """
import os, signal, sys
from pathlib import Path
from moeprune.io import temp_file_beside
tmp = temp_file_beside(Path(sys.argv[1]) / sys.argv[3])
tmp.write_bytes(b"x" * 4096)
print(tmp, flush=True)
if sys.argv[2] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
"""


def _writer(folder: Path, fate: str, name: str = "wiki.safetensors") -> tuple[Path, subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), fate, name], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    path = Path(proc.stdout.readline().strip())
    if fate == "killed":
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert path.name.startswith(f".{name}.") and path.exists()
    return path, proc


@pytest.fixture
def writers(tmp_path):
    folder = tmp_path / "profile"
    folder.mkdir()
    killed, _ = _writer(folder, "killed")
    live, proc = _writer(folder, "live")
    yield folder, killed, live
    proc.stdin.close()
    proc.wait(timeout=60)


def test_profiling_removes_a_killed_writers_temp_file_and_keeps_a_live_ones(writers, tiny_checkpoint):
    folder, killed, live = writers
    argv = ["profile", str(tiny_checkpoint), "--corpus", "wiki", "--samples", "2", "--seq-len", "16", "--out",
            str(folder)]
    assert main(argv) == 0
    assert not killed.exists(), "a killed writer's leftover is cleaned by the next run"
    assert live.exists(), "a live writer's temporary file must survive"
    assert (folder / "wiki.safetensors").exists()
    assert sorted(p.name for p in folder.glob(".*.tmp")) == [live.name]


def test_unowned_or_foreign_temp_files_go_only_when_old(tmp_path):
    own = temp_file_beside(tmp_path / "a.safetensors")  # this process: alive
    foreign = tmp_path / ".a.safetensors.1234-00000000.abcdefgh.tmp"  # another host: its pids mean nothing here
    unnamed = tmp_path / ".a.json.abcdefgh.tmp"  # written before writers were recorded
    folder = tmp_path / ".out.abcdefgh.tmp"  # an atomic directory: its lock's holder cleans it
    for path in (foreign, unnamed):
        path.write_text("x")
    folder.mkdir()
    assert remove_orphan_temp_files(tmp_path) == []
    old = time.time() - TEMP_FILE_MAX_AGE_S - 60
    for path in (own, foreign, unnamed, folder):
        os.utime(path, (old, old))
    assert sorted(remove_orphan_temp_files(tmp_path)) == sorted([own, foreign, unnamed])
    assert folder.is_dir()


def test_a_resumed_capture_removes_the_killed_captures_half_written_batch(tmp_path):
    from moeprune.reconstruction import WorkDir, capture_moe_inputs
    from tests.tiny_models import build_model

    model = build_model("qwen2_moe")
    work = WorkDir(tmp_path, "k")
    work.dir.mkdir(parents=True)
    killed, _ = _writer(work.dir, "killed", work.part_path(1).name)
    tokens = torch.randint(3, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    capture_moe_inputs(model, tokens, tmp_path, "k", batch_size=2, progress=False)
    assert not killed.exists() and work.part_path(1).exists()
    assert not list(work.dir.glob(".*.tmp"))
