"""Pruned exports fit what vLLM's loaders expect (key names, shapes, expert-count fields), checked statically.

The expectations are data in tests/readers/vllm_layout.py, read from vLLM 0.34.0's source; these tests need no
vLLM and run in the default suite. ``test_the_data_matches_vllm_source`` re-reads a vLLM source tree when one is
unpacked under MOEPRUNE_READERS_HOME/vllm-src (scripts/check_readers.py does it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from moeprune.bundled import bundled_model_path
from moeprune.loading import ModelSource, load_model
from moeprune.surgery import export_pruned
from tests.surgery import make_mask
from tests.tiny_models import build_model, save_model

from .conftest import HOME
from .vllm_layout import ANCHORS, LAYOUTS, VLLM_VERSION


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("vllm"), {}

    def get(arch: str) -> Path:
        if arch not in made:
            model = build_model(arch)
            source = save_model(model, root / f"{arch}-source")
            made[arch] = export_pruned(ModelSource.of(source, trust_remote_code=arch == "deepseek"),
                                       make_mask(model), root / f"{arch}-pruned", progress=False)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_pruned_export_fits_vllm_loader(arch: str, exports) -> None:
    out = exports(arch)
    assert json.loads((out / "config.json").read_text())[LAYOUTS[arch].experts_key] == 4
    assert LAYOUTS[arch].check(out) == []


def test_pruned_bundled_model_fits_vllm_loader(tmp_path: Path) -> None:
    model = load_model(bundled_model_path(), dtype="float32")
    mask = make_mask(model, kept_sets=[list(range(0, 32, 2))], num_experts=32)
    out = export_pruned(bundled_model_path(), mask, tmp_path / "pruned", progress=False)
    assert LAYOUTS["qwen2_moe"].check(out) == []
    assert LAYOUTS["qwen2_moe"].check(bundled_model_path()) == []  # and the dense source, for comparison


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek"])
def test_the_check_finds_what_vllm_would_reject(arch: str, exports, tmp_path: Path) -> None:
    """A stale expert count, a missing expert and a stray key each show (the check can fail)."""
    layout, out = LAYOUTS[arch], exports(arch)
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((out / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, layout.experts_key: 8}))
    state = load_file(str(out / "model.safetensors"))
    save_file(state, str(broken / "model.safetensors"))
    assert any("vLLM builds (8," in p for p in layout.check(broken))
    (broken / "config.json").write_text(json.dumps(config))
    key = next(k for k in state if ".experts.3." in k)
    state[key.replace(".experts.3.", ".experts.4.")] = state.pop(key)
    save_file(state, str(broken / "model.safetensors"))
    problems = layout.check(broken)
    assert any(".experts.3." in p for p in problems) and any(".experts.4." in p for p in problems), problems


def test_the_data_matches_vllm_source() -> None:
    models = HOME / "vllm-src" / "vllm" / "model_executor" / "models"
    if not models.is_dir():
        pytest.skip(f"no vLLM source at {models}: `python scripts/check_readers.py --build-only` unpacks "
                    f"vllm=={VLLM_VERSION}'s model files there")
    missing = [(name, line) for name, lines in ANCHORS.items() for line in lines
               if line not in (models / name).read_text()]
    assert missing == [], f"vLLM's loaders changed since {VLLM_VERSION}: update tests/readers/vllm_layout.py"
