"""The parked activations of a layer-major run: every batch's hidden states between two decoder layers.

In CPU memory up to a budget; the batches beyond it go to one temporary file inside the verb's output folder (a
hidden, pid-tagged ``.parked-activations.<pid>-<host>.XXXXXXXX.tmp`` that :func:`moeprune.io.remove_orphan_temp_files`
recognises), each batch at its own offset, read back when a layer needs it and overwritten with that layer's output.
The file is removed when the run ends, fails or is interrupted (Ctrl-C; SIGTERM, which the CLI raises as an
exception); a process killed outright leaves it to the next run's orphan cleanup in that folder.

The budget: ``MOEPRUNE_PARKED_BYTES`` (bytes, or with a K/M/G suffix, e.g. ``512M``; 0 spills every batch) when
set, else :data:`PARKED_FRACTION` of the memory available to the process (:func:`available_memory`, cgroup limits
included) less the two decoder layers (one read ahead) and the embeddings the run materializes.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

from moeprune.errors import MoePruneError
from moeprune.io import environment_errors, make_dirs, remove_orphan_temp_files, temp_file_beside
from moeprune.streaming.memory import FIT_FRACTION, available_memory, gib

log = logging.getLogger(__name__)

BUDGET_ENV = "MOEPRUNE_PARKED_BYTES"
PARKED_FRACTION = FIT_FRACTION  # of the memory available, less two layers and the embeddings
SPILL_NAME = "parked-activations"  # the temporary file is a hidden, pid-tagged sibling of this name
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_FOLDER: ContextVar[Path | None] = ContextVar("moeprune_spill_folder", default=None)


@contextmanager
def spill_into(folder: str | Path | None) -> Iterator[None]:
    """Parked activations above the budget spill into ``folder`` (the verb's output or work folder) for the block;
    None keeps the folder already chosen (outside every block: the system's temporary directory)."""
    if folder is None:
        yield
        return
    token = _FOLDER.set(Path(folder))
    try:
        yield
    finally:
        _FOLDER.reset(token)


def spill_folder() -> Path:
    return _FOLDER.get() or Path(tempfile.gettempdir())


def budget_from_env() -> int | None:
    """``MOEPRUNE_PARKED_BYTES`` in bytes, None when unset; a malformed value is refused in one line."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    if not value:
        return None
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?", value.upper())
    if match is None:
        raise MoePruneError(f"{BUDGET_ENV}={value!r} is not a size; give bytes or a size such as 512M or 4G "
                            "(0 spills every parked batch to disk).")
    return int(float(match[1]) * _SUFFIX[match[2]])


def default_budget(layer_bytes: int = 0, outside_bytes: int = 0) -> int:
    """The bytes of parked activations kept in memory: the env var, else a fraction of the memory available less
    two decoder layers of ``layer_bytes`` and the embeddings and head (``outside_bytes``)."""
    given = budget_from_env()
    if given is not None:
        return given
    return max(0, int(PARKED_FRACTION * available_memory().available) - 2 * layer_bytes - outside_bytes)


class ParkedStore:
    """Batch ``b``'s parked tensor: ``store[b]`` (a CPU tensor), ``store[b] = tensor``; where a batch lives is
    decided when it is first stored (memory while the budget lasts, then the spill file) and kept. Use as a
    context manager, or call :meth:`close`: the spill file is removed then."""

    def __init__(self, budget: int, folder: str | Path | None = None) -> None:
        self.budget = max(0, int(budget))
        self.folder = Path(folder) if folder is not None else spill_folder()
        self._memory: dict[int, torch.Tensor] = {}
        self._slots: dict[int, tuple[int, int, torch.Size, torch.dtype]] = {}  # b -> (offset, capacity, shape, dtype)
        self.in_memory_bytes = 0
        self.spilled_bytes = 0  # bytes of the spill file (its batches' capacity)
        self.written_bytes = 0  # bytes written to it over the run (every layer rewrites its batches)
        self.path: Path | None = None
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._memory) + len(self._slots)

    def __setitem__(self, b: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        nbytes = tensor.numel() * tensor.element_size()
        if b in self._memory or (b not in self._slots and self.in_memory_bytes + nbytes <= self.budget):
            self.in_memory_bytes += nbytes - (self._nbytes(self._memory[b]) if b in self._memory else 0)
            self._memory[b] = tensor
            return
        slot = self._slots.get(b)
        if slot is None or slot[1] < nbytes:  # new, or grown: a fresh extent at the end of the file
            slot = (self.spilled_bytes, nbytes, tensor.shape, tensor.dtype)
            self.spilled_bytes += nbytes
        self._slots[b] = (slot[0], slot[1], tensor.shape, tensor.dtype)
        self._write(slot[0], tensor.contiguous())
        self.written_bytes += nbytes

    def __getitem__(self, b: int) -> torch.Tensor:
        if b in self._memory:
            return self._memory[b]
        offset, _, shape, dtype = self._slots[b]
        tensor = torch.empty(shape, dtype=dtype)
        self._read(offset, tensor)
        return tensor

    @property
    def spilled_batches(self) -> int:
        return len(self._slots)

    def describe(self) -> str:
        parked = f"parked activations: {len(self._memory)} batch(es) in memory ({gib(self.in_memory_bytes)})"
        if not self._slots:
            return parked
        return (f"{parked}, {len(self._slots)} spilled to disk ({self.spilled_bytes} bytes = "
                f"{gib(self.spilled_bytes)}, {gib(self.written_bytes)} written; budget {gib(self.budget)})")

    def close(self) -> None:
        """Drop the batches and remove the spill file (idempotent)."""
        self._memory.clear()
        self._slots.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def __enter__(self) -> ParkedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- the file
    def _file(self) -> int:
        if self._fd is None:
            with environment_errors():  # a full or read-only disk is one line naming it
                folder = make_dirs(self.folder)
                remove_orphan_temp_files(folder)  # a killed run's spill file (only dead writers' files)
                self.path = temp_file_beside(folder / SPILL_NAME)
                self._fd = os.open(self.path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
            log.info("parked activations above %s spill to %s", gib(self.budget), self.path)
        return self._fd

    def _write(self, offset: int, tensor: torch.Tensor) -> None:
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        fd = self._file()
        with environment_errors():
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)

    def _read(self, offset: int, tensor: torch.Tensor) -> None:
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        fd = self._file()
        with environment_errors():
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    raise MoePruneError(f"{self.path} ended early (the spill file was truncated while the run "
                                        "read it); run again.")
                done += got

    @staticmethod
    def _nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()
