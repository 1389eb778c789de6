# ruff: noqa: F811 - the fixtures of tests/test_contract.py are imported and used as arguments
"""Issue 27, a second round of the same classes: members the first round (tests/test_classes.py) did not try,
each closed where its class lives. docs/errors.md's "Second round" table lists them."""

from __future__ import annotations

import json

import pytest

from moeprune import api
from moeprune.errors import MoePruneError
from moeprune.inspect import describe
from moeprune.planning.request import PlanRequest
from tests.test_contract import (  # noqa: F401 (fixtures)
    CALIBRATION,
    mask_file,
    model,
    ok,
    profiled,
    refused,
    snapshot,
)

PPL = ["--ppl", "wiki", "--ppl-windows", "1", "--ppl-seq-len", "16", "--tasks", "none"]


# ------------------------------------------------------------------ C1/C7: numbers on the command line
@pytest.mark.parametrize("argv", [
    ["profile", "{model}", "--samples", "٣", "--out", "{tmp}/p"],
    ["profile", "{model}", "--samples", "1_0", "--out", "{tmp}/p"],
    ["profile", "{model}", "--seed", "²", "--out", "{tmp}/p"],
    ["plan", "{prof}", "--method", "reap", "--retain", "٠.٥", "--out", "{tmp}/m"],
    ["plan", "{prof}", "--method", "reap", "--retain", "0_5", "--out", "{tmp}/m"],
    ["plan", "{prof}", "--method", "tb-coverage", "-B", "٣", "--retain", "0.5", "--out", "{tmp}/m"],
])
def test_c7_number_flags_take_ascii_only(argv, tiny_checkpoint, profiled, tmp_path, capsys):
    argv = [a.format(model=tiny_checkpoint, prof=profiled, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        from moeprune.cli import main
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "ASCII" in err or "whole number" in err, err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ C1: profile metadata
@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.pop("format"), "format"),
    (lambda m: m.__setitem__("format", "moeprune.mask/1"), "format"),
    (lambda m: m.__setitem__("moe_layers", [m["moe_layers"][0]] * 2), "not increasing"),
    (lambda m: m.__setitem__("moe_layers", m["moe_layers"][::-1]), "not increasing"),
    (lambda m: m.__setitem__("dtype", 5), "'dtype'"),
])
def test_c1_profile_metadata_says_what_its_file_is(edit, expected, profiled, tmp_path, capsys):
    prof = tmp_path / "prof"
    prof.mkdir()
    for item in profiled.iterdir():
        (prof / item.name).write_bytes(item.read_bytes())
    meta = json.loads((prof / "wiki.json").read_text())
    edit(meta)
    (prof / "wiki.json").write_text(json.dumps(meta))
    refused(capsys, ["plan", prof, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "m"], expected,
            untouched=(tmp_path,))


# ------------------------------------------------------------------ C3/C6: eval's results file
def test_c3_eval_out_never_adds_a_file_to_the_model(model, tmp_path, capsys):
    refused(capsys, ["eval", model, *PPL, "--out", model / "results.json"], "a file of the input",
            untouched=(model,))
    refused(capsys, ["eval", model, *PPL, "--out", model / "sub" / "results.json", "--overwrite"],
            "a file of the input", untouched=(model,))


def test_c6_api_evaluate_checks_its_out_as_the_cli(model, mask_file, tmp_path):
    mask = tmp_path / "mask.json"
    mask.write_bytes(mask_file.read_bytes())
    settings = {"ppl_datasets": ["wiki"], "ppl_seq_len": 16, "max_windows": 1, "tasks": "none"}
    before = snapshot(tmp_path, model)
    for out in (mask, model / "results.json", model / "config.json"):
        with pytest.raises(MoePruneError, match="input"):
            api.evaluate(model, mask=mask, settings=settings, out=out, overwrite=True, progress=False)
    assert snapshot(tmp_path, model) == before


# ------------------------------------------------------------------ C5: flags accepted and ignored
def test_c5_plan_refuses_model_flags_when_planning_reads_only_the_profile(profiled, tmp_path, capsys):
    base = ["plan", profiled, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "m"]
    for flag in ("--stream", "--no-stream", "--trust-remote-code"):
        refused(capsys, [*base, flag], f"{flag} has no effect here", untouched=(tmp_path,))


