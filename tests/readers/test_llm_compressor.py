"""llm-compressor (a side venv) quantizes the pruned bundled model to W4A16 and the result reloads and runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moeprune.bundled import bundled_model_path, read_bundled_corpus
from moeprune.loading import load_model
from moeprune.surgery import ExportOptions, export_pruned
from tests.surgery import make_mask

from .conftest import run_side, side_python

pytestmark = pytest.mark.readers


def test_w4a16_oneshot_on_the_pruned_bundled_model_reloads(tmp_path: Path) -> None:
    llmc = side_python("llmc")
    model = load_model(bundled_model_path(), dtype="float32")
    mask = make_mask(model, kept_sets=[list(range(0, 32, 2))], num_experts=32)
    out = export_pruned(bundled_model_path(), mask, tmp_path / "pruned", progress=False)
    (tmp_path / "texts.json").write_text(json.dumps(read_bundled_corpus("wiki", "test")[:40]))
    report = json.loads(run_side(llmc, "llmc_oneshot.py", out, tmp_path / "texts.json", tmp_path / "w4a16",
                                 timeout=3600).splitlines()[-1])
    packed, quant = report.pop("packed"), report["quantization_config"]
    print(f"llm-compressor {report['llmcompressor']}: held-out ppl {report['ppl_before']:.3f} -> "
          f"{report['ppl_quantized']:.3f} quantized, {report['ppl_reloaded']:.3f} reloaded; "
          f"{len(packed)} packed tensors")
    weights = quant["config_groups"]["group_0"]["weights"]
    assert quant["format"] == "pack-quantized" and weights["num_bits"] == 4 and weights["type"] == "int"
    # every routed expert of every layer came out 4-bit (the 16 kept, renumbered 0..15), routers left alone
    for i in range(4):
        for j in range(16):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{i}.mlp.experts.{j}.{proj}.weight_packed" in packed
    assert not any(".mlp.gate." in k for k in packed)
    assert math.isclose(report["ppl_reloaded"], report["ppl_quantized"], rel_tol=1e-4)  # the reload is the model
    assert report["ppl_quantized"] != report["ppl_before"]  # it was quantized ...
    assert report["ppl_quantized"] < 1.1 * report["ppl_before"]  # ... and still a working model


def test_quantize_then_prune_keeps_llm_compressors_format(tmp_path: Path) -> None:
    """The other recipe: llm-compressor quantizes the dense bundled model to W4A16 (pack-quantized), then moeprune
    prunes that checkpoint in memory and model-free: the exports keep its format and quantization_config, the kept
    experts' packed weights and scales are its bytes, and loaded dequantized they give the masked source's logits."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from moeprune.cli import main
    from moeprune.loading import ModelSource
    from moeprune.surgery import masked
    from moeprune.surgery.shards import prune_checkpoint_files
    from tests.quantized_checkpoints import tensors

    llmc = side_python("llmc")
    (tmp_path / "texts.json").write_text(json.dumps(read_bundled_corpus("wiki", "test")[:40]))
    source = tmp_path / "w4a16"
    run_side(llmc, "llmc_oneshot.py", bundled_model_path(), tmp_path / "texts.json", source, timeout=3600)
    assert ModelSource(str(source)).format.key == "ct-pack-quantized"
    model = load_model(bundled_model_path(), dtype="float32")
    mask = make_mask(model, kept_sets=[list(range(1, 32, 2))], num_experts=32)
    mask.save(tmp_path / "mask.json")
    in_memory = tmp_path / "pruned"
    # --force: the mask was made on the bundled model, whose config.json transformers 5.17 re-saved for the source.
    assert main(["apply", str(source), str(tmp_path / "mask.json"), "--out", str(in_memory), "--force"]) == 0
    model_free = prune_checkpoint_files(source, mask, tmp_path / "pruned-mf", ExportOptions(force=True), progress=False)
    src, got, free = tensors(source), tensors(in_memory), tensors(model_free)
    assert sorted(got) == sorted(free) and all(torch.equal(got[n], free[n]) for n in got)
    for j, e in enumerate(mask.kept(0)):
        for part in ("weight_packed", "weight_scale", "weight_shape"):
            assert torch.equal(got[f"model.layers.0.mlp.experts.{j}.down_proj.{part}"],
                               src[f"model.layers.0.mlp.experts.{e}.down_proj.{part}"])
    assert json.loads((in_memory / "config.json").read_text())["quantization_config"] == \
        json.loads((source / "config.json").read_text())["quantization_config"]

    def dequantized(folder: Path):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))

    ids = torch.randint(5, 4000, (2, 32), generator=torch.Generator().manual_seed(0))
    dense = dequantized(source).eval()
    with torch.no_grad(), masked(dense, mask):
        expected = dense(ids).logits
    for out in (in_memory, model_free):
        with torch.no_grad():
            torch.testing.assert_close(dequantized(out).eval()(ids).logits, expected, rtol=1e-4, atol=1e-5)
