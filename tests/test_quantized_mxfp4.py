"""MXFP4 checkpoints in gpt-oss's layout (fused experts as ``*_blocks`` / ``*_scales``): profile -> plan -> apply in
memory and model-free, the experts' blocks and scales sliced along the expert axis byte for byte, logits through
transformers' MXFP4 quantizer (dequantized on the CPU), bytes, and a missing scale refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from moeprune.cli import main
from moeprune.loading import ModelSource, config_hash, load_model
from moeprune.planning.mask import ExpertMask, LayerMask
from moeprune.quant import FORMATS, dequantize
from moeprune.surgery import masked
from tests.quantized_checkpoints import MXFP4_CONFIG, build_gpt_oss, tensors, write_mxfp4

CALIBRATION = ["--samples", "4", "--seq-len", "16", "--batch-size", "2"]
EXPERT_TENSORS = ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks",
                  "down_proj_scales", "down_proj_bias")


@pytest.fixture(scope="module")
def mxfp4_source(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("mxfp4") / "gpt_oss"
    write_mxfp4(build_gpt_oss(vocab_size=len(tokenizer)), path, max_shard_size="300KB")
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) >= 3, "the test needs a multi-shard source"
    return path


def test_identity_and_dequantization_through_transformers(mxfp4_source):
    loaded = load_model(mxfp4_source, device="cpu")
    source = ModelSource(str(mxfp4_source))
    assert source.format.key == "mxfp4" and source.quantization == MXFP4_CONFIG
    assert config_hash(loaded.config) == source.config_hash
    # moeprune.quant.dequantize (the streamer's per-layer path) is transformers' own: equal to what it loaded.
    state = tensors(mxfp4_source)
    parts = {s: state[f"model.layers.1.mlp.experts.down_proj{s}"] for s in ("_blocks", "_scales")}
    expected = loaded.model.layers[1].mlp.experts.down_proj.detach()
    assert torch.equal(dequantize(FORMATS["mxfp4"], parts, expected.dtype), expected)


def test_profile_plan_apply_write_mxfp4_back(mxfp4_source, tmp_path, text_corpus):
    prof, masks = tmp_path / "prof", tmp_path / "masks"
    assert main(["profile", str(mxfp4_source), "--corpus", str(text_corpus), *CALIBRATION, "--out", str(prof)]) == 0
    assert main(["plan", str(prof), "--method", "reap", "--retain", "0.5", "--out", str(masks)]) == 0
    mask_file = next(masks.glob("*.json"))
    mask = ExpertMask.load(mask_file)
    in_memory, model_free = tmp_path / "in_memory", tmp_path / "model_free"
    assert main(["apply", str(mxfp4_source), str(mask_file), "--out", str(in_memory)]) == 0
    assert main(["apply", str(mxfp4_source), str(mask_file), "--out", str(model_free), "--model-free"]) == 0

    source, got, free = tensors(mxfp4_source), tensors(in_memory), tensors(model_free)
    assert sorted(got) == sorted(free) and all(torch.equal(got[n], free[n]) for n in got)
    for layer in mask.layers:
        kept = mask.kept(layer)
        for name in EXPERT_TENSORS:
            key = f"model.layers.{layer}.mlp.experts.{name}"
            assert got[key].dtype == source[key].dtype and got[key].shape[0] == len(kept)
            assert torch.equal(got[key], source[key][kept]), key  # the source's bytes, along the expert axis
        router = f"model.layers.{layer}.mlp.router.weight"
        assert torch.equal(got[router], source[router][kept])
    assert json.loads((in_memory / "config.json").read_text())["quantization_config"] == MXFP4_CONFIG

    def size(t: dict) -> int:
        return sum(x.numel() * x.element_size() for x in t.values())

    per_expert = sum(x.numel() * x.element_size() // x.shape[0] for name, x in source.items()
                     if ".mlp.experts." in name or ".mlp.router." in name)
    dropped = per_expert * (mask.num_experts - mask.kept_per_layer)  # every layer drops N - K experts
    assert size(got) == size(source) - dropped
    assert "MXFP4" in (in_memory / "README.md").read_text()

    ids = torch.randint(5, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(mxfp4_source, dtype=torch.float32).eval()
    with torch.no_grad(), masked(dense, mask):
        expected = dense(ids).logits
    for out in (in_memory, model_free):
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(pruned(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_missing_scales_are_refused(mxfp4_source, tmp_path, capsys):
    source = tmp_path / "broken"
    source.mkdir()
    state = tensors(mxfp4_source)
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((mxfp4_source / name).read_bytes())
    mask = ExpertMask(str(source), "random", 0.5, 8, 4, {i: LayerMask([0, 2, 5, 7]) for i in (0, 1)})
    mask.save(tmp_path / "mask.json")
    for extra in ([], ["--model-free"]):
        capsys.readouterr()
        assert main(["apply", str(source), str(tmp_path / "mask.json"), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "experts.down_proj_blocks (MXFP4" in err and "down_proj_scales next to it" in err
        assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
