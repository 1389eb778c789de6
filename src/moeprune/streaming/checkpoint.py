"""A local safetensors checkpoint as the streamer reads it: which shard holds each tensor, and its size on disk.

Opened before any weight is read, so every refusal (no such folder, pickle weights only, a shard the index names
but the folder lacks, a shard that does not open) is one line naming the fix, and nothing has been loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from moeprune.errors import MoePruneError
from moeprune.io import INDEX_FILE, read_weight_map

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class Checkpoint:
    """``shard_of[key]`` names the file holding the tensor ``key``; ``nbytes[key]`` its bytes on disk."""

    folder: Path
    shard_of: dict[str, str]
    nbytes: dict[str, int]

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
        return cls(folder, shard_of, nbytes)

    def bytes_of(self, keys: list[str]) -> int:
        return sum(self.nbytes[k] for k in keys)


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
