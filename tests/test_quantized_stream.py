"""Streaming (one decoder layer at a time from disk) dequantizes quantized checkpoints layer by layer through
transformers' quantizer: streamed profiles equal in-memory ones for FP8 block, MXFP4 and compressed-tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeprune import api
from moeprune.loading import ModelSource
from moeprune.profiling.stats import SUM_FIELDS
from tests.quantized_checkpoints import build, build_gpt_oss, write_compressed_tensors, write_fp8_block, write_mxfp4


def _write(kind: str, path: Path, vocab: int) -> Path:
    if kind == "fp8":
        return write_fp8_block(build("deepseek_v3", vocab_size=vocab), path, max_shard_size="600KB")
    if kind == "mxfp4":
        return write_mxfp4(build_gpt_oss(vocab_size=vocab), path, max_shard_size="300KB")
    pytest.importorskip("compressed_tensors")
    return write_compressed_tensors(build("qwen3_moe", vocab_size=vocab), path, "W4A16", max_shard_size="600KB")


@pytest.mark.parametrize("kind", ["fp8", "mxfp4", "ct-w4a16"])
def test_streamed_profile_of_a_quantized_checkpoint_equals_in_memory(kind, tmp_path, tokenizer, text_corpus):
    source = _write(kind, tmp_path / kind, len(tokenizer))
    tokenizer.save_pretrained(source)
    corpora = [f"notes={text_corpus}"]
    kwargs = dict(calibration={"samples": 4, "seq_len": 16, "batch_size": 2}, progress=False)
    model = ModelSource.of(str(source), device="cpu")
    streamed = api.profile(model, corpora, tmp_path / "s", stream=True, **kwargs).corpora["notes"]
    plain = api.profile(model, corpora, tmp_path / "p", stream=False, **kwargs).corpora["notes"]
    assert streamed.meta.get("stream") is True and streamed.count.sum() > 0
    assert torch.equal(streamed.count, plain.count)
    for name in SUM_FIELDS:
        torch.testing.assert_close(getattr(streamed, name), getattr(plain, name), rtol=1e-5, atol=1e-7, msg=name)
