"""The read-ahead asks the kernel for exactly the next layer's bytes (POSIX_FADV_WILLNEED), at the right offsets."""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from moeprune.loading import load_config
from moeprune.streaming import checkpoint as checkpoint_module
from moeprune.streaming.checkpoint import Checkpoint, _merged
from moeprune.streaming.layers import DiskLayers


def test_spans_point_at_each_tensors_bytes(tiny_checkpoint):
    """Read back from the file at each span: the bytes are the tensor's own (little-endian, as safetensors stores)."""
    ckpt = Checkpoint.open(tiny_checkpoint)
    assert set(ckpt.spans) == set(ckpt.shard_of)
    for key, (offset, length) in ckpt.spans.items():
        assert length == ckpt.nbytes[key]
        with safe_open(str(tiny_checkpoint / ckpt.shard_of[key]), framework="pt") as handle:
            want = handle.get_tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        with open(tiny_checkpoint / ckpt.shard_of[key], "rb") as raw:
            raw.seek(offset)
            assert raw.read(length) == want, key


def test_loading_a_layer_advises_exactly_its_bytes(tiny_checkpoint, monkeypatch):
    advised: list[tuple[str, int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(checkpoint_module.os, "posix_fadvise", spy)
    place = DiskLayers(tiny_checkpoint, load_config(tiny_checkpoint), torch.float32, "cpu")
    advised.clear()
    place.load(1)
    keys = place.groups[1]
    want: dict[str, list[tuple[int, int]]] = {}
    for key in keys:
        want.setdefault(place.checkpoint.shard_of[key], []).append(place.checkpoint.spans[key])
    got: dict[str, list[tuple[int, int]]] = {}
    for shard, offset, length, advice in advised:
        assert advice == os.POSIX_FADV_WILLNEED
        got.setdefault(shard, []).append((offset, length))
    assert {s: _merged(r) for s, r in got.items()} == {s: _merged(r) for s, r in want.items()}
    assert keys and all(".layers.1." in k for k in keys)


def test_merged_joins_adjacent_and_overlapping_ranges():
    assert _merged([(10, 5), (0, 10), (20, 1), (14, 3)]) == [(0, 17), (20, 1)]


def test_the_heap_is_trimmed_once_per_layer(tiny_checkpoint, monkeypatch):
    """glibc keeps freed heap memory fragmented: without a trim per layer a streamed expert-sparsity pass over
    DeepSeek-MoE-16B grew by ~330 MB a layer until its 8 GiB cgroup killed it (docs/benchmarks.md)."""
    from moeprune.streaming import runner

    calls: list[int] = []
    monkeypatch.setattr(runner, "release_free_heap", lambda: calls.append(1))
    place = DiskLayers(tiny_checkpoint, load_config(tiny_checkpoint), torch.float32, "cpu")
    ids = torch.randint(3, 100, (2, 8))
    runner.run_layer_major(place, [{"input_ids": ids}], progress=False)
    assert len(calls) == len(place.layers) > 0
