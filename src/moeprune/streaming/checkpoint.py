"""A local safetensors checkpoint as the streamer reads it: which shard holds each tensor, its size and where its
bytes lie in the shard (so the read-ahead can ask the kernel for exactly one layer's bytes, :meth:`will_need`).

Opened before any weight is read, so every refusal (no such folder, pickle weights only, a shard the index names
but the folder lacks, a shard that does not open) is one line naming the fix, and nothing has been loaded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from moeprune.errors import MoePruneError
from moeprune.io import INDEX_FILE, read_weight_map

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class Checkpoint:
    """``shard_of[key]`` names the file holding the tensor ``key``; ``nbytes[key]`` its bytes on disk; ``spans[key]``
    its (offset, length) in that file."""

    folder: Path
    shard_of: dict[str, str]
    nbytes: dict[str, int]
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise MoePruneError(f"--stream reads a local checkpoint folder; {folder} is not one (download the "
                                "checkpoint, e.g. huggingface-cli download ID --local-dir DIR, and pass DIR).")
        shards = _shard_names(folder)
        shard_of: dict[str, str] = {}
        nbytes: dict[str, int] = {}
        for shard in shards:
            try:
                with safe_open(str(folder / shard), framework="pt") as handle:
                    for key in handle.keys():
                        view = handle.get_slice(key)
                        shard_of[key] = shard
                        nbytes[key] = _numel(view.get_shape()) * _itemsize(view.get_dtype())
            except (SafetensorError, OSError) as err:
                raise MoePruneError(f"{folder / shard} is truncated or corrupt ({err}); re-download or re-save the "
                                    "checkpoint.") from err
        spans: dict[str, tuple[int, int]] = {}
        for shard in shards:
            spans.update(_data_spans(folder / shard))
        return cls(folder, shard_of, nbytes, spans)

    def bytes_of(self, keys: list[str]) -> int:
        return sum(self.nbytes[k] for k in keys)

    def will_need(self, keys: list[str]) -> None:
        """Ask the kernel to read these tensors' bytes into the page cache now (``POSIX_FADV_WILLNEED``).

        The read-ahead thread calls it for the next layer: where transformers copies the weights (conversions,
        casts) the copy then finds them cached, and where it keeps them as views of the shard's memory map (no
        conversion, same dtype: the DeepSeek-MoE port, gpt-oss's fused layout) the layer's first batch would
        otherwise fault every page in from disk while the compute waits. Advice only: nothing fails on it."""
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for key in keys:
            if key in self.spans:
                by_shard.setdefault(self.shard_of[key], []).append(self.spans[key])
        for shard, ranges in by_shard.items():
            try:
                fd = os.open(self.folder / shard, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                for offset, length in _merged(ranges):
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


def _data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's (offset, length) in a safetensors file: an 8-byte little-endian header size, the JSON header,
    then the data, each tensor's ``data_offsets`` relative to its start (the format's specification). The file has
    opened with safetensors already; a header that does not parse here gives no spans (the advice is skipped)."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100 << 20:
                return {}
            header = json.loads(handle.read(size))
        start = 8 + size
        return {key: (start + int(entry["data_offsets"][0]),
                      int(entry["data_offsets"][1]) - int(entry["data_offsets"][0]))
                for key, entry in header.items() if key != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return {}


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent or overlapping (offset, length) ranges joined: one advice per run of bytes."""
    out: list[list[int]] = []
    for offset, length in sorted(ranges):
        if out and offset <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], offset + length - out[-1][0])
        else:
            out.append([offset, length])
    return [(o, n) for o, n in out]


def _shard_names(folder: Path) -> list[str]:
    """The safetensors files holding the weights, each checked to exist; pickle-only checkpoints refused."""
    if (folder / INDEX_FILE).exists():
        shards = sorted(set(read_weight_map(folder).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise MoePruneError(f"{folder} lacks the shard(s) {missing} its index {INDEX_FILE} names; re-download "
                                "the checkpoint (no weight was read).")
        return shards
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise MoePruneError(
            f"{folder} holds pickle weights ({pickles[0]}), and --stream reads safetensors shards only (a pickle "
            "cannot be read one tensor at a time, and unpickling can run code); convert it where you trust the "
            "file, e.g. AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR_SAFE), and pass that folder."
        )
    raise MoePruneError(f"{folder} holds no *.safetensors weights; pass the folder of a safetensors checkpoint.")


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1, "F4": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
