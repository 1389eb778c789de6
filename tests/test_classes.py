# ruff: noqa: F811 - the fixtures of tests/test_contract.py are imported and used as arguments
"""Issue 27: the classes closed where they live, each tried with more members than the issue's examples.

C1 records from others decide paths and text (one schema per record, one name rule, paths kept inside their root),
C2 links below an output root, C3 outputs into folders moeprune did not make, C4 stale reuse (every cache key holds
its inputs, every cached file is checked), C7 odd models and values. docs/errors.md's third table lists them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune.errors import MoePruneError
from moeprune.io import (
    atomic_file,
    make_dirs,
    output_root,
    path_inside,
    seal_intact,
    sealed,
    write_json_atomic,
)
from tests.test_contract import (  # noqa: F401 (fixtures)
    CALIBRATION,
    copy_model,
    mask_file,
    mask_json,
    model,
    ok,
    profiled,
    refused,
    snapshot,
    write_mask,
)


# ---------------------------------------------------------------------------- C1: records from others
@pytest.mark.parametrize("key", ["²", "٣", "1²", " 1", "1_0", "0x1", "-0"])
def test_c1_a_mask_layer_key_must_be_ascii_digits(key, model, mask_json, tmp_path, capsys):
    first = next(iter(mask_json["layers"]))
    mask_json["layers"][key] = mask_json["layers"].pop(first)
    mask = write_mask(tmp_path / "m.json", mask_json)
    refused(capsys, ["inspect", mask], "layer key")
    refused(capsys, ["apply", model, mask, "--out", tmp_path / "o"], "layer key", untouched=(model,))


@pytest.mark.parametrize("where", ["variant", "method"])
@pytest.mark.parametrize("name", ["../../../../tmp/evil", "/tmp/evil", "a/b", "..", ".hidden", "x\x1b[2J", "résumé",
                                  "a" * 200, ""])
def test_c1_names_a_mask_turns_into_files_follow_one_rule(where, name, mask_json, tmp_path, capsys):
    if where == "variant":
        mask_json.setdefault("extra", {})["variant"] = name
    else:
        mask_json["method"] = name
    mask = write_mask(tmp_path / "m.json", mask_json)
    refused(capsys, ["inspect", mask], "plain name")


def test_c1_path_inside_keeps_record_names_in_their_root(tmp_path):
    assert path_inside(tmp_path, "reap-0.50+router-kd.json") == tmp_path / "reap-0.50+router-kd.json"
    for bad in ("../x", "x/../../y", "/etc/passwd", "..", "²", "a\x00b", "a/b"):
        with pytest.raises(MoePruneError):
            path_inside(tmp_path, bad)
    (tmp_path / "escape").symlink_to("/tmp")
    with pytest.raises(MoePruneError, match="symbolic link"):
        path_inside(tmp_path, "escape")


def test_c1_a_recovery_the_mask_claims_is_never_exported(model, mask_json, tmp_path):
    """A mask copied from a router-kd export (or forged) makes a plain apply claim nothing it did not do; a
    malformed record is no KeyError; raw HTML in it never reaches the card."""
    for record in ({"kind": "<img src=x onerror=alert(1)>", "settings": {"seed": 1}, "corpora": {"wiki": [8, 32]}},
                   {"kind": "router-kd"}, {"settings": 3}):
        mask_json["extra"]["recovery"] = record
        mask = write_mask(tmp_path / "claims.json", mask_json)
        for flags in ([], ["--model-free"]):
            out = tmp_path / f"out{len(flags)}"
            ok(["apply", model, mask, "--out", out, "--overwrite", *flags])
            card = (out / "README.md").read_text()
            exported = json.loads((out / "mask.json").read_text())
            assert "recovery" not in exported.get("extra", {}) and "Recovery" not in card and "<img" not in card
            assert "--recover" not in card


def test_c1_recovery_never_reads_a_file_the_mask_names(model, mask_json, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me\n\n" * 200)
    for corpora in ([str(secret)], ["notes"], ["hf:someone/data"], ["x=" + str(secret)]):
        mask_json["extra"]["corpora"] = corpora
        mask = write_mask(tmp_path / "m.json", mask_json)
        refused(capsys, ["apply", model, mask, "--out", tmp_path / "o", "--recover", "router-kd"], "--recover-corpus",
                untouched=(model,))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [{"corpora": "wiki"}, {"corpora": [1]}, {"recovery": []}, {"config_hash": 3},
                                 {"profile_sha256": ["x"]}])
def test_c1_mask_extra_fields_have_types(bad, mask_json, tmp_path, capsys):
    mask_json["extra"].update(bad)
    refused(capsys, ["inspect", write_mask(tmp_path / "m.json", mask_json)], "extra")


@pytest.mark.parametrize("corpus", [{"name": "wiki", "kind": "bundled", "source": "wiki", "evil": 1},
                                    {"name": "../x", "kind": "txt", "source": "/etc/passwd"},
                                    {"name": "wiki", "kind": "shell", "source": "rm"}, ["wiki"],
                                    {"name": "wiki", "kind": "bundled", "source": 3}])
def test_c1_profile_metadata_corpus_spec_is_checked_on_read(corpus, profiled, tmp_path, capsys):
    copy = tmp_path / "prof"
    import shutil

    shutil.copytree(profiled, copy)
    meta_path = next(copy.glob("*.json"))
    meta = json.loads(meta_path.read_text())
    meta["corpus"] = corpus
    meta_path.write_text(json.dumps(meta))
    refused(capsys, ["plan", copy, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "masks"], "corpus")


def test_c1_reconstruction_reads_only_the_file_that_was_profiled(profiled, tmp_path):
    """A profile naming a local file reads it only when its SHA-256 is the one recorded."""
    from moeprune.api import _reconstruction_corpus
    from moeprune.profiling.stats import Profile

    prof = Profile.load(profiled)
    stats = next(iter(prof.corpora.values()))
    victim = tmp_path / "private.txt"
    victim.write_text("secret\n")
    stats.meta["corpus"] = {"name": "private", "kind": "txt", "source": str(victim), "split": "train", "field": "text"}
    stats.meta["corpus_sha256"] = "0" * 64
    with pytest.raises(MoePruneError, match="not the file that was profiled"):
        _reconstruction_corpus(prof, None)


@pytest.mark.parametrize("settings", [{"calibration": [1]}, {"model": 3}, {"evaluation": "x"}, {"recovery": []}])
def test_c1_experiment_json_has_a_schema(settings, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "grid"
    out.mkdir()
    (out / "experiment.json").write_text(json.dumps(settings))
    refused(capsys, ["experiment", tiny_checkpoint, "--methods", "reap", "--reap-corpus", "none", "--corpus", "wiki",
                     "--samples", "2", "--seq-len", "16", "--ppl", "wiki", "--ppl-seq-len", "16", "--tasks", "none",
                     "--out", out], "Experiment settings", untouched=(out,))


def test_c1_recovery_records_have_a_schema(tmp_path):
    from moeprune.surgery.delta import Recovery

    folder = Recovery({"x": torch.ones(2)}, {"kind": "router-kd", "settings": {"seed": 0}, "corpora": {}}) \
        .save(tmp_path / "rec")
    assert Recovery.load(folder).record["kind"] == "router-kd"
    record = json.loads((folder / "recovery.json").read_text())
    for edit in ({"kind": "../x"}, {"settings": 1}, {"corpora": {"wiki": "8x32"}}, {"format": "other"}):
        (folder / "recovery.json").write_text(json.dumps(sealed({**record, **edit})))
        with pytest.raises(MoePruneError, match="Recovery record"):
            Recovery.load(folder)


# -------------------------------------------------------------------------- C2: links below an output root
@pytest.mark.parametrize("depth", [1, 2])
def test_c2_no_folder_below_an_output_root_is_followed(depth, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.json").write_text("mine")
    root = tmp_path / "out"
    parent = root / "a" if depth == 2 else root
    parent.mkdir(parents=True)
    (parent / "cells").symlink_to(elsewhere)
    with output_root(root):
        for write in (lambda: write_json_atomic(parent / "cells" / "keep.json", {}),
                      lambda: write_json_atomic(parent / "cells" / "new" / "x.json", {}),
                      lambda: make_dirs(parent / "cells" / "deeper")):
            with pytest.raises(MoePruneError, match="symbolic link"):
                write()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.json"]
    assert (elsewhere / "keep.json").read_text() == "mine"
    # A file in place of a folder is named too; the root itself may be reached through a link.
    (root / "plots").write_text("x")
    with output_root(root), pytest.raises(MoePruneError, match="regular file|not a folder"):
        write_json_atomic(root / "plots" / "a.json", {})
    (tmp_path / "via").symlink_to(root)
    with output_root(tmp_path / "via"):
        write_json_atomic(tmp_path / "via" / "b" / "c.json", {})
    assert (root / "b" / "c.json").exists()


def test_c2_a_link_planted_while_writing_is_refused(tmp_path):
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (root / "cells").mkdir(parents=True)
    elsewhere.mkdir()
    with output_root(root), pytest.raises(MoePruneError, match="symbolic link"):
        with atomic_file(root / "cells" / "x.json", text=True) as handle:
            handle.write("{}")
            os.rename(root / "cells", tmp_path / "moved")
            (root / "cells").symlink_to(elsewhere)
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("sub", ["reconstruction", "reconstruction/KEY"])
def test_c2_a_linked_capture_folder_is_refused(sub, profiled, tmp_path, capsys):
    import shutil

    prof = tmp_path / "prof"
    shutil.copytree(profiled, prof)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if sub == "reconstruction":
        (prof / "reconstruction").symlink_to(elsewhere)
    else:
        (prof / "reconstruction").mkdir()
        key = "wiki-2x16-seed0"
        (prof / "reconstruction" / key).symlink_to(elsewhere)
    refused(capsys, ["plan", prof, "--method", "expert-sparsity", "--retain", "0.5", "--recon-samples", "2",
                     "--recon-seq-len", "16", "--out", tmp_path / "masks"], "symbolic link")
    assert not list(elsewhere.iterdir())


def test_c2_experiment_subfolders_are_never_written_through(tmp_path):
    """Unit level (a grid run is slow): the experiment's cells, masks and recovery folders are made by make_dirs."""
    from moeprune import experiment

    source = Path(experiment.__file__).read_text()
    for folder in ('"cells"', '"masks"', '"recovery"'):
        assert f'make_dirs(out / {folder})' in source
    assert "with output_root(out)" in source


