"""The tool's contract with a new user: bad inputs and faults, tried through the CLI (issue 10).

Every case either works correctly or exits 2 with one line naming the problem and the fix, and changes
nothing on disk. Nothing is lost, nothing is silently wrong. docs/errors.md lists the same cases, numbered
as here (D = data loss, W = exit 0 with a wrong result, T = traceback, L = weak or late validation).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moeprune.cli import main
from moeprune.profiling.stats import ExpertStats
from tests.tiny_models import build_model, save_model

CALIBRATION = ["--corpus", "wiki", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# ------------------------------------------------------------------------------------------ helpers
def snapshot(*paths: Path) -> dict[str, str]:
    """Every file under ``paths`` (hidden ones included) with a hash of its bytes: equal means untouched."""
    found = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for path in files:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        found[f"{root} exists"] = str(root.exists())
    return found


def refused(capsys, argv: list[str], *expected: str, untouched: tuple[Path, ...] = ()) -> str:
    """``argv`` exits 2 with one line containing ``expected``, and changes nothing under ``untouched``."""
    before = snapshot(*untouched)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]  # (progress bars of transformers may come before it)
    assert line.startswith("moeprune: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in line, line
    assert snapshot(*untouched) == before, "a refused command changed files"
    return line


def ok(argv: list[str]) -> None:
    assert main([str(a) for a in argv]) == 0


def copy_model(source: Path, target: Path, tokenizer: bool = True) -> Path:
    shutil.copytree(source, target)
    if not tokenizer:
        for name in TOKENIZER_FILES:
            (target / name).unlink(missing_ok=True)
    return target


def write_mask(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def profiled(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("contract") / "prof"
    ok(["profile", tiny_checkpoint, *CALIBRATION, "--out", out])
    return out


@pytest.fixture(scope="module")
def mask_file(profiled, tmp_path_factory) -> Path:
    masks = tmp_path_factory.mktemp("contract") / "masks"
    ok(["plan", profiled, "--method", "reap", "--retain", "0.5", "--out", masks])
    return masks / "reap-0.50.json"


@pytest.fixture
def mask_json(mask_file) -> dict:
    return json.loads(mask_file.read_text())


@pytest.fixture
def model(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, so a test may watch it for changes."""
    return copy_model(tiny_checkpoint, tmp_path / "model")


# ------------------------------------------------------------------------------ D: data loss (3)
@pytest.mark.parametrize("verb", ["apply", "apply --model-free", "prune"])
def test_d1_out_equal_to_the_model_is_refused(verb, model, mask_file, capsys):
    args = {
        "apply": ["apply", model, mask_file],
        "apply --model-free": ["apply", model, mask_file, "--model-free"],
        "prune": ["prune", model, *CALIBRATION, "--method", "reap", "--retain", "0.5"],
    }[verb]
    refused(capsys, [*args, "--out", model, "--overwrite"], "is the source", untouched=(model,))


