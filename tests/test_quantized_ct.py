"""compressed-tensors checkpoints made by the compressed-tensors package (W4A16 pack-quantized and FP8 dynamic,
float-quantized): profile -> plan -> apply in memory and model-free, kept experts' packed weights and scales byte for
byte, logits through transformers' quantizer (dequantized), bytes, ignore list, and a missing scale refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from moeprune.cli import main
from moeprune.loading import ModelSource, config_hash, load_model
from moeprune.planning.mask import ExpertMask, LayerMask
from moeprune.quant import dequantize
from moeprune.surgery import masked
from tests.quantized_checkpoints import build, tensors, write_compressed_tensors

pytest.importorskip("compressed_tensors")

CALIBRATION = ["--samples", "4", "--seq-len", "16", "--batch-size", "2"]
PARTS = {"W4A16": ("weight_packed", "weight_scale", "weight_shape"), "FP8_DYNAMIC": ("weight", "weight_scale")}


@pytest.fixture(scope="module", params=["W4A16", "FP8_DYNAMIC"])
def ct_source(request, tmp_path_factory, tokenizer) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp("ct") / request.param
    write_compressed_tensors(build("qwen3_moe", vocab_size=len(tokenizer)), path, request.param,
                             max_shard_size="600KB")
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) >= 3, "the test needs a multi-shard source"
    return request.param, path


def _dequantized(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def test_identity_and_dequantization(ct_source):
    preset, folder = ct_source
    source = ModelSource(str(folder))
    assert source.format.key == {"W4A16": "ct-pack-quantized", "FP8_DYNAMIC": "ct-float-quantized"}[preset]
    loaded = load_model(folder, device="cpu")
    assert config_hash(loaded.config) == source.config_hash
    # moeprune.quant.dequantize (compressed-tensors' own decompressor) gives what transformers loaded.
    state = tensors(folder)
    prefix = "model.layers.1.mlp.experts.3.down_proj."
    expected = loaded.model.layers[1].mlp.experts.down_proj[3].detach()
    got = dequantize(source.format, {"." + p: state[prefix + p] for p in PARTS[preset]}, expected.dtype,
                     source.quantization)
    assert torch.equal(got, expected)


def test_profile_plan_apply_write_the_source_format(ct_source, tmp_path, text_corpus):
    preset, folder = ct_source
    prof, masks = tmp_path / "prof", tmp_path / "masks"
    assert main(["profile", str(folder), "--corpus", str(text_corpus), *CALIBRATION, "--out", str(prof)]) == 0
    assert main(["plan", str(prof), "--method", "frequency", "--retain", "0.5", "--out", str(masks)]) == 0
    mask_file = next(masks.glob("*.json"))
    mask = ExpertMask.load(mask_file)
    in_memory, model_free = tmp_path / "in_memory", tmp_path / "model_free"
    assert main(["apply", str(folder), str(mask_file), "--out", str(in_memory)]) == 0
    assert main(["apply", str(folder), str(mask_file), "--out", str(model_free), "--model-free"]) == 0

    source, got, free = tensors(folder), tensors(in_memory), tensors(model_free)
    assert sorted(got) == sorted(free)
    assert all(torch.equal(got[n].view(torch.uint8), free[n].view(torch.uint8)) for n in got)
    for layer in mask.layers:
        for new, old in enumerate(mask.kept(layer)):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for part in PARTS[preset]:
                    ours = got[f"model.layers.{layer}.mlp.experts.{new}.{proj}.{part}"]
                    theirs = source[f"model.layers.{layer}.mlp.experts.{old}.{proj}.{part}"]
                    assert ours.dtype == theirs.dtype
                    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert json.loads((in_memory / "config.json").read_text())["quantization_config"] == quantization

    def size(t: dict) -> int:
        return sum(x.numel() * x.element_size() for x in t.values())

    dropped = sum(x.numel() * x.element_size() for name, x in source.items()
                  if any(f"layers.{i}.mlp.experts.{e}." in name for i in mask.layers
                         for e in set(range(mask.num_experts)) - set(mask.kept(i))))
    router_rows = sum(x.numel() * x.element_size() for name, x in source.items()
                      if name.endswith("mlp.gate.weight")) // 2
    assert size(got) == size(source) - dropped - router_rows
    assert "compressed-tensors" in (in_memory / "README.md").read_text().replace("\\", "")  # markdown-escaped

    ids = torch.randint(5, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = _dequantized(folder)
    with torch.no_grad(), masked(dense, mask):
        expected = dense(ids).logits
    for out in (in_memory, model_free):
        with torch.no_grad():
            torch.testing.assert_close(_dequantized(out)(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_missing_scale_is_refused(ct_source, tmp_path, capsys):
    preset, folder = ct_source
    broken = tmp_path / "broken"
    broken.mkdir()
    state = tensors(folder)
    del state["model.layers.2.mlp.experts.6.up_proj.weight_scale"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((folder / name).read_bytes())
    mask = ExpertMask(str(broken), "random", 0.5, 8, 4, {i: LayerMask([0, 2, 6, 7]) for i in range(3)})
    mask.save(tmp_path / "m.json")
    for extra in ([], ["--model-free"]):
        capsys.readouterr()
        assert main(["apply", str(broken), str(tmp_path / "m.json"), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "experts.6.up_proj.weight_scale next to it" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "o").exists()