# ----------------------------------------------------------------- C3: folders and files moeprune did not make
def test_c3_experiment_refuses_someone_elses_folder(tiny_checkpoint, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("report.md", "results.json", "results.csv"):
        (project / name).write_text("mine\n")
    refused(capsys, ["experiment", tiny_checkpoint, "--methods", "reap", "--reap-corpus", "none", "--corpus", "wiki",
                     "--seq-len", "16", "--ppl-seq-len", "16", "--tasks", "none", "--out", project],
            "did not make", untouched=(project,))


@pytest.mark.parametrize("content", ['{"mine": 1}', "notes", '{"format": "other"}'])
def test_c3_profile_and_plan_refuse_someone_elses_folder(content, tiny_checkpoint, profiled, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "wiki.json").write_text(content)
    refused(capsys, ["profile", tiny_checkpoint, *CALIBRATION, "--out", data], "did not make", untouched=(data,))
    refused(capsys, ["plan", profiled, "--method", "reap", "--retain", "0.5", "--out", data], "did not make",
            untouched=(data,))
    refused(capsys, ["prune", tiny_checkpoint, "--retain", "0.5", "--method", "reap", *CALIBRATION,
                     "--workdir", data, "--out", tmp_path / "pruned"], "did not make", untouched=(data,))


def test_c3_plan_replaces_only_its_own_unedited_masks(profiled, tmp_path, capsys):
    masks = tmp_path / "masks"
    argv = ["plan", profiled, "--method", "reap", "--retain", "0.5", "--out", masks]
    ok(argv)
    ok(argv)  # its own, unedited: replanned in place
    path = masks / "reap-0.50.json"
    edited = json.loads(path.read_text())
    edited["layers"][next(iter(edited["layers"]))]["kept"].reverse()
    path.write_text(json.dumps(edited))
    refused(capsys, argv, "--overwrite", untouched=(masks,))
    ok([*argv, "--overwrite"])
    assert seal_intact(json.loads(path.read_text()))


@pytest.mark.parametrize("what", ["recover corpus", "tokenizer"])
def test_c3_every_input_counts_in_the_overlap_check(what, model, mask_file, text_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    ok(["apply", model, mask_file, "--out", out, "--model-free"])
    if what == "recover corpus":
        notes = out / "notes.txt"
        notes.write_text(text_corpus.read_text())
        flags = ["--recover", "router-kd", "--recover-corpus", notes]
    else:
        tok = out / "tok"
        tok.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tok / name).write_bytes((model / name).read_bytes())
        flags = ["--tokenizer", tok]
    refused(capsys, ["apply", model, mask_file, "--out", out, "--overwrite", *flags], "source", untouched=(out,))
    refused(capsys, ["prune", model, "--retain", "0.5", "--method", "reap", *CALIBRATION, "--out", out, "--overwrite",
                     *flags], "source", untouched=(out,))


# ------------------------------------------------------------------------------------------ C4: stale reuse
def test_c4_a_hand_edited_cached_mask_or_cell_is_not_reused(profiled, tmp_path):
    from moeprune.experiment import _reusable_masks, read_cell
    from moeprune.planning import plan
    from moeprune.profiling.stats import Profile

    prof = Profile.load(profiled)
    path = tmp_path / "reap-0.50.json"
    plan(prof, "reap", 0.5).save(path)
    assert _reusable_masks([path], [0.5], prof.fingerprint(), "reap", None) is not None
    assert _reusable_masks([path], [0.5], prof.fingerprint(), "frequency", None) is None  # another method's
    edited = json.loads(path.read_text())
    edited["notes"] = ["edited by hand"]
    path.write_text(json.dumps(edited))
    assert _reusable_masks([path], [0.5], prof.fingerprint(), "reap", None) is None
    cell = sealed({"cell": "dense", "method": "dense", "variant": "dense", "retain": 1.0, "summary": {"ppl": 5.0},
                   "inputs": {"a": 1}})
    file = tmp_path / "dense.json"
    file.write_text(json.dumps(cell))
    assert read_cell(file, "dense", {"a": 1})["summary"] == {"ppl": 5.0}
    file.write_text(json.dumps({**cell, "summary": {"ppl": 1.0}}))
    assert read_cell(file, "dense", {"a": 1}) is None


def test_c4_cached_recovery_deltas_are_checked_before_use(tmp_path):
    from moeprune.surgery.delta import Recovery

    settings = {"kind": "router-kd", "lr": 0.003}
    folder = Recovery({"w": torch.ones(3)}, {"kind": "router-kd", "settings": settings, "corpora": {}}) \
        .save(tmp_path / "rec")
    assert Recovery.load(folder, expected=settings).delta["w"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(MoePruneError, match="other recovery settings"):
        Recovery.load(folder, expected={**settings, "lr": 0.1})
    save_file({"w": torch.tensor([1.0, float("nan"), 1.0])}, str(folder / "delta.safetensors"))
    with pytest.raises(MoePruneError, match="not the one its record"):
        Recovery.load(folder, expected=settings)
    # A NaN delta saved whole (its record matching) is refused too.
    nan = Recovery({"w": torch.tensor([float("nan")])}, {"kind": "router-kd", "settings": settings, "corpora": {}})
    with pytest.raises(MoePruneError, match="NaN"):
        Recovery.load(nan.save(tmp_path / "nan"), expected=settings)


def test_c4_recovery_key_holds_weights_settings_and_corpus_bytes(tiny_checkpoint, text_corpus, profiled, tmp_path):
    from moeprune.experiment import recovery_key
    from moeprune.loading import load_model
    from moeprune.planning import plan
    from moeprune.profiling.stats import Profile
    from moeprune.recovery import RecoveryOptions

    loaded = load_model(tiny_checkpoint, device="cpu")
    mask = plan(Profile.load(profiled), "reap", 0.5)
    corpus = tmp_path / "c.txt"
    corpus.write_text(text_corpus.read_text())
    options = RecoveryOptions(kind="router-kd", corpora=(str(corpus),))
    key = recovery_key(loaded, mask, options)
    assert recovery_key(loaded, mask, RecoveryOptions(kind="router-kd", corpora=(str(corpus),), lr=0.1)) != key
    corpus.write_text(text_corpus.read_text() + "\n\none more document")
    assert recovery_key(loaded, mask, options) != key


def test_c4_plan_refuses_another_checkpoint_of_the_same_config(profiled, tiny_checkpoint, tmp_path, capsys):
    other = copy_model(tiny_checkpoint, tmp_path / "other")
    weights = load_file(str(other / "model.safetensors"))
    name = next(n for n in weights if n.endswith("embed_tokens.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    refused(capsys, ["plan", profiled, "--method", "expert-sparsity", "--retain", "0.5", "--model", other,
                     "--recon-samples", "2", "--recon-seq-len", "16", "--out", tmp_path / "masks"], "other weights")


def test_c4_captures_are_not_reused_after_the_weights_change(tiny_checkpoint, tmp_path, monkeypatch):
    from moeprune.loading import load_model
    from moeprune.reconstruction import capture

    loaded = load_model(tiny_checkpoint, device="cpu")
    windows = torch.randint(0, 100, (2, 8))
    capture.capture_moe_inputs(loaded, windows, tmp_path, "k", progress=False)
    capture.capture_moe_inputs(loaded, windows, tmp_path, "k", progress=False)  # same weights: reused
    monkeypatch.setattr(capture, "weights_fingerprint", lambda model: "changed")
    with pytest.raises(MoePruneError, match="other weights"):
        capture.capture_moe_inputs(loaded, windows, tmp_path, "k", progress=False)
    # A capture record with a batch count whose files are missing is no capture (made again, not a traceback).
    monkeypatch.undo()
    meta = json.loads((tmp_path / "reconstruction" / "k" / "meta.json").read_text())
    (tmp_path / "reconstruction" / "k" / "meta.json").write_text(json.dumps({**meta, "batches": 9}))
    assert capture.WorkDir(tmp_path, "k").read_meta() is None


# --------------------------------------------------------------------------------- C7: odd models and values
@pytest.mark.parametrize("top_k", [0, 9, -1])
def test_c7_a_config_with_an_impossible_top_k(top_k, model, mask_file, tmp_path, capsys):
    config = json.loads((model / "config.json").read_text())
    config["num_experts_per_tok"] = top_k
    (model / "config.json").write_text(json.dumps(config))
    refused(capsys, ["profile", model, *CALIBRATION, "--out", tmp_path / "p"], "num_experts_per_tok")
    refused(capsys, ["apply", model, mask_file, "--model-free", "--out", tmp_path / "o"], "num_experts_per_tok")


@pytest.mark.parametrize("device", ["meta", "hpu", "xla"])
def test_c7_devices_moeprune_cannot_compute_on(device, tiny_checkpoint, tmp_path, capsys):
    refused(capsys, ["profile", tiny_checkpoint, *CALIBRATION, "--device", device, "--out", tmp_path / "p"],
            "--device")


@pytest.mark.parametrize("flags", [["--recover", "router-kd", "--recover-seed", str(2**64)],
                                   ["--recover", "router-kd", "--recover-seed", str(2**32)]])
def test_c7_seeds_beyond_what_generators_take(flags, model, mask_file, tmp_path, capsys):
    refused(capsys, ["apply", model, mask_file, "--out", tmp_path / "o", *flags], "seed")


def test_c7_seed_flags_are_bounded(tiny_checkpoint, profiled, tmp_path, capsys):
    refused(capsys, ["profile", tiny_checkpoint, *CALIBRATION, "--seed", str(2**64), "--out", tmp_path / "p"], "seed")
    refused(capsys, ["plan", profiled, "--method", "random", "--retain", "0.5", "--plan-seed", str(2**64), "--out",
                     tmp_path / "m"], "seed")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_c7_nan_or_inf_weights_are_blamed_on_the_checkpoint(value, model, mask_file, tmp_path, capsys):
    weights = load_file(str(model / "model.safetensors"))
    name = next(n for n in weights if "experts" in n)
    weights[name].view(-1)[0] = float(value)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    prof = tmp_path / "p"
    refused(capsys, ["profile", model, *CALIBRATION, "--out", prof], "NaN or infinite", "checkpoint")
    assert not prof.exists() or not any(prof.glob("*.safetensors"))
    line = refused(capsys, ["apply", model, mask_file, "--out", tmp_path / "o"], "NaN or infinite")
    assert "moeprune bug" not in line and not (tmp_path / "o").exists()


def test_c7_model_free_export_copies_no_other_weights(model, mask_file, tmp_path):
    (model / "pytorch_model.bin").write_bytes(b"dense weights")
    (model / "model.gguf").write_bytes(b"dense")
    (model / "pytorch_model.bin.index.json").write_text("{}")
    (model / "linked.txt").symlink_to(tmp_path / "outside.txt")
    (tmp_path / "outside.txt").write_text("secret")
    out = tmp_path / "out"
    ok(["apply", model, mask_file, "--model-free", "--out", out])
    names = {p.name for p in out.iterdir()}
    assert not names & {"pytorch_model.bin", "model.gguf", "pytorch_model.bin.index.json", "linked.txt"}
    assert "tokenizer.json" in names


@pytest.mark.parametrize("model_free", [True, False])
def test_c7_exports_get_the_umask_mode(model_free, model, mask_file, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        ok(["apply", model, mask_file, "--out", out, *(["--model-free"] if model_free else [])])
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


# ------------------------------------------------------------------------------- more members of the classes
def test_c1_ascii_digits_wherever_a_string_becomes_a_number():
    from moeprune.evaluation.zeroshot import eval_batch_size
    from moeprune.surgery.keys import EXPERT_KEY

    for text in ("²", "٣", "1²"):
        with pytest.raises(MoePruneError, match="eval batch size"):
            eval_batch_size(text)
    assert eval_batch_size("16") == 16
    assert EXPERT_KEY.match("model.layers.٣.mlp.experts.0.w") is None
    assert EXPERT_KEY.match("model.layers.3.mlp.experts.٣.w") is None


@pytest.mark.parametrize("name", ["x;rm", "évil", "model"])
def test_c1_profile_folder_entries_follow_the_corpus_name_rule(name, profiled, tmp_path, capsys):
    import shutil

    prof = tmp_path / "prof"
    shutil.copytree(profiled, prof)
    source = next(prof.glob("*.safetensors"))
    shutil.copy(source, prof / f"{name}.safetensors")
    shutil.copy(source.with_suffix(".json"), prof / f"{name}.json")
    refused(capsys, ["plan", prof, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "m"],
            "not a corpus profile")


def test_c4_a_profile_in_another_dtype_is_not_already_profiled(tiny_checkpoint, tmp_path):
    prof = tmp_path / "p"
    ok(["profile", tiny_checkpoint, *CALIBRATION, "--device", "cpu", "--dtype", "float32", "--out", prof])
    assert json.loads((prof / "wiki.json").read_text())["dtype"] == "float32"
    ok(["profile", tiny_checkpoint, *CALIBRATION, "--device", "cpu", "--dtype", "bfloat16", "--out", prof])
    assert json.loads((prof / "wiki.json").read_text())["dtype"] == "bfloat16"


def test_c7_a_diverged_recovery_is_blamed_on_its_settings(tiny_checkpoint, mask_file, monkeypatch):
    from moeprune import recovery
    from moeprune.loading import load_model
    from moeprune.planning.mask import ExpertMask

    loaded = load_model(tiny_checkpoint, device="cpu")
    monkeypatch.setattr(recovery, "train_routers", lambda *a, **k: ({"w": torch.tensor([float("nan")])}, {}))
    options = recovery.RecoveryOptions(kind="router-kd", corpora=("wiki",), samples=1, seq_len=4, epochs=1, lr=1e-3,
                                       batch_size=1)
    with pytest.raises(MoePruneError, match="diverged.*--recover-lr"):
        recovery.recover(loaded, ExpertMask.load(mask_file), options, windows={"wiki": torch.zeros(1, 4).long()},
                         teacher=object(), progress=False)


@pytest.mark.parametrize("lr", ["1e38", "2"])
def test_c7_a_learning_rate_that_only_diverges_is_refused_up_front(lr, model, mask_file, tmp_path, capsys):
    refused(capsys, ["apply", model, mask_file, "--out", tmp_path / "o", "--recover", "router-kd", "--recover-lr", lr,
                     "--recover-corpus", "wiki"], "--recover-lr", untouched=(model,))


@pytest.mark.parametrize("flags", [["--batch-size", str(10**20)], ["--samples", str(2**31)],
                                   ["--seq-len", str(10**20)]])
def test_c7_counts_beyond_what_torch_takes(flags, tiny_checkpoint, tmp_path, capsys):
    """--batch-size 10**20 was an 'Overflow when unpacking long long' traceback inside torch.split."""
    refused(capsys, ["profile", tiny_checkpoint, "--corpus", "wiki", *flags, "--out", tmp_path / "p"], "at most")


def test_c7_recovery_counts_are_bounded_too():
    from moeprune.recovery import RecoveryOptions

    for name in ("samples", "epochs", "batch_size", "seq_len"):
        with pytest.raises(MoePruneError, match="at most"):
            RecoveryOptions(kind="router-kd", **{name: 10**20})


def test_c4_cells_follow_the_bytes_of_local_evaluation_files(tiny_checkpoint, tmp_path, monkeypatch):
    from moeprune import experiment
    from moeprune.loading import load_model, load_tokenizer
    from moeprune.options import EvalSettings

    loaded = load_model(tiny_checkpoint, device="cpu")
    tokenizer = load_tokenizer(tiny_checkpoint)
    ppl = tmp_path / "held.txt"
    ppl.write_text("some held-out text\n")
    runs = []

    def fake_cell(*args, **kwargs):
        runs.append(1)
        return {"cell": "dense", "method": "dense", "variant": "dense", "retain": 1.0, "summary": {"ppl": {}}}

    monkeypatch.setattr(experiment, "run_cell", fake_cell)
    settings = EvalSettings(ppl_datasets=(str(ppl),), tasks="none")
    out = tmp_path / "grid"
    run = experiment.CellRun(loaded, tokenizer, settings, progress=False)
    experiment.evaluate_grid(run, out, [])
    experiment.evaluate_grid(run, out, [])
    assert len(runs) == 1  # reused
    ppl.write_text("other held-out text\n")
    experiment.evaluate_grid(run, out, [])
    assert len(runs) == 2  # the file changed at the same path: measured again
