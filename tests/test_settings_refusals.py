"""Issue 27, classes 5, 6 and 8: flags the run would ignore are refused naming what they need; the Python API
checks what the CLI checks (types, windows, a Recovery's mask); refusals come before the model loads. Each
refusal is one line, exit 2, nothing changed, and no weights loaded (the loader is replaced by one that fails)."""

from __future__ import annotations

import pytest

import moeprune.loading as loading
from moeprune import api
from moeprune.errors import MoePruneError
from moeprune.planning.mask import ExpertMask
from moeprune.planning.request import PlanRequest
from moeprune.recovery import Recovery, RecoveryOptions
from tests.test_contract import CALIBRATION, ok, refused

NO_TASKS = ["--tasks", "none"]


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test: the refusals must come first."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loading, "load_model", load)


@pytest.fixture(scope="module")
def profiled(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("refusals") / "prof"
    ok(["profile", tiny_checkpoint, *CALIBRATION, "--out", out])
    return out


@pytest.fixture(scope="module")
def masks(profiled, tmp_path_factory):
    out = tmp_path_factory.mktemp("refusals") / "masks"
    ok(["plan", profiled, "--method", "reap", "--retain", "0.5", "--out", out])
    ok(["plan", profiled, "--method", "frequency", "--retain", "0.5", "--out", out])
    return out


# ----------------------------------------------------------------------- class 5: flags the run would ignore
@pytest.mark.parametrize(("extra", "expected"), [
    (["--recover-lr", "1e-3"], "--recover-lr has no effect here: it applies only with --recover"),
    (["--recover-corpus", "wiki"], "--recover-corpus has no effect"),
    (["--recover", "merge", "--recover-epochs", "2"], "--recover-epochs only apply to router-kd"),
    (["--recover", "merge", "--recover-lr", "0.1"], "--recover-lr only apply to router-kd"),
    (["--model-free", "--dtype", "bfloat16"], "--dtype has no effect here"),
    (["--model-free", "--tokenizer", "x"], "--tokenizer has no effect here"),
    (["--model-free", "--no-verify"], "--no-verify has no effect here"),
])
def test_apply_refuses_flags_it_would_ignore(extra, expected, tiny_checkpoint, masks, tmp_path, capsys,
                                            no_weights):
    refused(capsys, ["apply", tiny_checkpoint, masks / "reap-0.50.json", "--out", tmp_path / "o", *extra], expected,
            untouched=(tmp_path,))


def test_plan_and_prune_refuse_flags_their_method_ignores(tiny_checkpoint, profiled, tmp_path, capsys, no_weights):
    refused(capsys, ["plan", profiled, "--method", "reap", "--retain", "0.5", "--recon-samples", "8",
                     "--out", tmp_path / "m"], "--recon-samples has no effect", "--method reap does not run")
    refused(capsys, ["plan", profiled, "--method", "reap", "--retain", "0.5", "--plan-seed", "3",
                     "--out", tmp_path / "m"], "--plan-seed only applies to seeded methods")
    refused(capsys, ["plan", profiled, "--method", "frequency", "--retain", "0.5", "--model", tiny_checkpoint,
                     "--out", tmp_path / "m"], "--model has no effect", "plans from the profile alone")
    refused(capsys, ["prune", tiny_checkpoint, *CALIBRATION, "--method", "frequency", "--retain", "0.5",
                     "--recon-tokens", "64", "--out", tmp_path / "o"], "--recon-tokens has no effect",
            untouched=(tmp_path,))
    ok(["plan", profiled, "--method", "random", "--retain", "0.5", "--plan-seed", "3", "--out", tmp_path / "m"])


def test_sequential_profiling_refuses_checkpoint_every_and_torchrun(tiny_checkpoint, tmp_path, capsys,
                                                                    monkeypatch, no_weights):
    refused(capsys, ["profile", tiny_checkpoint, *CALIBRATION, "--sequential", "--checkpoint-every", "4",
                     "--out", tmp_path / "p"], "--checkpoint-every does not apply to --sequential",
            untouched=(tmp_path,))
    refused(capsys, ["profile", tiny_checkpoint, *CALIBRATION, "--sequential", "--stream", "--out", tmp_path / "p"],
            "choose one", untouched=(tmp_path,))
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused(capsys, ["profile", tiny_checkpoint, *CALIBRATION, "--sequential", "--out", tmp_path / "p"],
            "runs in one process", untouched=(tmp_path,))


def test_experiment_and_eval_refuse_flags_they_would_ignore(tiny_checkpoint, tmp_path, capsys, no_weights):
    base = ["experiment", tiny_checkpoint, "--methods", "frequency", "--corpus", "wiki", "--seq-len", "32",
            "--ppl-seq-len", "32", *NO_TASKS, "--out", tmp_path / "x"]
    refused(capsys, [*base, "--recon-samples", "4"], "--recon-samples has no effect", untouched=(tmp_path,))
    refused(capsys, [*base, "--reap-samples", "4"], "--reap-samples has no effect", untouched=(tmp_path,))
    refused(capsys, [*base, "--recover", "merge", "--recover-lr", "0.1"], "only apply to router-kd",
            untouched=(tmp_path,))
    refused(capsys, [*base, "--seeds", "1", "2"], "--seeds has no effect", "seeded methods", untouched=(tmp_path,))
    refused(capsys, ["eval", tiny_checkpoint, *NO_TASKS, "--limit", "5"], "--limit has no effect",
            "--tasks none skips")
    refused(capsys, ["eval", tiny_checkpoint, *NO_TASKS, "--ppl", "--ppl-windows", "2"], "--ppl-windows has no effect")
    refused(capsys, ["eval", tiny_checkpoint, *NO_TASKS, "--overwrite"], "--overwrite has no effect")
    refused(capsys, ["eval", tiny_checkpoint, *NO_TASKS, "--force"], "--force has no effect")


# --------------------------------------------------------------------------- class 8: late refusals
def test_unknown_tasks_and_ppl_sets_fail_before_the_model_loads(tiny_checkpoint, tmp_path, capsys, no_weights):
    pytest.importorskip("lm_eval")
    refused(capsys, ["eval", tiny_checkpoint, "--ppl", "wiki", "--ppl-seq-len", "32", "--tasks", "no_such_task"],
            "Unknown lm-eval task(s) ['no_such_task']")
    refused(capsys, ["eval", tiny_checkpoint, "--ppl", "wikitxt2", *NO_TASKS], "Unknown perplexity dataset 'wikitxt2'")
    refused(capsys, ["prune", tiny_checkpoint, *CALIBRATION, "--method", "frequency", "--retain", "0.5",
                     "--ppl", "nope", "--out", tmp_path / "o"], "Unknown perplexity dataset 'nope'",
            untouched=(tmp_path,))


def test_an_unreachable_hub_recovery_corpus_fails_before_the_model_loads(tiny_checkpoint, masks, tmp_path, capsys,
                                                                        monkeypatch, no_weights):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    refused(capsys, ["apply", tiny_checkpoint, masks / "reap-0.50.json", "--out", tmp_path / "o", "--recover",
                     "router-kd", "--recover-seq-len", "32", "--recover-corpus", "hf:org/data"], "org/data",
            untouched=(tmp_path,))


# ----------------------------------------------------------------- class 6: the API checks what the CLI checks
def test_wrong_types_are_one_line_errors(tiny_checkpoint, profiled, masks, tmp_path, no_weights):
    from moeprune.experiment import run_experiment

    cases = [
        (lambda: api.plan(profiled, "reap", "0.5"), "Retain ratio '0.5' must be a number"),
        (lambda: api.plan(profiled, 3, 0.5), "method must be a method name"),
        (lambda: api.apply(str(tiny_checkpoint), masks / "reap-0.50.json", tmp_path / "o", recover=["router-kd"]),
         "recover must be RecoveryOptions"),
        (lambda: api.apply(str(tiny_checkpoint), masks / "reap-0.50.json", tmp_path / "o", recover="router"),
         "Unknown recovery 'router'"),
        (lambda: api.evaluate(str(tiny_checkpoint), settings=["wiki"]), "settings must be a EvalSettings"),
        (lambda: api.evaluate(str(tiny_checkpoint), settings={"ppl": ["wiki"]}), "Unknown evaluation option"),
        (lambda: run_experiment(str(tiny_checkpoint), tmp_path / "x", grid=["reap"]), "grid must be a GridOptions"),
        (lambda: run_experiment(str(tiny_checkpoint), tmp_path / "x", grid={"retains": 0.5}),
         "GridOptions.retains must be a list"),
        (lambda: api.profile(str(tiny_checkpoint), "wiki", tmp_path / "p"), "corpora must be a list"),
        (lambda: run_experiment(str(tiny_checkpoint), tmp_path / "x", grid={"methods": ["frequency"]},
                                calibration={"seq_len": 32}, evaluation={"ppl_seq_len": 32, "tasks": "none"},
                                recovery={"lr": 0.1}), "have no effect: the grid recovers nothing"),
        (lambda: api.prune(str(tiny_checkpoint), PlanRequest("reap", 0.5, seed=2), tmp_path / "o"),
         "--plan-seed only applies to seeded methods"),
    ]
    for call, message in cases:
        with pytest.raises(MoePruneError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_api_recover_keeps_windows_within_the_model(tiny_checkpoint, masks, no_weights):
    with pytest.raises(MoePruneError, match="--recover-seq-len 1024 \\(given or the default\\) exceeds the model's "
                                            "max_position_embeddings=128"):
        api.recover(str(tiny_checkpoint), masks / "reap-0.50.json", RecoveryOptions(kind="router-kd"))


def test_a_recovery_made_for_another_mask_is_refused(tiny_checkpoint, masks, tmp_path, no_weights):
    reap, frequency = (ExpertMask.load(masks / f"{m}-0.50.json") for m in ("reap", "frequency"))
    assert reap.kept_per_layer == frequency.kept_per_layer and reap.identity != frequency.identity
    made_for_reap = Recovery({}, {"kind": "router-kd", "mask": reap.identity})
    for recovery, message in ((made_for_reap, "was made for another mask"),
                              (Recovery({}, {"kind": "router-kd"}), "names no mask")):
        with pytest.raises(MoePruneError, match=message):
            api.apply(str(tiny_checkpoint), frequency, tmp_path / "o", recover=recovery)
    assert not (tmp_path / "o").exists()
