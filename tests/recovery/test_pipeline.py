"""Recovery in the pipeline: apply/prune/experiment, the export, the records, the up-front errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprune import api
from moeprune.cli import main
from moeprune.loading import load_model
from moeprune.options import Calibration
from moeprune.planning.request import PlanRequest
from moeprune.recovery import Recovery, RecoveryOptions, apply_delta
from moeprune.surgery import masked
from tests.surgery import make_mask

KD = RecoveryOptions(kind="router-kd", corpora=("wiki", "web"), samples=8, seq_len=32, epochs=1, batch_size=4)
ROUTING = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")


@pytest.fixture(scope="module")
def mask_file(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    mask = make_mask(load_model(tiny_checkpoint, dtype="float32"))
    mask.extra["corpora"] = ["wiki", "web"]  # as planning records the profiled corpora
    path = tmp_path_factory.mktemp("masks") / "mask.json"
    mask.save(path)
    return path


@pytest.fixture(scope="module")
def exports(tiny_checkpoint: Path, mask_file: Path, tmp_path_factory) -> dict[str, Path]:
    """Plain pruning, router-kd twice with one seed, once with another seed."""
    root = tmp_path_factory.mktemp("exports")
    out = {"plain": api.apply(tiny_checkpoint, mask_file, root / "plain", progress=False)}
    for name, options in (("kd", KD), ("kd-again", KD), ("kd-seed3", replace(KD, seed=3))):
        out[name] = api.apply(tiny_checkpoint, mask_file, root / name, recover=options, progress=False)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_router_kd_export_changes_only_routing_tensors(exports: dict[str, Path]) -> None:
    plain, kd = _weights(exports["plain"]), _weights(exports["kd"])
    assert set(plain) == set(kd)
    changed = sorted(k for k in plain if not torch.equal(plain[k], kd[k]))
    assert changed and all(k.endswith(ROUTING) for k in changed)
    assert any(k.endswith("shared_expert_gate.weight") for k in changed)
    # config.json changes only the expert count, exactly as plain pruning does
    assert json.loads((exports["kd"] / "config.json").read_text()) == json.loads(
        (exports["plain"] / "config.json").read_text())


def test_same_seed_same_export_other_seed_another(exports: dict[str, Path]) -> None:
    kd, again, other = (_weights(exports[n]) for n in ("kd", "kd-again", "kd-seed3"))
    assert all(torch.equal(kd[k], again[k]) for k in kd)
    assert any(not torch.equal(kd[k], other[k]) for k in kd)


def test_mask_and_model_card_record_the_recovery(exports: dict[str, Path]) -> None:
    record = json.loads((exports["kd"] / "mask.json").read_text())["extra"]["recovery"]
    assert record["kind"] == "router-kd"
    assert record["settings"]["seed"] == 0 and record["settings"]["epochs"] == 1
    kd = record["router_kd"]
    assert set(kd["kl_before"]) == {"wiki", "web"}
    assert all(kd["kl_after"][c] < kd["kl_before"][c] for c in kd["kl_before"])
    card = (exports["kd"] / "README.md").read_text()
    assert "Recovery: **router-kd**" in card and "--recover router-kd" in card
    assert "recovery" not in json.loads((exports["plain"] / "mask.json").read_text()).get("extra", {})


def test_export_equals_the_in_memory_recovered_model(tiny_checkpoint: Path, mask_file: Path, tmp_path: Path) -> None:
    model = load_model(tiny_checkpoint, dtype="float32")
    recovery = api.recover(model, mask_file, KD, progress=False)
    out = api.apply(model, mask_file, tmp_path / "out", recover=recovery, progress=False)
    ids = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked(model, api.ExpertMask.load(mask_file)):
        apply_delta(model, recovery.delta)
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        plain = model(input_ids=ids).logits  # the model is the dense one again after the block
        actual = load_model(out, dtype="float32")(input_ids=ids).logits
    assert torch.equal(actual, expected)
    assert not torch.equal(plain, expected)  # and the loaded model is the dense one again


def test_calibration_reads_train_splits_only(tiny_checkpoint: Path, mask_file: Path, tmp_path: Path,
                                             monkeypatch) -> None:
    import moeprune.data.corpora as corpora  # where the corpus loader reads the bundled files

    splits: list[str] = []
    original = corpora.read_bundled_corpus

    def spy(name: str, split: str = "train"):
        splits.append(split)
        return original(name, split)

    monkeypatch.setattr(corpora, "read_bundled_corpus", spy)
    model = load_model(tiny_checkpoint, dtype="float32")
    api.recover(model, mask_file, replace(KD, corpora=None), progress=False)  # the mask's corpora
    assert splits and set(splits) == {"train"}


def test_delta_outside_moe_layers_is_refused(tiny_checkpoint: Path) -> None:
    from moeprune.errors import MoePruneError

    model = load_model(tiny_checkpoint, dtype="float32")
    embed = model.get_input_embeddings().weight
    with pytest.raises(MoePruneError, match="only replace MoE-layer parameters"):
        apply_delta(model, {"model.embed_tokens.weight": torch.zeros_like(embed)})


def test_delta_round_trips_through_its_files(tmp_path: Path) -> None:
    rec = Recovery({"a.weight": torch.arange(6.0).view(2, 3)}, {"kind": "router-kd", "x": [1, 2]})
    back = Recovery.load(rec.save(tmp_path / "rec"))
    assert torch.equal(back.delta["a.weight"], rec.delta["a.weight"]) and back.record == rec.record


def test_a_corrupt_cached_recovery_is_one_line(tmp_path: Path) -> None:
    from moeprune.errors import MoePruneError

    folder = Recovery({"a.weight": torch.zeros(2)}, {"kind": "router-kd"}).save(tmp_path / "rec")
    (folder / "recovery.json").write_text("[1, 2]")
    with pytest.raises(MoePruneError, match="not a JSON object; delete it to recompute it"):
        Recovery.load(folder)
    (folder / "recovery.json").write_text("{")
    with pytest.raises(MoePruneError, match="Recovery record in .*delete it to recompute it"):
        Recovery.load(folder)


# ------------------------------------------------------------------------------------------- CLI errors
@pytest.fixture
def no_model_load(monkeypatch):
    import moeprune.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(api, "load_model", refuse)


def _one_line_error(argv: list[str], capsys, expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err


def test_merge_with_a_mask_keeping_every_expert_fails_before_loading(tiny_checkpoint, tmp_path, capsys,
                                                                     no_model_load) -> None:
    everything = make_mask(_skeleton(tiny_checkpoint), [list(range(8))])
    everything.save(tmp_path / "all.json")
    _one_line_error(["apply", str(tiny_checkpoint), str(tmp_path / "all.json"), "--out", str(tmp_path / "o"),
                     "--recover", "merge"], capsys, "nothing to merge")
    _one_line_error(["prune", str(tiny_checkpoint), "--retain", "1.0", "--out", str(tmp_path / "p"),
                     "--recover", "merge+router-kd", "--method", "frequency", "--seq-len", "64"], capsys,
                    "nothing to merge")


def _skeleton(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


@pytest.mark.parametrize("flags, expected", [
    (["--recover-samples", "0"], "--recover-samples must be"),
    (["--recover-lr", "-1"], "--recover-lr must be a positive"),
    (["--recover-corpus", "wiki:test"], "evaluation split"),
])
def test_bad_recovery_settings_fail_before_loading(flags, expected, tiny_checkpoint, mask_file, tmp_path, capsys,
                                                   no_model_load) -> None:
    _one_line_error(["apply", str(tiny_checkpoint), str(mask_file), "--out", str(tmp_path / "o"),
                     "--recover", "router-kd", *flags], capsys, expected)


def test_unknown_recovery_is_an_argparse_error(tiny_checkpoint, mask_file, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["apply", str(tiny_checkpoint), str(mask_file), "--out", str(tmp_path / "o"), "--recover", "kd"])
    assert exit_.value.code == 2 and "invalid choice: 'kd'" in capsys.readouterr().err


def test_apply_without_corpora_anywhere_needs_recover_corpus(tiny_checkpoint, tmp_path, capsys,
                                                             no_model_load) -> None:
    bare = make_mask(_skeleton(tiny_checkpoint))
    bare.save(tmp_path / "bare.json")
    _one_line_error(["apply", str(tiny_checkpoint), str(tmp_path / "bare.json"), "--out", str(tmp_path / "o"),
                     "--recover", "router-kd"], capsys, "--recover-corpus")


def test_prune_recovers_on_the_profiled_corpora(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = api.prune(tiny_checkpoint, PlanRequest("frequency", 0.5), tmp_path / "out",
                    calibration=Calibration(corpora=("wiki",), samples=4, seq_len=32, batch_size=2), progress=False,
                    recover=replace(KD, corpora=None))
    record = json.loads((out / "mask.json").read_text())["extra"]["recovery"]
    assert record["kind"] == "router-kd" and list(record["corpora"]) == ["wiki"]  # the corpus prune profiled
    assert record["settings"]["corpora"] == ["wiki"]
