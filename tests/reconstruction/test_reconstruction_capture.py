"""Capture runs once, resumes, refuses other data under the same key; the public entry builds a mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from moeprune.planning.mask import ExpertMask
from moeprune.reconstruction import (
    SearchSettings,
    WorkDir,
    capture_moe_inputs,
    expert_sparsity_mask,
    reconstruction_selection,
    selections,
)
from moeprune.reconstruction import capture as capture_module
from tests.reconstruction.test_reconstruction_loss import SAMPLES, SEQ_LEN, windows
from tests.tiny_models import build_model


def _count_block_calls(model) -> list[int]:
    calls = [0]
    moe_layers(model)[0].block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_capture_matches_block_inputs_and_is_skipped_when_present(tmp_path: Path) -> None:
    model = build_model("qwen2_moe")
    tokens = windows(model.config.vocab_size)
    calls = _count_block_calls(model)
    folder = capture_moe_inputs(model, tokens, tmp_path, "k", batch_size=3, progress=False)
    assert calls[0] == 2  # 4 windows in batches of 3
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokens"] == SAMPLES * SEQ_LEN and meta["layers"] == [0, 2]  # layer 1 is dense
    assert not (folder / "parts").exists()

    seen = {}
    layer = moe_layers(model)[0]
    hook = layer.block.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=tokens)
    hook.remove()
    captured = WorkDir(tmp_path, "k").load_layer(layer.index)
    torch.testing.assert_close(captured, seen["x"].reshape(-1, captured.shape[-1]))

    capture_moe_inputs(model, tokens, tmp_path, "k", batch_size=3, progress=False)
    assert calls[0] == 3  # the direct forward above; the second capture ran nothing


def test_capture_resumes_after_complete_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("mixtral")
    tokens = windows(model.config.vocab_size)
    work = WorkDir(tmp_path / "reference", "k")
    capture_moe_inputs(model, tokens, work.root, "k", batch_size=1, progress=False)
    # A crash after two of four batches: their parts and the pending spec stay behind.
    run_all = capture_module._run_batches
    monkeypatch.setattr(capture_module, "_run_batches", lambda m, t, b, w, todo, p: run_all(m, t, b, w, todo[:2], p))
    with pytest.raises(MoePruneError, match="resume"):
        capture_moe_inputs(model, tokens, tmp_path, "k", batch_size=1, progress=False)
    monkeypatch.undo()
    calls = _count_block_calls(model)
    capture_moe_inputs(model, tokens, tmp_path, "k", batch_size=1, progress=False)
    assert calls[0] == 2
    torch.testing.assert_close(WorkDir(tmp_path, "k").load_layer(0), work.load_layer(0))


def test_same_key_other_tokens_is_an_error(tmp_path: Path) -> None:
    model = build_model("olmoe")
    capture_moe_inputs(model, windows(model.config.vocab_size, 0), tmp_path, "k", progress=False)
    with pytest.raises(MoePruneError, match="another key"):
        capture_moe_inputs(model, windows(model.config.vocab_size, 1), tmp_path, "k", progress=False)


def test_selection_for_several_k_and_mask(tmp_path: Path) -> None:
    model = build_model("deepseek_v3")
    tokens = windows(model.config.vocab_size)
    results = reconstruction_selection(model, tokens, [4, 6], WorkDir(tmp_path, "k"), progress=False)
    assert sorted(results) == [4, 6]
    assert all(len(r.kept) == 4 and r.search == "exact" for r in results[4].values())
    assert selections(results, 6) == {layer: r.kept for layer, r in results[6].items()}
    kept, loss = results[6][1]  # results unpack as (kept, loss)
    assert kept == results[6][1].kept and loss == results[6][1].loss

    mask = expert_sparsity_mask(model, tokens, 0.5, WorkDir(tmp_path, "k"), progress=False, corpus="c4")
    assert isinstance(mask, ExpertMask) and mask.method == "expert-sparsity" and mask.kept_per_layer == 4
    for layer, lm in mask.layers.items():
        assert lm.kept == results[4][layer].kept
        assert lm.extra == {"reconstruction_loss": results[4][layer].loss, "search": "exact"}
    assert ExpertMask.from_json(json.loads(json.dumps(mask.to_json()))).kept(1) == mask.kept(1)


def test_capture_writes_each_activation_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("qwen2_moe")
    tokens = windows(model.config.vocab_size)
    written: list[int] = []
    save = capture_module.save_safetensors_atomic  # captures write through the one atomic-file helper

    def counting_save(path, tensors: dict, *args, **kwargs) -> None:
        written.append(sum(t.numel() for t in tensors.values()))
        save(path, tensors, *args, **kwargs)

    monkeypatch.setattr(capture_module, "save_safetensors_atomic", counting_save)
    folder = capture_moe_inputs(model, tokens, tmp_path, "k", batch_size=3, progress=False)
    hidden = model.config.hidden_size
    assert len(written) == 2  # one file per batch (4 windows in batches of 3), nothing joined afterwards
    assert sum(written) == 2 * SAMPLES * SEQ_LEN * hidden  # two MoE layers' inputs, each written once
    assert sorted(p.name for p in folder.iterdir()) == ["batch_00000.safetensors", "batch_00001.safetensors",
                                                         "meta.json"]
    assert WorkDir(tmp_path, "k").load_layer(2).shape == (SAMPLES * SEQ_LEN, hidden)


def test_token_budget_bounds_the_captured_tokens(tmp_path: Path) -> None:
    model = build_model("mixtral")
    tokens = windows(model.config.vocab_size)  # 4 windows of 16
    results = reconstruction_selection(model, tokens, 4, WorkDir(tmp_path, "k"), SearchSettings(token_budget=40),
                                       progress=False)
    meta = WorkDir(tmp_path, "k").read_meta()
    assert meta["tokens"] == 32 <= 40 and meta["samples"] == 2  # whole windows only
    assert all(WorkDir(tmp_path, "k").load_layer(i).shape[0] == 32 for i in meta["layers"])
    assert sorted(results) == [4]
    with pytest.raises(MoePruneError, match="recon-tokens"):
        reconstruction_selection(model, tokens, 4, WorkDir(tmp_path, "k2"), SearchSettings(token_budget=SEQ_LEN - 1),
                                 progress=False)
    with pytest.raises(MoePruneError, match="per-batch"):
        SearchSettings(loss="frobenius")