def test_d2_out_containing_or_inside_the_model_is_refused(model, mask_file, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("unrelated")
    refused(capsys, ["apply", model, mask_file, "--out", tmp_path, "--overwrite"], "contains the source",
            untouched=(tmp_path,))
    refused(capsys, ["apply", model, mask_file, "--out", model / "pruned"], "lies inside the source",
            untouched=(model,))
    # And a folder moeprune did not write is never replaced wholesale.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_text("x")
    refused(capsys, ["apply", model, mask_file, "--out", other, "--overwrite", "--model-free"], "did not write",
            untouched=(other,))


def test_d3_overwrite_swaps_atomically_and_a_kill_mid_delete_loses_nothing(model, mask_file, tmp_path, monkeypatch):
    out = tmp_path / "pruned"
    ok(["apply", model, mask_file, "--out", out, "--model-free"])
    real_rmtree = shutil.rmtree

    def killed_while_deleting_the_old(path, *args, **kwargs):
        if str(path).endswith(".old"):
            raise KeyboardInterrupt  # the kill comes while the old output is being deleted
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("moeprune.io.shutil.rmtree", killed_while_deleting_the_old)
    # The CLI ends a Ctrl-C with one line and 130 (issue 18); what the kill left is as a SIGKILL leaves it.
    assert main(["apply", str(model), str(mask_file), "--out", str(out), "--model-free", "--overwrite"]) == 130
    monkeypatch.undo()
    # The new output is complete in place; only the set-aside old one is left over.
    assert all((out / name).exists() for name in ("mask.json", "config.json", "model.safetensors", *TOKENIZER_FILES))
    assert [p.name.endswith(".old") for p in tmp_path.glob(".pruned.*")] == [True]
    # A kill between the two renames (no output at all) is repaired: the set-aside output comes back.
    os.rename(out, tmp_path / ".pruned.abcdefgh.old")
    for leftover in tmp_path.glob(".pruned.*.old"):
        if leftover.name != ".pruned.abcdefgh.old":
            real_rmtree(leftover)
    assert main(["apply", str(model), str(mask_file), "--out", str(out), "--model-free"]) == 2  # restored: exists
    assert (out / "mask.json").exists() and not list(tmp_path.glob(".pruned.*"))


# -------------------------------------------------------------------- W: exit 0, wrong result (8)
@pytest.mark.parametrize("verb", ["profile", "prune", "eval"])
def test_w1_a_model_folder_without_tokenizer_needs_tokenizer(verb, tiny_checkpoint, tmp_path, capsys):
    bare = copy_model(tiny_checkpoint, tmp_path / "bare", tokenizer=False)
    out = tmp_path / "out"
    args = {
        "profile": ["profile", bare, *CALIBRATION, "--out", out],
        "prune": ["prune", bare, *CALIBRATION, "--method", "reap", "--retain", "0.5", "--out", out],
        "eval": ["eval", bare, "--ppl", "wiki", "--ppl-seq-len", "32", "--tasks", "none", "--out", out / "r.json"],
    }[verb]
    refused(capsys, args, "no tokenizer files", "--tokenizer", untouched=(tmp_path,))
    if verb == "profile":  # naming one works, and the windows are real text, not EOS tokens
        ok([*args, "--tokenizer", tiny_checkpoint])
        stats = ExpertStats.load(out / "wiki.safetensors")
        assert stats.meta["tokens"] == 4 * 32 and stats.count.sum() == 4 * 32 * 2 * len(stats.layer_ids)


def test_w2_model_free_apply_refuses_k_below_top_k(model, mask_json, tmp_path, capsys):
    for layer in mask_json["layers"].values():
        layer["kept"], layer["protected"] = layer["kept"][:1], []
    mask = write_mask(tmp_path / "k1.json", {**mask_json, "kept_per_layer": 1, "retain": 0.125})
    refused(capsys, ["apply", model, mask, "--out", tmp_path / "out", "--model-free"],
            "fewer than the router's top-k=2", untouched=(tmp_path,))


def test_w3_model_free_apply_refuses_uneven_routing_groups(tmp_path, capsys):
    v3 = build_model("deepseek_v3")  # 8 experts in n_group=2 groups of 4, top-2
    folder = save_model(v3, tmp_path / "v3")
    layers = {"1": {"kept": [0, 1, 2, 4]}, "2": {"kept": [0, 1, 4, 5]}}  # layer 1 keeps 3 + 1
    mask = write_mask(tmp_path / "uneven.json", {
        "format": "moeprune.mask/1", "model": str(folder), "method": "reap", "retain": 0.5, "num_experts": 8,
        "kept_per_layer": 4, "layers": layers,
    })
    refused(capsys, ["apply", folder, mask, "--out", tmp_path / "out", "--model-free"], "n_group=2",
            untouched=(tmp_path,))


def test_w4_a_profile_resumed_with_another_batch_size_counts_every_window(tiny_checkpoint, tmp_path, monkeypatch):
    args = ["profile", str(tiny_checkpoint), "--corpus", "wiki", "--samples", "12", "--seq-len", "32"]
    ok([*args, "--batch-size", "4", "--out", tmp_path / "reference"])
    real_save, saves = ExpertStats.save, []

    def killed_after_three_checkpoints(self, path):
        real_save(self, path)
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ExpertStats, "save", killed_after_three_checkpoints)
    assert main([*args, "--batch-size", "2", "--checkpoint-every", "1", "--out", str(tmp_path / "resumed")]) == 130
    monkeypatch.undo()
    assert ExpertStats.load(tmp_path / "resumed" / "wiki.partial.safetensors").meta["windows_done"] == 6
    ok([*args, "--batch-size", "4", "--out", tmp_path / "resumed"])  # 6 windows left: 2 batches of 4 and 2
    got = ExpertStats.load(tmp_path / "resumed" / "wiki.safetensors")
    want = ExpertStats.load(tmp_path / "reference" / "wiki.safetensors")
    assert got.count.sum() == want.count.sum() == 12 * 32 * 2 * len(got.layer_ids)  # every token, top-2
    torch.testing.assert_close(got.reap_sum, want.reap_sum, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fault", ["nan", "inf", "negative", "fractional count"])
def test_w5_a_profile_with_invalid_sums_is_refused(fault, profiled, tmp_path, capsys):
    prof = shutil.copytree(profiled, tmp_path / "prof")
    tensors = load_file(prof / "wiki.safetensors")
    field, value = {"nan": ("reap_sum", float("nan")), "inf": ("gate_sum", float("inf")),
                    "negative": ("norm_sum", -1.0), "fractional count": ("count", 2.5)}[fault]
    tensors[field][0, 0] = value
    save_file(tensors, prof / "wiki.safetensors")
    expected = {"nan": "NaN", "inf": "infinite", "negative": "negative", "fractional count": "fractional"}[fault]
    refused(capsys, ["plan", prof, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "masks"], expected,
            untouched=(tmp_path,))


def test_w6_a_profile_folder_mixing_two_models_is_refused(profiled, tmp_path, capsys):
    prof = shutil.copytree(profiled, tmp_path / "prof")
    shutil.copy(prof / "wiki.safetensors", prof / "other.safetensors")
    meta = json.loads((prof / "wiki.json").read_text())
    (prof / "other.json").write_text(json.dumps({**meta, "config_hash": "0123456789abcdef"}))
    for method in ("reap", "expert-sparsity"):
        refused(capsys, ["plan", prof, "--method", method, "--retain", "0.5", "--recon-seq-len", "32",
                         "--out", tmp_path / "m"], "different models", untouched=(tmp_path,))


def test_w6_profiling_another_model_into_a_profile_folder_is_refused(profiled, model, tmp_path, capsys):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))  # same shape, other model
    prof = shutil.copytree(profiled, tmp_path / "prof")
    refused(capsys, ["profile", model, *CALIBRATION, "--out", prof], "another model", untouched=(tmp_path,))


