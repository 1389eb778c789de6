"""Where the reader tests find their side environments (built by scripts/check_readers.py).

Each reader lives under ``MOEPRUNE_READERS_HOME`` (default ``~/.cache/moeprune-readers``), never in moeprune's own
environment, because each pins its own transformers: ``tf4/`` (a venv with transformers 4.57 and llama.cpp's
converter requirements), ``llmc/`` (a venv with llm-compressor), ``llama.cpp/`` (a llama.cpp source release with
``build/bin/llama-perplexity``). A test whose tool is missing skips and says which command builds it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HOME = Path(os.environ.get("MOEPRUNE_READERS_HOME", Path.home() / ".cache" / "moeprune-readers"))
BUILD = "python scripts/check_readers.py --build-only"
SIDE_SCRIPTS = Path(__file__).parent / "side"


def side_python(name: str) -> Path:
    """The python of side venv ``name``; skips the test (with the command that builds it) when absent."""
    python = HOME / name / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no {name} side environment at {python}: build it with `{BUILD}` (MOEPRUNE_READERS_HOME={HOME})")
    return python


def run_side(python: Path, script: str, *args: str, timeout: float = 1800) -> str:
    """Run one of tests/readers/side/*.py under a side venv (with a clean PYTHONPATH); returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(python), str(SIDE_SCRIPTS / script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{script} failed under {python}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout
