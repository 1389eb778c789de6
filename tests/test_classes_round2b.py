# ruff: noqa: F811 - the fixtures of tests/test_contract.py are imported and used as arguments
"""Issue 27, round 2b: the classes the second round left (C4 stale reuse, C7 odd models and values, C8 late
refusals) and argparse's own errors. docs/errors.md's "Second round" table lists them."""

from __future__ import annotations

import json

import pytest

from moeprune import api
from moeprune.cli import main
from moeprune.errors import MoePruneError
from tests.test_contract import (  # noqa: F401 (fixtures)
    CALIBRATION,
    mask_file,
    model,
    ok,
    profiled,
    refused,
    snapshot,
)


# ------------------------------------------------------------------ argparse: one line, exit 2
@pytest.mark.parametrize("argv, expected", [
    (["plan", "p", "--retain", "x", "--out", "m"], ["moeprune plan: error: argument --retain", "moeprune plan --help"]),
    (["plan", "p", "--retain", "0.5", "--out", "m", "--bogus"], ["unrecognized arguments: --bogus", "plan --help"]),
    (["inspect", "x", "--out", "y"], ["moeprune inspect: error: unrecognized", "moeprune inspect --help"]),
    (["profile"], ["moeprune profile: error: the following arguments are required", "profile --help"]),
    ([], ["moeprune: error: the following arguments are required: VERB", "moeprune --help"]),
    (["frob"], ["invalid choice: 'frob'", "moeprune --help"]),
    (["inspect", "x", "-q", "-v"], ["not allowed with argument", "inspect --help"]),
    (["plan", "p", "--retain", "0.5", "--out", "m", "--x\x1b[31mred"], ["unrecognized arguments: --xred"]),
])
def test_argparse_errors_are_one_line(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "usage:" not in captured.err and not captured.out, captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "\x1b" not in lines[0]
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ C7: config values of the wrong type
@pytest.mark.parametrize("field, value", [
    ("num_experts_per_tok", "2"), ("num_experts_per_tok", 2.0), ("num_experts_per_tok", True),
    ("num_experts_per_tok", None), ("num_experts", "8"), ("num_experts", 8.0),
    ("norm_topk_prob", "false"), ("norm_topk_prob", 2), ("norm_topk_prob", None),
])
def test_c7_a_config_value_of_the_wrong_type_is_one_line(field, value, model, mask_file, tmp_path, capsys):
    config = json.loads((model / "config.json").read_text())
    config[field] = value
    (model / "config.json").write_text(json.dumps(config))
    refused(capsys, ["profile", model, *CALIBRATION, "--out", tmp_path / "p"], field, "config.json",
            untouched=(model,))
    # model-free apply read config.json's dict when transformers could not build the config: it exported
    # a checkpoint no reader can load
    refused(capsys, ["apply", model, mask_file, "--model-free", "--out", tmp_path / "o"], field, untouched=(model,))
    with pytest.raises(MoePruneError, match=field):
        api.profile(str(model), ["wiki"], str(tmp_path / "q"), calibration={"samples": 2, "seq_len": 16})
    assert not any(p.name in "poq" for p in tmp_path.iterdir())


# ------------------------------------------------------------------ C7: broken weights in model-free apply
@pytest.mark.parametrize("tensor, value", [("mlp.gate.weight", float("inf")), ("embed_tokens", float("nan")),
                                           ("shared_expert.down_proj", float("-inf"))])
def test_c7_model_free_refuses_nan_weights_as_plain_apply_does(tensor, value, model, mask_file, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if tensor in k)
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = value
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    refused(capsys, ["apply", model, mask_file, "--model-free", "--out", tmp_path / "o"], name, "NaN or infinite",
            untouched=(model,))
    assert not (tmp_path / "o").exists()


def test_c7_an_expert_of_another_shape_is_a_broken_checkpoint(model, mask_file, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if "experts.0.up_proj" in k)
    weights[name] = torch.zeros((0, *weights[name].shape[1:]))
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    # transformers' weight conversion failed with a RuntimeError traceback; model-free exported it as it was
    refused(capsys, ["profile", model, *CALIBRATION, "--out", tmp_path / "p"], "shapes", untouched=(model,))
    refused(capsys, ["apply", model, mask_file, "--model-free", "--out", tmp_path / "o"], "differ in shape",
            untouched=(model,))
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


# ------------------------------------------------------------------ C4: stale reuse
def _same_size_same_mtime_edit(model) -> None:
    """Scale one expert's weights in place and put the file's times back (`touch -r`): same size, same mtime."""
    import os

    from safetensors.torch import load_file, save_file

    path = model / "model.safetensors"
    before = path.stat()
    weights = load_file(str(path))
    name = next(k for k in weights if "experts.0.down_proj" in k)
    weights[name] = weights[name] * 1.5
    save_file(weights, str(path), metadata={"format": "pt"})
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


def test_c4_weights_changed_in_place_with_the_mtime_put_back(model, tmp_path, capsys):
    from moeprune.io import checkpoint_fingerprint

    prof = tmp_path / "p"
    ok(["profile", model, *CALIBRATION, "--out", prof])
    old = checkpoint_fingerprint(model)
    _same_size_same_mtime_edit(model)
    assert checkpoint_fingerprint(model) != old  # names, sizes, mtimes and headers are all the same
    # it was "already profiled"; now the folder's corpus is of other weights
    refused(capsys, ["profile", model, *CALIBRATION, "--out", prof], "other weights", untouched=(prof,))


def test_c4_a_copy_keeps_its_fingerprint(model, tiny_checkpoint):
    from moeprune.io import checkpoint_fingerprint

    assert checkpoint_fingerprint(model) == checkpoint_fingerprint(tiny_checkpoint)  # copytree keeps the times


def _interrupted_profile(model, out, monkeypatch) -> None:
    """A profile run killed after two of four windows: `out/wiki.partial.*` holds a resume checkpoint."""
    from moeprune.profiling import runner

    real, calls = runner.profile_windows, []

    def interrupted(loaded, *args, **kwargs):
        def stop(module, args, kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt

        hook = loaded.base_model.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            return real(loaded, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(runner, "profile_windows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.profile(str(model), ["wiki"], str(out), calibration=RESUMED, progress=False)
    monkeypatch.undo()
    assert (out / "wiki.partial.safetensors").exists()


RESUMED = {"samples": 4, "seq_len": 16, "batch_size": 1, "checkpoint_every": 1}


def _edit_sums(folder, scale):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = folder / "wiki.partial.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["gate_sum"] = tensors["gate_sum"] * scale
    save_file(tensors, str(path), metadata=metadata)


def _edit_meta(folder, **changes):
    path = folder / "wiki.partial.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("edit", [
    lambda folder: None,  # a genuine resume equals a clean run
    lambda folder: _edit_sums(folder, 3.0),  # sums edited, counts intact: was resumed from
    lambda folder: _edit_meta(folder, windows_done=3),  # was resumed, then its profile refused after the work
    lambda folder: _edit_meta(folder, windows_done=999),
    lambda folder: _edit_meta(folder, windows_done=-1),
], ids=["genuine", "sums-edited", "windows-done-3", "windows-done-999", "windows-done-negative"])
def test_c4_a_resume_checkpoint_edited_by_hand_is_not_resumed_from(edit, tiny_checkpoint, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    clean = tmp_path / "clean"
    api.profile(str(tiny_checkpoint), ["wiki"], str(clean), calibration=RESUMED, progress=False)
    resumed = tmp_path / "resumed"
    _interrupted_profile(tiny_checkpoint, resumed, monkeypatch)
    edit(resumed)
    api.profile(str(tiny_checkpoint), ["wiki"], str(resumed), calibration=RESUMED, progress=False)
    want, got = load_file(str(clean / "wiki.safetensors")), load_file(str(resumed / "wiki.safetensors"))
    assert all(torch.allclose(got[k], want[k]) for k in want)
    assert not (resumed / "wiki.partial.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncated", "nan", "rows", "other-layer-shape"])
def test_c4_captured_inputs_are_checked_before_use(damage, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from moeprune.reconstruction import WorkDir, capture_moe_inputs
    from tests.reconstruction.test_reconstruction_loss import windows
    from tests.tiny_models import build_model

    model = build_model("qwen2_moe")
    folder = capture_moe_inputs(model, windows(model.config.vocab_size), tmp_path, "k", batch_size=3, progress=False)
    batch = folder / "batch_00000.safetensors"
    tensors = load_file(str(batch))
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:100])
    else:
        if damage == "nan":
            tensors["layer_0"][0, 0] = float("nan")
        elif damage == "rows":
            tensors["layer_0"] = tensors["layer_0"][:-1]
        else:
            tensors["layer_0"] = torch.zeros(tensors["layer_0"].shape[0], 3)
        save_file(tensors, str(batch))
    # a traceback inside safetensors or torch.cat, or NaN inputs silently reconstructed from, before
    with pytest.raises(MoePruneError, match="Captured inputs.*delete"):
        WorkDir(tmp_path, "k").load_layer(0)
