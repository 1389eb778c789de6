"""Profiling a checkpoint larger than the memory cap: streamed it completes, loaded whole it is killed.

A real memory cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``) caps a child process that runs the CLI;
the child joins it before importing anything, so the runtime counts. Skipped, with the reason, where no cgroup can
be made (not root, no memory controller).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
CAP = 900 << 20  # the checkpoint below is 1.2 GB
_IDS = itertools.count()


def _why_no_cgroup() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a memory cgroup"
    if (V1 / "memory.limit_in_bytes").exists():
        return None
    controllers = V2 / "cgroup.subtree_control"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return None
    return "no cgroup memory controller (v1 or v2) is mounted here"


pytestmark = pytest.mark.skipif(_why_no_cgroup() is not None, reason=str(_why_no_cgroup()))


@pytest.fixture
def cgroup():
    v1 = (V1 / "memory.limit_in_bytes").exists()
    path = (V1 if v1 else V2) / f"moeprune-test-{os.getpid()}-{next(_IDS)}"
    path.mkdir()
    if v1:
        (path / "memory.limit_in_bytes").write_text(str(CAP))
        if (path / "memory.memsw.limit_in_bytes").exists():
            (path / "memory.memsw.limit_in_bytes").write_text(str(CAP))
    else:
        (path / "memory.max").write_text(str(CAP))
        (path / "memory.swap.max").write_text("0")
    yield path
    path.rmdir()


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A 1.2 GB float32 qwen2_moe (12 layers of 32 experts, 512 wide), larger than the cap."""
    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=512, num_hidden_layers=12,
                            num_attention_heads=8, num_key_value_heads=8, num_experts=32, num_experts_per_tok=4,
                            moe_intermediate_size=512, shared_expert_intermediate_size=512,
                            max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("big") / "qwen-1.2g"
    model.save_pretrained(path, max_shard_size="300MB")
    tokenizer.save_pretrained(path)
    del model
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert size > CAP * 1.25
    return path


def _capped(cgroup: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """The CLI in a child that joins ``cgroup`` first thing; pages of the checkpoint read earlier are evicted."""
    code = (f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))\n"
            "import sys\nfrom moeprune.cli import main\nsys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=600)


def _evict(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_profile_streams_under_a_cap_smaller_than_the_checkpoint(big_checkpoint, cgroup, tmp_path):
    calibration = ["--corpus", "wiki", "--samples", "2", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]
    _evict(big_checkpoint)
    done = _capped(cgroup, ["profile", str(big_checkpoint), *calibration, "--out", str(tmp_path / "s")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "streaming the weights from disk" in done.stderr  # chosen automatically, from the cgroup's limit
    assert json.loads((tmp_path / "s" / "wiki.json").read_text())["stream"] is True
    # The cap bites: the same profile loading the model whole is killed by the kernel.
    _evict(big_checkpoint)
    whole = _capped(cgroup, ["profile", str(big_checkpoint), *calibration, "--no-stream", "--out", str(tmp_path / "w")])
    assert whole.returncode in (-9, 137), whole.stderr[-2000:]