@pytest.mark.parametrize("flag", ["--samples", "--seq-len", "--batch-size"])
def test_w7_zero_samples_or_seq_len_is_an_error_not_the_default(flag, tiny_checkpoint, tmp_path, capsys):
    argv = ["profile", tiny_checkpoint, *CALIBRATION, "--out", tmp_path / "p", flag, "0"]  # the last one wins
    refused(capsys, argv, f"{flag} must be at least 1", untouched=(tmp_path,))


def test_w8_a_fractional_expert_id_is_refused_not_rounded(model, mask_json, tmp_path, capsys):
    first = next(iter(mask_json["layers"].values()))
    first["kept"][0] = 1.5
    mask = write_mask(tmp_path / "frac.json", mask_json)
    refused(capsys, ["apply", model, mask, "--out", tmp_path / "out"], "list of integers", untouched=(tmp_path,))


# ------------------------------------------------------------------------ T: tracebacks (12 + 1)
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e\n\nencore".encode("latin-1"), "not UTF-8"),
        ("binary.txt", bytes(range(256)) * 8, "binary"),
        ("numbers.jsonl", b'{"text": "fine"}\n{"text": 5}\n', "line 2"),
        ("broken.jsonl", b'{"text": "fine"}\n{"text": "unterminated\n', "not valid JSON"),
    ],
)
def test_t1_to_t4_unreadable_corpus_files(name, content, expected, tiny_checkpoint, tmp_path, capsys):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    refused(capsys, ["profile", tiny_checkpoint, "--corpus", corpus, "--samples", "2", "--seq-len", "16",
                     "--out", tmp_path / "p"], expected, untouched=(tmp_path,))


