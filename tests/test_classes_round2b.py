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
