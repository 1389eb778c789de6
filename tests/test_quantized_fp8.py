"""FP8 block-scaled checkpoints (DeepSeek-V3's layout): identity, profile -> plan -> apply in both ways, the
export in the source's format (kept tensors byte for byte), its logits through transformers' quantizer, its bytes,
and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeprune.arch import moe_layers
from moeprune.cli import main
from moeprune.loading import ModelSource, config_hash, load_model
from moeprune.planning.mask import ExpertMask, LayerMask
from moeprune.quant import pruned_quantization_config
from moeprune.surgery import masked
from tests.quantized_checkpoints import FP8_CONFIG, build, tensors, write_fp8_block

CALIBRATION = ["--samples", "4", "--seq-len", "16", "--batch-size", "2"]


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def fp8_source(request, tmp_path_factory, tokenizer) -> Path:
    """A tiny FP8 block-scaled checkpoint in 3+ shards, with the bundled tokenizer."""
    path = tmp_path_factory.mktemp("fp8") / request.param
    write_fp8_block(build(request.param, vocab_size=len(tokenizer)), path, max_shard_size="600KB")
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) >= 3, "the test needs a multi-shard source"
    return path


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_config_hash_is_the_same_whether_or_not_the_quantizer_ran(fp8_source):
    """The issue's mismatch: transformers drops quantization_config from a config it dequantized on loading."""
    loaded = load_model(fp8_source, device="cpu")
    assert not hasattr(loaded.config, "quantization_config")  # what made the hashes differ
    source = ModelSource(str(fp8_source))
    assert source.quantization == FP8_CONFIG and ModelSource(loaded).quantization == FP8_CONFIG
    assert source.format.key == "fp8-block" and source.format.block == (128, 128)
    assert config_hash(loaded.config) == source.config_hash