def test_t5_an_unknown_split_of_a_bundled_corpus(tiny_checkpoint, tmp_path, capsys):
    refused(capsys, ["profile", tiny_checkpoint, "--corpus", "wiki:dev", "--out", tmp_path / "p"],
            "splits train, validation, test", untouched=(tmp_path,))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: [entry.update(kept=[str(e) for e in entry["kept"]]) for entry in m["layers"].values()],
         "list of integers"),
        (lambda m: m.pop("layers"), "lacks the field 'layers'"),
        (lambda m: next(iter(m["layers"].values())).pop("kept"), "\"kept\" list"),
        (lambda m: m.update(num_experts="8"), "not a positive integer"),
    ],
    ids=["string ids", "no layers", "no kept", "string count"],
)
def test_t6_malformed_masks(edit, expected, model, mask_json, tmp_path, capsys):
    edit(mask_json)
    mask = write_mask(tmp_path / "bad.json", mask_json)
    refused(capsys, ["apply", model, mask, "--out", tmp_path / "out"], expected, untouched=(tmp_path,))


def test_t6_a_mask_that_is_a_list(model, tmp_path, capsys):
    mask = write_mask(tmp_path / "list.json", [[0, 1], [2, 3]])
    refused(capsys, ["apply", model, mask, "--out", tmp_path / "out"], "a JSON list", untouched=(tmp_path,))


@pytest.mark.parametrize("part", ["safetensors", "json"])
def test_t7_a_corrupt_profile(part, profiled, tmp_path, capsys):
    prof = shutil.copytree(profiled, tmp_path / "prof")
    target = prof / f"wiki.{part}"
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    refused(capsys, ["plan", prof, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "m"], "corrupt",
            "re-run `moeprune profile`", untouched=(tmp_path,))


