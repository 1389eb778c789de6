"""Outputs written atomically get the permissions any new file gets, not mkstemp's private 0600/0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from moeprune.io import atomic_directory, write_json_atomic


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_json_has_the_umask_mode(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "mask.json"
    write_json_atomic(target, {"k": 1})
    assert _mode(target) == 0o666 & ~umask


def test_atomic_directory_has_the_umask_mode(tmp_path: Path, umask: int) -> None:
    final = tmp_path / "pruned"
    with atomic_directory(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert _mode(final) == 0o777 & ~umask
    assert _mode(final / "config.json") == 0o666 & ~umask