def test_profile_plan_apply_write_the_source_format(fp8_source, tmp_path, text_corpus, capsys):
    prof, masks = tmp_path / "prof", tmp_path / "masks"
    assert main(["profile", str(fp8_source), "--corpus", str(text_corpus), *CALIBRATION, "--out", str(prof)]) == 0
    assert main(["plan", str(prof), "--method", "frequency", "--retain", "0.5", "--out", str(masks)]) == 0
    mask_file = next(masks.glob("*.json"))
    mask = ExpertMask.load(mask_file)
    in_memory, model_free = tmp_path / "in_memory", tmp_path / "model_free"
    assert main(["apply", str(fp8_source), str(mask_file), "--out", str(in_memory)]) == 0
    assert main(["apply", str(fp8_source), str(mask_file), "--out", str(model_free), "--model-free"]) == 0

    source, got, free = tensors(fp8_source), tensors(in_memory), tensors(model_free)
    assert sorted(got) == sorted(free)
    for name, tensor in got.items():  # one writer: the two exports hold the same bytes
        assert tensor.dtype == free[name].dtype and torch.equal(tensor.view(torch.uint8), free[name].view(torch.uint8))
    # Kept experts' FP8 weights and scales are the source's bytes under their new numbers; nothing is dequantized.
    layer = next(iter(mask.layers))
    for new, old in enumerate(mask.kept(layer)):
        for part in ("down_proj.weight", "down_proj.weight_scale_inv", "gate_proj.weight", "up_proj.weight_scale_inv"):
            ours = got[f"model.layers.{layer}.mlp.experts.{new}.{part}"]
            theirs = source[f"model.layers.{layer}.mlp.experts.{old}.{part}"]
            assert ours.dtype == theirs.dtype and torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    assert got[f"model.layers.{layer}.mlp.experts.0.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert f"model.layers.{layer}.mlp.experts.{mask.kept_per_layer}.down_proj.weight" not in got
    config = json.loads((in_memory / "config.json").read_text())
    assert config["quantization_config"] == FP8_CONFIG
    assert json.loads((model_free / "config.json").read_text())["quantization_config"] == FP8_CONFIG

    # The export's bytes are the source's minus the dropped experts' share.
    def size(t: dict) -> int:
        return sum(x.numel() * x.element_size() for x in t.values())

    dropped = sum(x.numel() * x.element_size() for name, x in source.items()
                  if any(f"layers.{i}.mlp.experts.{e}." in name for i in mask.layers
                         for e in set(range(mask.num_experts)) - set(mask.kept(i))))
    router_rows = sum(x.numel() * x.element_size() for name, x in source.items()
                      if name.split(".")[-2] == "gate" and int(name.split(".")[2]) in mask.layers) // 2
    assert size(got) == size(source) - dropped - router_rows
    card = (in_memory / "README.md").read_text()
    assert "FP8 e4m3, 128 x 128 block scales" in card and f"{size(source):,} -> {size(got):,}" in card

    # Loaded through transformers' quantizer (dequantized on the CPU), in float32: the masked source's logits.
    ids = torch.randint(5, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(fp8_source, dtype=torch.float32).eval()
    with masked(dense, mask):
        expected = _logits(dense, ids)
    for out in (in_memory, model_free):
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(_logits(pruned, ids), expected, rtol=1e-4, atol=1e-5)

    capsys.readouterr()
    assert main(["inspect", str(in_memory)]) == 0
    shown = capsys.readouterr().out
    assert "weights      FP8 e4m3, 128 x 128 block scales" in shown
    assert f"bytes        {size(got):,} in tensors (source {size(source):,}" in shown


def test_dequantize_writes_bf16_without_quantization_config(fp8_source, tmp_path):
    mask = _half_mask(fp8_source)
    mask.save(tmp_path / "mask.json")
    out = tmp_path / "bf16"
    assert main(["apply", str(fp8_source), str(tmp_path / "mask.json"), "--out", str(out), "--dequantize"]) == 0
    written = tensors(out)
    assert {t.dtype for t in written.values()} <= {torch.bfloat16, torch.float32}
    assert not any(name.endswith("weight_scale_inv") for name in written)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert "--dequantize" in (out / "README.md").read_text()


def _half_mask(folder: Path) -> ExpertMask:
    """Keep experts 0, 2, 5, 7 (two per routing group) in every MoE layer."""
    model = load_model(folder, device="cpu")
    return ExpertMask(str(folder), "random", 0.5, 8, 4,
                      {layer.index: LayerMask([0, 2, 5, 7]) for layer in moe_layers(model)},
                      extra={"config_hash": config_hash(model.config)})


def test_ignore_lists_naming_experts_are_renumbered_or_dropped():
    quantization = {**FP8_CONFIG, "modules_to_not_convert": [
        "lm_head", "model.layers.1.mlp.gate", "model.layers.1.mlp.experts.5.down_proj", "model.layers.1.mlp.experts.3",
        "model.layers.2.mlp.experts.7.up_proj", "re:.*experts.*norm"]}
    edited = pruned_quantization_config(quantization, {1: [0, 2, 5, 7], 2: [1, 3, 6, 7]})
    assert edited["modules_to_not_convert"] == [
        "lm_head", "model.layers.1.mlp.gate", "model.layers.1.mlp.experts.2.down_proj",
        "model.layers.2.mlp.experts.3.up_proj", "re:.*experts.*norm"]
    assert quantization["modules_to_not_convert"][2].endswith("experts.5.down_proj")  # the source's is untouched


def _refused(capsys, argv: list[str], out: Path) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert not out.exists() and not any(out.parent.glob(f".{out.name}*"))
    return err


@pytest.fixture
def small_fp8(tmp_path, tokenizer) -> Path:
    path = tmp_path / "fp8"
    write_fp8_block(build("qwen3_moe", vocab_size=len(tokenizer)), path)
    tokenizer.save_pretrained(path)
    return path


def _mask_file(folder: Path, tmp_path: Path) -> Path:
    config = json.loads((folder / "config.json").read_text())
    layers = range(config["num_hidden_layers"])
    mask = ExpertMask(str(folder), "random", 0.5, 8, 4, {i: LayerMask([0, 2, 5, 7]) for i in layers})
    mask.save(tmp_path / "mask.json")
    return tmp_path / "mask.json"


@pytest.mark.parametrize("model_free", [False, True])
def test_a_method_transformers_cannot_read_is_refused(small_fp8, tmp_path, capsys, model_free):
    mask = _mask_file(small_fp8, tmp_path)
    config = json.loads((small_fp8 / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "bogus-int3"
    (small_fp8 / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    err = _refused(capsys, ["apply", str(small_fp8), str(mask), "--out", str(out), *(["--model-free"] * model_free)],
                   out)
    assert "quant_method 'bogus-int3', which this transformers cannot read" in err and len(err.splitlines()) == 1
    assert "cannot read" in _refused(capsys, ["profile", str(small_fp8), "--corpus", "wiki", *CALIBRATION, "--out",
                                               str(tmp_path / "prof")], tmp_path / "prof")


@pytest.mark.parametrize("model_free", [False, True])
def test_a_missing_scale_of_a_kept_expert_is_refused(small_fp8, tmp_path, capsys, model_free):
    mask = _mask_file(small_fp8, tmp_path)
    state = tensors(small_fp8)
    del state["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"]
    from safetensors.torch import save_file

    save_file(state, str(small_fp8 / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    err = _refused(capsys, ["apply", str(small_fp8), str(mask), "--out", str(out), *(["--model-free"] * model_free)],
                   out)
    assert "model.layers.1.mlp.experts.5.down_proj.weight (FP8" in err and "weight_scale_inv next to it" in err
    assert len(err.splitlines()) == 1


def test_a_block_the_expert_shape_does_not_divide_is_refused(tmp_path, tokenizer, capsys):
    source = write_fp8_block(build("qwen3_moe", vocab_size=len(tokenizer), expert_width=192), tmp_path / "fp8")
    tokenizer.save_pretrained(source)
    mask = _mask_file(source, tmp_path)
    for extra in ([], ["--model-free"]):
        out = tmp_path / "out"
        err = _refused(capsys, ["apply", str(source), str(mask), "--out", str(out), *extra], out)
        assert "is not a whole number of 128 x 128 blocks" in err and "192" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("model_free", [False, True])
def test_per_tensor_fp8_is_written_back_too(tmp_path, tokenizer, model_free):
    quantization = {**FP8_CONFIG, "weight_block_size": None}
    source = write_fp8_block(build("qwen3_moe", vocab_size=len(tokenizer)), tmp_path / "fp8", quantization=quantization)
    tokenizer.save_pretrained(source)
    assert ModelSource(str(source)).format.key == "fp8-tensor"
    mask_file = _mask_file(source, tmp_path)
    mask = ExpertMask.load(mask_file)
    out = tmp_path / "out"
    assert main(["apply", str(source), str(mask_file), "--out", str(out), *(["--model-free"] * model_free)]) == 0
    src, got = tensors(source), tensors(out)
    for new, old in enumerate(mask.kept(1)):
        for part in ("up_proj.weight", "up_proj.weight_scale_inv"):
            ours = got[f"model.layers.1.mlp.experts.{new}.{part}"]
            theirs = src[f"model.layers.1.mlp.experts.{old}.{part}"]
            assert ours.shape == theirs.shape and torch.equal(ours.reshape(-1).view(torch.uint8),
                                                              theirs.reshape(-1).view(torch.uint8))
    assert json.loads((out / "config.json").read_text())["quantization_config"] == quantization
    ids = torch.randint(5, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with masked(dense, mask):
        expected = _logits(dense, ids)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids),
                               expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_free", [False, True])
def test_a_layout_moeprune_does_not_write_back_is_refused_with_the_fix(small_fp8, tmp_path, capsys, model_free):
    """GPTQ (transformers reads it) has no writer here: apply refuses before loading and names --dequantize."""
    mask = _mask_file(small_fp8, tmp_path)
    config = json.loads((small_fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (small_fp8 / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    err = _refused(capsys, ["apply", str(small_fp8), str(mask), "--out", str(out), *(["--model-free"] * model_free)],
                   out)
    assert "does not write back in its own format" in err and "--dequantize" in err and len(err.splitlines()) == 1


def test_recovery_on_a_quantized_source_is_refused_before_it_runs(small_fp8, tmp_path, capsys, text_corpus):
    mask = _mask_file(small_fp8, tmp_path)
    out = tmp_path / "out"
    err = _refused(capsys, ["apply", str(small_fp8), str(mask), "--out", str(out), "--recover", "router-kd",
                            "--recover-corpus", f"notes={text_corpus}", "--recover-seq-len", "16"], out)
    assert "is quantized (fp8)" in err and "--dequantize with --recover" in err and len(err.splitlines()) == 1


def test_a_partial_block_outside_the_experts_is_refused_for_compute_only(tmp_path, tokenizer, capsys, text_corpus):
    """3 heads of 64: q/k/v_proj have 192 rows, two 128-row blocks of which the last is partial. transformers 5.25
    dequantizes with the block read from the scale grid (192 / 2 = 96 rows): wrong weights. Profiling is refused;
    model-free apply, which never dequantizes, slices the checkpoint as it is."""
    source = write_fp8_block(build("qwen3_moe", vocab_size=len(tokenizer), num_attention_heads=3,
                                   num_key_value_heads=3), tmp_path / "fp8")
    tokenizer.save_pretrained(source)
    err = _refused(capsys, ["profile", str(source), "--corpus", f"notes={text_corpus}", *CALIBRATION, "--out",
                            str(tmp_path / "prof")], tmp_path / "prof")
    assert "ends in a partial 128 x 128 block" in err and "--model-free" in err and len(err.splitlines()) == 1
    mask = _mask_file(source, tmp_path)
    assert main(["apply", str(source), str(mask), "--out", str(tmp_path / "out"), "--model-free"]) == 0
    # the partial-block tensors pass through untouched; kept experts byte-identical, renumbered
    src, got = tensors(source), tensors(tmp_path / "out")
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight_scale_inv"):
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), src[name].reshape(-1).view(torch.uint8))
    for new, old in enumerate(ExpertMask.load(mask).kept(1)):
        for part in ("down_proj.weight", "down_proj.weight_scale_inv"):
            ours = got[f"model.layers.1.mlp.experts.{new}.{part}"]
            theirs = src[f"model.layers.1.mlp.experts.{old}.{part}"]
            assert torch.equal(ours.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8))