def test_c5_dequantize_needs_a_quantized_checkpoint(model, mask_file, tmp_path, capsys):
    refused(capsys, ["apply", model, mask_file, "--out", tmp_path / "o", "--dequantize"],
            "--dequantize has no effect here", untouched=(tmp_path,))
    with pytest.raises(MoePruneError, match="--dequantize has no effect"):
        api.apply(model, mask_file, tmp_path / "o", dequantize=True, progress=False)
    assert not (tmp_path / "o").exists()


def test_c5_eval_with_nothing_to_measure(model, tmp_path, capsys):
    refused(capsys, ["eval", model, "--ppl", "--tasks", "none"], "Nothing to evaluate")
    with pytest.raises(MoePruneError, match="Nothing to evaluate"):
        api.evaluate(model, settings={"ppl_datasets": [], "tasks": "none"}, progress=False)


def test_c5_inspect_trust_remote_code_on_a_mask_or_profile(profiled, mask_file, capsys):
    for target in (mask_file, profiled):
        refused(capsys, ["inspect", target, "--trust-remote-code"], "--trust-remote-code has no effect here")
        with pytest.raises(MoePruneError):
            describe(str(target), trust_remote_code=True)


def test_c5_model_free_refuses_no_stream_too(model, mask_file, tmp_path, capsys):
    refused(capsys, ["apply", model, mask_file, "--out", tmp_path / "o", "--model-free", "--no-stream"],
            "--no-stream has no effect here", untouched=(tmp_path,))


# ------------------------------------------------------------------ C6: the Python API's door
def test_c6_numpy_scalars_are_the_numbers_they_hold(profiled):
    np = pytest.importorskip("numpy")
    mask = api.plan(profiled, "random", np.float32(0.5), seed=np.int64(3), progress=False)
    assert mask.retain == 0.5 and mask.seed == 3
    assert api.plan_many(profiled, "reap", [np.float64(0.5)], progress=False)[0].retain == 0.5


@pytest.mark.parametrize("call, expected", [
    (lambda m, mk, t: api.profile(m, out=t / "p", calibration={"samples": 2.0, "seq_len": 16, "corpora": ["wiki"]}),
     "--samples must be a whole number"),
    (lambda m, mk, t: api.profile(m, out=5), "out must be a path"),
    (lambda m, mk, t: api.profile(m, out=t / "p", stream="yes"), "stream must be True or False"),
    (lambda m, mk, t: api.apply(m, mk, None), "out must be a path"),
    (lambda m, mk, t: api.apply(m, mk, t / "o", overwrite="no"), "overwrite must be True or False"),
    (lambda m, mk, t: api.apply(m, mk, t / "o", verify="no"), "verify must be True or False"),
    (lambda m, mk, t: api.evaluate(m, settings={"ppl_datasets": ["wiki"], "tasks": 5}), "tasks must be"),
    (lambda m, mk, t: api.evaluate(m, settings={"ppl_datasets": ["wiki"], "tasks": "none"}, overwrite=True),
     "overwrite=True has no effect"),
    (lambda m, mk, t: api.evaluate(m, settings={"ppl_datasets": ["wiki"], "tasks": "none"}, force=True),
     "force=True has no effect"),
    (lambda m, mk, t: api.prune(m, PlanRequest("reap", 0.5), t / "o", workdir=7), "workdir must be a path"),
    (lambda m, mk, t: api.plan(t, "random", 0.5, seed=3.0), "must be a whole number"),
])
def test_c6_the_api_refuses_what_the_cli_cannot_be_given(call, expected, model, mask_file, tmp_path):
    before = snapshot(tmp_path, model)
    with pytest.raises(MoePruneError, match=expected):
        call(model, mask_file, tmp_path)
    assert snapshot(tmp_path, model) == before


def test_c6_run_experiment_checks_its_path_and_switches(model, tmp_path):
    from moeprune.experiment import run_experiment

    with pytest.raises(MoePruneError, match="out_dir must be a path"):
        run_experiment(model, None)
    with pytest.raises(MoePruneError, match="plots must be True or False"):
        run_experiment(model, tmp_path / "x", plots="no")
    assert not (tmp_path / "x").exists()
