"""Settings resolved once, at the door (issue 26): Python and the CLI resolve the same settings for every verb, for
the bundled testbed (its preset) and for a hub-like local model (the paper preset), and the two defects that the
loose settings produced stay fixed.

Each verb is stopped where its resolved settings enter a stage (the stage is replaced by a recorder that raises
:class:`Stop`), once through ``moeprune.cli.main`` and once through the Python API with its defaults."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import pytest

import moeprune.api as api_module
import moeprune.evaluation.runner as runner_module
import moeprune.experiment as experiment_module
from moeprune import api
from moeprune.cli import main
from moeprune.experiment import run_experiment
from moeprune.loading import ModelSource
from moeprune.presets import BUNDLED, PAPER, PRESETS
from moeprune.recovery import RecoveryOptions
from tests.tiny_models import build_model, save_model


class Stop(BaseException):
    """Raised by a recorder where the resolved settings enter a stage (BaseException: main() lets it through)."""


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.fixture
def seen(monkeypatch) -> list[dict[str, Any]]:
    """What reached the stages, one dict per stop; every verb is stopped where its settings enter a stage."""
    found: list[dict[str, Any]] = []

    def stop(**record: Any):
        found.append(_plain(record))
        raise Stop

    def source_of(model: Any) -> dict[str, Any]:
        source = ModelSource.of(model)
        return {"dtype": str(source.dtype), "device": source.device, "trust": source.trust_remote_code,
                "tokenizer": source.tokenizer if isinstance(source.tokenizer, str | type(None)) else "object"}

    monkeypatch.setattr(api_module, "profile_model",
                        lambda model, tok, specs, out, settings, **kw: stop(verb="profile", settings=settings,
                                                                          corpora=[s.name for s in specs]))
    monkeypatch.setattr(api_module, "calibration_windows",
                        lambda spec, tok, n, seq_len, seed: stop(verb="reconstruct", corpus=spec.name, windows=n,
                                                                 seq_len=seq_len, seed=seed))
    monkeypatch.setattr(api_module, "export_pruned",
                        lambda source, mask, out, *a, **kw: stop(verb="export", source=source_of(source),
                                                             recovery=kw.get("recovery")))
    monkeypatch.setattr(api_module, "recover_loaded",
                        lambda model, mask, options, **kw: stop(verb="recover", options=options))
    monkeypatch.setattr(runner_module, "evaluate_loaded",
                        lambda model, tok, settings, **kw: stop(verb="evaluate", settings=settings))

    def check_settings(out: Path, record: dict[str, Any]) -> None:
        stop(verb="experiment", record=json.loads(json.dumps(record)))

    monkeypatch.setattr(experiment_module, "_check_settings", check_settings)
    return found


def _both(seen: list[dict[str, Any]], argv: list[Any], call) -> None:
    """The CLI run of ``argv`` and the Python ``call`` reach their stage with the same settings."""
    with pytest.raises(Stop):
        main([str(a) for a in argv])
    with pytest.raises(Stop):
        call()
    assert len(seen) == 2 and seen[0] == seen[1], seen
    seen.clear()


@pytest.fixture(scope="module")
def hub_like(tmp_path_factory, tokenizer) -> Path:
    """A local checkpoint of a model that is not the testbed (so the paper preset), long enough for its windows."""
    path = tmp_path_factory.mktemp("hub") / "org--tiny-moe"
    model = build_model("qwen2_moe", vocab_size=len(tokenizer))
    model.config.max_position_embeddings = 4096
    save_model(model, path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def profiles(hub_like, tmp_path_factory) -> dict[str, Path]:
    """A small real profile of each model (planning reads it), and a reap mask of each."""
    root = tmp_path_factory.mktemp("profiles")
    out = {}
    for name, model in (("bundled", "bundled"), ("hub", str(hub_like))):
        prof = root / name
        api.profile(model, ["wiki"], prof, calibration={"samples": 2, "seq_len": 16}, progress=False)
        api.plan(prof, "reap", 0.5, progress=False).save(root / f"{name}-mask.json")
        out[name] = prof
    return out


@pytest.mark.parametrize("which", ["bundled", "hub"])
def test_python_and_the_cli_resolve_the_same_settings(which, seen, hub_like, profiles, tmp_path) -> None:
    model = "bundled" if which == "bundled" else str(hub_like)
    preset = PRESETS[BUNDLED if which == "bundled" else PAPER]
    prof, mask = profiles[which], profiles[which].parent / f"{which}-mask.json"

    _both(seen, ["profile", model, "--out", tmp_path / "p"], lambda: api.profile(model, out=tmp_path / "p"))
    for method in ("expert-sparsity", "tb-coverage"):
        _both(seen, ["plan", prof, "--method", method, "--retain", "0.5", "--out", tmp_path / "m"],
              lambda method=method: api.plan(prof, method, 0.5))
    _both(seen, ["apply", model, mask, "--out", tmp_path / "a"], lambda: api.apply(model, mask, tmp_path / "a"))
    _both(seen, ["apply", model, mask, "--out", tmp_path / "a", "--recover", "router-kd"],
          lambda: api.apply(model, mask, tmp_path / "a", recover=RecoveryOptions(kind="router-kd")))
    _both(seen, ["eval", model, "--mask", mask], lambda: api.evaluate(model, mask))
    _both(seen, ["prune", model, "--retain", "0.5", "--out", tmp_path / "pr"],
          lambda: api.prune(model, 0.5, tmp_path / "pr"))
    _both(seen, ["experiment", model, "--out", tmp_path / "x"], lambda: run_experiment(model, tmp_path / "x"))

    # ... and they are the model's preset, known from its name before anything loaded.
    with pytest.raises(Stop):
        api.profile(model, out=tmp_path / "p")
    with pytest.raises(Stop):
        api.plan(prof, "expert-sparsity", 0.5)
    with pytest.raises(Stop):
        api.apply(model, mask, tmp_path / "a", recover="router-kd")
    calibration, recon, recovery = seen[0]["settings"], seen[1], seen[2]["options"]
    assert (calibration["samples"], calibration["seq_len"]) == (preset.samples, preset.seq_len)
    assert (recon["windows"], recon["seq_len"]) == (preset.recon_samples, preset.recon_seq_len)
    assert (recovery["samples"], recovery["seq_len"], recovery["epochs"]) == (
        preset.recover_samples, preset.recover_seq_len, preset.recover_epochs)


def test_defect_1_prune_and_the_grid_give_the_loaded_testbed_its_preset(seen, tmp_path, monkeypatch) -> None:
    """api.prune("bundled", ...) handed the loaded model to plan, which then got the paper preset's 2048-token
    reconstruction windows (beyond the testbed's 1024 positions); run_experiment("bundled") likewise."""
    from moeprune.profiling.runner import profile_model

    monkeypatch.setattr(api_module, "profile_model", profile_model)  # profile for real (2 x 16 tokens)
    with pytest.raises(Stop):
        api.prune("bundled", 0.5, tmp_path / "o", calibration={"corpora": ["wiki"], "samples": 2, "seq_len": 16},
                  progress=False)
    (recon,) = seen
    assert recon["verb"] == "reconstruct" and recon["seq_len"] == PRESETS[BUNDLED].recon_seq_len == 256
    with pytest.raises(Stop):
        run_experiment("bundled", tmp_path / "x", progress=False)
    record = seen[1]["record"]
    assert record["calibration"]["reconstruction"]["seq_len"] == 256 and record["calibration"]["seq_len"] == 256


def test_defect_2_recovery_follows_the_model_and_the_experiment_preset(seen, hub_like, profiles, tmp_path) -> None:
    """RecoveryOptions() defaulted to the testbed's numbers for every model, and the experiment's recovery ignored
    --preset: now both follow the model source's preset."""
    paper = PRESETS[PAPER]
    mask = profiles["hub"].parent / "hub-mask.json"
    with pytest.raises(Stop):
        api.apply(str(hub_like), mask, tmp_path / "a", recover=RecoveryOptions(kind="router-kd"))
    options = seen[0]["options"]
    assert (options["samples"], options["seq_len"], options["epochs"]) == (256, 1024, 1)
    with pytest.raises(Stop):
        main(["experiment", "bundled", "--preset", "paper", "--methods", "frequency", "--recover", "router-kd",
              "--tasks", "none", "--out", str(tmp_path / "x")])
    recovery = seen[1]["record"]["recovery"]
    assert (recovery["samples"], recovery["seq_len"], recovery["epochs"]) == (
        paper.recover_samples, paper.recover_seq_len, paper.recover_epochs)
