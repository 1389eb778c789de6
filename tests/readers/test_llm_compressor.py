"""llm-compressor (a side venv) quantizes the pruned bundled model to W4A16 and the result reloads and runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moeprune.bundled import bundled_model_path, read_bundled_corpus
from moeprune.loading import load_model
from moeprune.surgery import export_pruned
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
