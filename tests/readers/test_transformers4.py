"""transformers 4.57 (a side venv) loads moeprune's pruned exports with transformers 5's logits (fp32, <= 1e-4).

Sources are saved the way hub checkpoints are published for 4.x (``rope_theta``/``torch_dtype`` in config.json,
here with a non-default rope base): moeprune keeps the source's config.json with only the expert count changed,
so a 4.x reader gets the same rope base. A control shows the check has teeth: transformers 5's own config.json
(``rope_parameters``) makes 4.x fall back to its default base and the logits move.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune.bundled import bundled_model_path, read_bundled_corpus
from moeprune.loading import ModelSource, load_model
from moeprune.surgery import export_pruned
from tests.surgery import make_mask
from tests.tiny_models import build_model, save_model

from .conftest import run_side, side_python

pytestmark = pytest.mark.readers

ATOL = 1e-4
ROPE_THETA = 250000.0  # no architecture's default, so a reader that ignores the config's rope base shows
IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3))
NATIVE = ["qwen2_moe", "mixtral", "deepseek_v2"]  # architectures transformers 4.57 implements itself
DEEPSEEK_CODE = "MOEPRUNE_DEEPSEEK_REMOTE_CODE"  # folder with the hub's configuration/modeling_deepseek.py


@pytest.fixture(scope="module")
def tf4() -> Path:
    return side_python("tf4")


def hub_style_config(folder: Path, rope_theta: float = ROPE_THETA) -> None:
    """Rewrite a transformers-5 config.json as 4.x-era hub checkpoints publish it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters", None) or {}
    assert rope.get("rope_type", "default") == "default", rope
    config.update(rope_theta=rope_theta, rope_scaling=None, torch_dtype=config.pop("dtype", "float32"))
    path.write_text(json.dumps(config, indent=2))


def tf4_logits(tf4: Path, model: Path, tmp: Path, *extra: str, ids: torch.Tensor = IDS) -> tuple[dict, dict]:
    save_file({"ids": ids.contiguous()}, str(tmp / "ids.safetensors"))
    out = tmp / f"tf4-{model.name}.safetensors"
    report = json.loads(run_side(tf4, "tf4_logits.py", model, tmp / "ids.safetensors", out, *extra).splitlines()[-1])
    return load_file(str(out)), report


@torch.no_grad()
def tf5_logits(model: Path, ids: torch.Tensor = IDS, trust_remote_code: bool = False) -> torch.Tensor:
    return load_model(model, dtype="float32", trust_remote_code=trust_remote_code)(input_ids=ids).logits.float()


def pruned_export(arch: str, tmp: Path) -> Path:
    model = build_model(arch)
    source = save_model(model, tmp / f"{arch}-source")
    hub_style_config(source)
    return export_pruned(ModelSource.of(source, trust_remote_code=arch == "deepseek"), make_mask(model),
                         tmp / f"{arch}-pruned", progress=False)


@pytest.mark.parametrize("arch", NATIVE)
def test_transformers4_logits_equal_transformers5(arch: str, tf4: Path, tmp_path: Path) -> None:
    out = pruned_export(arch, tmp_path)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == ROPE_THETA
    side, report = tf4_logits(tf4, out, tmp_path)
    assert report["transformers"].startswith("4.57") and report["rope_theta"] == ROPE_THETA, report
    diff = (side["logits"] - tf5_logits(out)).abs().max().item()
    print(f"{arch}: transformers {report['transformers']} vs 5 max |diff| {diff:.3g}")
    assert diff <= ATOL, (arch, diff)


def test_transformers5_config_json_would_move_4x_logits(tf4: Path, tmp_path: Path) -> None:
    """Control: the same weights with transformers 5's config.json (rope_parameters) give 4.x other logits."""
    out = pruned_export("qwen2_moe", tmp_path)
    shutil.copytree(out, tmp_path / "v5-config")
    load_model(out, dtype="float32").config.save_pretrained(tmp_path / "v5-config")
    assert "rope_theta" not in json.loads((tmp_path / "v5-config" / "config.json").read_text())
    side, report = tf4_logits(tf4, tmp_path / "v5-config", tmp_path)
    assert report["rope_theta"] != ROPE_THETA
    assert (side["logits"] - tf5_logits(out)).abs().max().item() > 1e-2


def test_deepseek_moe_remote_code_on_transformers4(tf4: Path, tmp_path: Path) -> None:
    """DeepSeek-MoE (model_type deepseek) runs on 4.x only through the hub's remote code."""
    code = os.environ.get(DEEPSEEK_CODE)
    if not code:
        pytest.skip(f"set {DEEPSEEK_CODE} to a folder holding deepseek-ai/deepseek-moe-16b-base's "
                    "configuration_deepseek.py and modeling_deepseek.py (not redistributable here, no download)")
    out = pruned_export("deepseek", tmp_path)
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):  # replace the tests' poison stand-ins
        shutil.copyfile(Path(code) / name, out / name)
    side, _ = tf4_logits(tf4, out, tmp_path, "--trust-remote-code")
    diff = (side["logits"] - tf5_logits(out, trust_remote_code=True)).abs().max().item()
    print(f"deepseek: transformers 4 remote code vs moeprune's port max |diff| {diff:.3g}")
    assert diff <= ATOL, diff


def test_pruned_bundled_model_and_tokenizer_on_transformers4(tf4: Path, tmp_path: Path) -> None:
    model = load_model(bundled_model_path(), dtype="float32")
    mask = make_mask(model, kept_sets=[list(range(0, 32, 2)), list(range(1, 32, 2))], num_experts=32)
    out = export_pruned(bundled_model_path(), mask, tmp_path / "bundled-pruned", progress=False)
    texts = read_bundled_corpus("web", "test")[:8] + ["", "ünïcödé <|endoftext|> 123"]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(4))
    side, report = tf4_logits(tf4, out, tmp_path, "--texts", tmp_path / "texts.json", ids=ids)
    diff = (side["logits"] - tf5_logits(out, ids)).abs().max().item()
    print(f"bundled (16 of 32 experts): transformers {report['transformers']} vs 5 max |diff| {diff:.3g}")
    assert diff <= ATOL, diff
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    for i, text in enumerate(texts):
        assert side[f"text_ids_{i}"].tolist() == (tok(text)["input_ids"] or [-1]), text