def test_t8_a_truncated_checkpoint(model, mask_file, tmp_path, capsys):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    refused(capsys, ["apply", model, mask_file, "--out", tmp_path / "out"], "truncated or corrupt",
            untouched=(tmp_path,))
    refused(capsys, ["profile", model, *CALIBRATION, "--out", tmp_path / "p"], "re-download", untouched=(tmp_path,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_t9_device_cuda_without_cuda(tiny_checkpoint, tmp_path, capsys):
    refused(capsys, ["profile", tiny_checkpoint, *CALIBRATION, "--device", "cuda", "--out", tmp_path / "p"],
            "no usable CUDA GPU", untouched=(tmp_path,))
    refused(capsys, ["eval", tiny_checkpoint, "--device", "gpu0", "--tasks", "none"], "Unknown --device")


@pytest.mark.parametrize(("code", "expected"), [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_t10_full_or_read_only_disk(code, expected, model, profiled, mask_file, tmp_path, capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "out"))

    monkeypatch.setattr("moeprune.surgery.shards.save_file", fails)
    refused(capsys, ["apply", model, mask_file, "--out", tmp_path / "out", "--model-free"], expected,
            untouched=(tmp_path,))
    def safetensors_fails(*args, **kwargs):  # how safetensors' Rust writer reports it (measured on a full tmpfs)
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr("moeprune.surgery.shards.save_file", safetensors_fails)
    refused(capsys, ["apply", model, mask_file, "--out", tmp_path / "out", "--model-free"], expected,
            untouched=(tmp_path,))
    monkeypatch.setattr("moeprune.io._create_temp", fails)
    refused(capsys, ["plan", profiled, "--method", "reap", "--retain", "0.5", "--out", tmp_path / "masks"], expected,
            untouched=(tmp_path,))


@pytest.mark.parametrize("verb", ["apply", "prune", "profile", "plan", "experiment"])
def test_t11_an_out_that_is_a_file(verb, tiny_checkpoint, profiled, mask_file, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    args = {
        "apply": ["apply", tiny_checkpoint, mask_file],
        "prune": ["prune", tiny_checkpoint, *CALIBRATION, "--method", "reap", "--retain", "0.5"],
        "profile": ["profile", tiny_checkpoint, *CALIBRATION],
        "plan": ["plan", profiled, "--method", "reap", "--retain", "0.5"],
        "experiment": ["experiment", tiny_checkpoint],
    }[verb]
    refused(capsys, [*args, "--out", out], "is a file", untouched=(tmp_path,))


def test_t12_a_245_character_output_name_works(model, mask_file, tmp_path, capsys):
    out = tmp_path / ("p" * 245)
    ok(["apply", model, mask_file, "--out", out, "--model-free"])
    assert (out / "mask.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", out.name])
    refused(capsys, ["apply", model, mask_file, "--out", tmp_path / ("q" * 300), "--model-free"], "over the filesystem",
            untouched=(tmp_path,))


# --------------------------------------------------------------------------- L: weak or late (9)
def test_l1_protect_budget_with_a_method_that_ignores_it(tiny_checkpoint, profiled, tmp_path, capsys):
    refused(capsys, ["plan", profiled, "--method", "reap", "--retain", "0.5", "-B", "2", "--out", tmp_path / "m"],
            "-B", "only applies to tb-coverage", untouched=(tmp_path,))
    refused(capsys, ["prune", tiny_checkpoint, *CALIBRATION, "--method", "frequency", "--retain", "0.5", "-B", "2",
                     "--out", tmp_path / "o"], "only applies to tb-coverage", untouched=(tmp_path,))
    refused(capsys, ["experiment", tiny_checkpoint, "--methods", "reap", "-B", "2", "--out", tmp_path / "e"],
            "leaves out", untouched=(tmp_path,))


def test_l2_profile_refuses_seq_len_beyond_the_model_positions(tiny_checkpoint, tmp_path, capsys):
    refused(capsys, ["profile", tiny_checkpoint, "--corpus", "wiki", "--seq-len", "256", "--out", tmp_path / "p"],
            "max_position_embeddings=128", untouched=(tmp_path,))


def test_l3_a_mask_of_another_model_of_the_same_shape(model, mask_file, tmp_path, capsys):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    for extra in ([], ["--model-free"]):
        refused(capsys, ["apply", model, mask_file, "--out", tmp_path / "out", *extra], "config hash", "--force",
                untouched=(tmp_path,))
    refused(capsys, ["eval", model, "--mask", mask_file, "--tasks", "none"], "config hash")
    ok(["apply", model, mask_file, "--out", tmp_path / "out", "--model-free", "--force"])


def test_l4_a_second_writer_of_the_same_out_is_refused(model, mask_file, tmp_path, capsys):
    from moeprune.io import sibling_prefix

    out = tmp_path / "pruned"
    lock = os.open(tmp_path / (sibling_prefix(out) + ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what a concurrent moeprune holds while it writes
        refused(capsys, ["apply", model, mask_file, "--out", out, "--model-free"], "Another moeprune process")
    finally:
        os.close(lock)
    ok(["apply", model, mask_file, "--out", out, "--model-free"])  # the lock died with its holder
    assert not list(tmp_path.glob(".pruned*"))


def test_l5_a_changed_corpus_file_is_profiled_again(tiny_checkpoint, text_corpus, tmp_path, capsys):
    corpus = shutil.copy(text_corpus, tmp_path / "notes.txt")
    argv = ["profile", tiny_checkpoint, "--corpus", corpus, "--samples", "2", "--seq-len", "32"]
    argv += ["--out", tmp_path / "p"]
    ok(argv)
    first = ExpertStats.load(tmp_path / "p" / "notes.safetensors")
    Path(corpus).write_text("\n\n".join(reversed(Path(corpus).read_text().split("\n\n"))))  # same path, new text
    capsys.readouterr()
    ok(argv)
    assert "already profiled" not in capsys.readouterr().out
    second = ExpertStats.load(tmp_path / "p" / "notes.safetensors")
    assert second.meta["corpus_sha256"] != first.meta["corpus_sha256"]
    assert not torch.equal(second.reap_sum, first.reap_sum)


def test_l5_another_tokenizer_is_profiled_again(tiny_checkpoint, tmp_path, capsys):
    other = copy_model(tiny_checkpoint, tmp_path / "other-tokenizer")
    definition = json.loads((other / "tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, other ids: other windows
    (other / "tokenizer.json").write_text(json.dumps(definition))
    argv = ["profile", tiny_checkpoint, *CALIBRATION, "--out", tmp_path / "p"]
    ok(argv)
    capsys.readouterr()
    ok([*argv, "--tokenizer", other])
    assert "already profiled" not in capsys.readouterr().out
    ok([*argv, "--tokenizer", other])
    assert "already profiled" in capsys.readouterr().out


def test_l6_late_errors_come_before_profiling(tiny_checkpoint, model, mask_file, tmp_path, capsys):
    refused(capsys, ["experiment", tiny_checkpoint, "--methods", "reap", "foo", "--out", tmp_path / "e"],
            "Unknown method(s) ['foo']", untouched=(tmp_path,))
    refused(capsys, ["prune", tiny_checkpoint, *CALIBRATION, "--method", "reap", "--retain", "0.2",
                     "--out", tmp_path / "o"], "fewer than the router's top-k=2", untouched=(tmp_path,))
    refused(capsys, ["prune", tiny_checkpoint, *CALIBRATION, "--method", "reap", "--retain", "0.5",
                     "--out", tmp_path / "o", "--workdir", tmp_path / "o" / "work"], "contains the source",
            untouched=(tmp_path,))
    existing = tmp_path / "existing"
    ok(["apply", model, mask_file, "--out", existing, "--model-free"])
    refused(capsys, ["prune", tiny_checkpoint, *CALIBRATION, "--method", "reap", "--retain", "0.5",
                     "--out", existing], "already exists", untouched=(tmp_path,))


def test_l7_eval_checks_its_out_before_evaluating(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["eval", tiny_checkpoint, "--ppl", "wiki", "--ppl-seq-len", "32", "--tasks", "none"]
    refused(capsys, [*argv, "--out", blocker / "results.json"], "is a file, not a directory", untouched=(tmp_path,))
    refused(capsys, [*argv, "--out", tmp_path], "is a directory", untouched=(tmp_path,))


def test_l8_hints_name_the_right_fix(tiny_checkpoint, profiled, tmp_path, capsys):
    refused(capsys, ["eval", tiny_checkpoint, "--limit", "-3", "--tasks", "none"], "--limit must be at least 1")
    mixtral = save_model(build_model("mixtral", num_experts=4), tmp_path / "mixtral")
    mask = write_mask(tmp_path / "m.json", {
        "format": "moeprune.mask/1", "model": "x", "method": "reap", "retain": 0.5, "num_experts": 8,
        "kept_per_layer": 4, "layers": {str(i): {"kept": [0, 1, 2, 3]} for i in range(3)},
    })
    refused(capsys, ["apply", mixtral, mask, "--out", tmp_path / "out", "--model-free"],
            "this model has 4 (num_local_experts", untouched=(tmp_path,))


def test_l8_model_free_refuses_a_mask_that_leaves_out_a_moe_layer(tmp_path, capsys):
    mixtral = save_model(build_model("mixtral", num_experts=4), tmp_path / "mixtral")  # 3 MoE layers
    mask = write_mask(tmp_path / "m.json", {
        "format": "moeprune.mask/1", "model": "x", "method": "reap", "retain": 0.5, "num_experts": 4,
        "kept_per_layer": 2, "layers": {str(i): {"kept": [0, 1]} for i in range(2)},
    })
    refused(capsys, ["apply", mixtral, mask, "--out", tmp_path / "out", "--model-free"], "layers [0, 1, 2]",
            untouched=(tmp_path,))


def test_l9_leftovers_of_killed_runs_are_cleaned(model, mask_file, tmp_path):
    out = tmp_path / "pruned"
    for leftover in (".pruned.k1ll3d00.tmp", ".pruned.k1ll3d01.tmp"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_text("half")
    (tmp_path / ".pruned.work.abcdefgh.tmp").mkdir()  # another output's: not ours to touch
    ok(["apply", model, mask_file, "--out", out, "--model-free"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pruned.work.abcdefgh.tmp", "model", "pruned"]
