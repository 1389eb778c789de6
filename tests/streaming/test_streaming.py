"""Weights streamed from disk one decoder layer at a time (issue 24): equal results, the automatic choice, refusals."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune import api
from moeprune.cli import main
from moeprune.errors import MoePruneError
from moeprune.loading import ModelSource
from moeprune.options import Calibration, EvalSettings
from moeprune.profiling.runner import profile_windows
from moeprune.profiling.sequential import profile_windows_layer_major
from moeprune.profiling.stats import SUM_FIELDS
from moeprune.reconstruction import (
    SearchSettings,
    WorkDir,
    reconstruction_selection,
    reconstruction_selection_streamed,
)
from moeprune.streaming import layers as stream_layers
from moeprune.streaming import memory
from moeprune.streaming.layers import DiskLayers
from moeprune.streaming.memory import Memory, available_memory
from moeprune.streaming.runner import run_layer_major
from tests import arch_sweep
from tests.tiny_models import build_model, save_model

# The six architectures the issue names: a shared expert (qwen2_moe), plain (mixtral, qwen3_moe), routing groups and a
# correction bias (deepseek_v3), fused experts with biases and alternating sliding-window layers (gpt_oss), and
# moeprune's DeepSeek-MoE port.
ARCHS = ["qwen2_moe", "mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "deepseek"]
CALIBRATION = ["--corpus", "wiki", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def _src(path, stream: bool | None = None) -> ModelSource:
    return ModelSource.of(str(path), device="cpu", stream=stream)


def _saved(arch: str, path: Path) -> torch.nn.Module:
    model = arch_sweep.build_model(arch) if arch == "gpt_oss" else build_model(arch)
    if arch == "gpt_oss":
        model.save_pretrained(path)
    else:
        save_model(model, path)
    return model


def _windows(vocab: int, n: int = 5, length: int = 12) -> torch.Tensor:
    return torch.randint(3, min(vocab, 128), (n, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_profile_and_logits_equal_in_memory(arch, tmp_path):
    model = _saved(arch, tmp_path / arch)
    windows = _windows(model.config.vocab_size)
    plain = profile_windows(model, windows, Calibration(batch_size=2, checkpoint_every=16), {}, progress=False)
    streamed = profile_windows_layer_major(DiskLayers(tmp_path / arch, model.config, torch.float32), windows, 2, {},
                                           progress=False)
    assert streamed.count.sum() > 0 and torch.equal(streamed.count, plain.count)
    for name in SUM_FIELDS:
        torch.testing.assert_close(getattr(streamed, name), getattr(plain, name), rtol=1e-5, atol=1e-7, msg=name)

    # The head runs too: logits of every batch equal the in-memory model's.
    place = DiskLayers(tmp_path / arch, model.config, torch.float32)
    got: dict[int, torch.Tensor] = {}
    batches = [{"input_ids": b} for b in torch.split(windows, 2)]
    run_layer_major(place, batches, on_logits=lambda b, logits: got.__setitem__(b, logits.clone()), progress=False)
    with torch.no_grad():
        expected = model(input_ids=windows).logits
    torch.testing.assert_close(torch.cat([got[b] for b in range(len(batches))]), expected, rtol=1e-5, atol=1e-5)
    # Everything went back to the meta device, and every layer was read once.
    assert all(p.is_meta for p in place.model.parameters())
    assert place.stats.layers_read == len(place.layers) and place.stats.bytes_read > 0


def test_at_most_two_layers_are_materialized_at_once(tmp_path, monkeypatch):
    model = _saved("mixtral", tmp_path / "m")
    place = DiskLayers(tmp_path / "m", model.config, torch.float32)
    seen = []
    load = stream_layers.DiskLayers._load_layer

    def counting(self, index):
        load(self, index)
        seen.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in self.layers))

    monkeypatch.setattr(stream_layers.DiskLayers, "_load_layer", counting)
    run_layer_major(place, [{"input_ids": _windows(128, 2)}], progress=False)
    assert seen and max(seen) <= 2


def test_api_profile_streamed_equals_in_memory(tiny_checkpoint, text_corpus, tmp_path):
    corpora = [f"notes={text_corpus}"]
    kwargs = dict(calibration={"samples": 6, "seq_len": 16, "batch_size": 4}, progress=False)
    model = ModelSource.of(str(tiny_checkpoint), device="cpu")
    streamed = api.profile(model, corpora, tmp_path / "s", stream=True, **kwargs)
    plain = api.profile(model, corpora, tmp_path / "p", stream=False, **kwargs)
    a, b = streamed.corpora["notes"], plain.corpora["notes"]
    assert a.meta.get("stream") is True and "stream" not in b.meta
    assert torch.equal(a.count, b.count)
    for name in SUM_FIELDS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-7, msg=name)
    assert a.meta["config_hash"] == b.meta["config_hash"] and a.meta["weights_sha256"] == b.meta["weights_sha256"]


def test_cli_stream_and_no_stream(tiny_checkpoint, tmp_path):
    assert main(["profile", str(tiny_checkpoint), *CALIBRATION, "--device", "cpu", "--stream", "--out",
                 str(tmp_path / "s"), "-q"]) == 0
    assert json.loads((tmp_path / "s" / "wiki.json").read_text())["stream"] is True
    assert main(["profile", str(tiny_checkpoint), *CALIBRATION, "--device", "cpu", "--no-stream", "--out",
                 str(tmp_path / "n"), "-q"]) == 0
    assert "stream" not in json.loads((tmp_path / "n" / "wiki.json").read_text())


# ------------------------------------------------------------------------------------------ memory and the choice
def _fake_cgroup(root: Path, version: int, limit: int, usage: int, inactive: int, meminfo_kb: int = 64 << 20):
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {meminfo_kb} kB\nMemAvailable: {meminfo_kb} kB\n")
    cgroups = root / "cgroup"
    if version == 1:
        (proc / "self" / "cgroup").write_text("5:devices:/\n4:memory:/slurm/job_7\n0::/\n")
        node = cgroups / "memory" / "slurm" / "job_7"
        node.mkdir(parents=True)
        (cgroups / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
        (node / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (node / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (node / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {inactive}\n")
    else:
        (proc / "self" / "cgroup").write_text("0::/user.slice/job\n")
        node = cgroups / "user.slice" / "job"
        node.mkdir(parents=True)
        (cgroups / "user.slice" / "memory.max").write_text("max\n")
        (node / "memory.max").write_text(f"{limit}\n")
        (node / "memory.current").write_text(f"{usage}\n")
        (node / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\n")
    return proc, cgroups


@pytest.mark.parametrize("version", [1, 2])
def test_available_memory_honours_the_cgroup_limit(tmp_path, version):
    proc, cgroups = _fake_cgroup(tmp_path, version, limit=3 << 30, usage=1 << 30, inactive=256 << 20)
    found = available_memory(proc, cgroups)
    assert found.available == (3 << 30) - (1 << 30) + (256 << 20)  # page cache counted against it is reclaimable
    assert found.source.endswith("memory.limit_in_bytes" if version == 1 else "memory.max")
    # No limit anywhere: MemAvailable.
    unlimited = tmp_path / "free"
    proc, cgroups = _fake_cgroup(unlimited, version, limit=1 << 62, usage=0, inactive=0, meminfo_kb=1234)
    assert available_memory(proc, cgroups) == Memory(1234 * 1024, str(proc / "meminfo"))


def test_the_automatic_choice_reads_the_cgroup_limit(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    size = ModelSource.of(str(tiny_checkpoint), device="cpu").compute_bytes()
    proc, cgroups = _fake_cgroup(tmp_path / "small", 1, limit=size, usage=0, inactive=0)
    monkeypatch.setattr(memory, "PROC", proc)
    monkeypatch.setattr(memory, "CGROUP_ROOT", cgroups)
    logger = logging.getLogger("moeprune")
    logger.addHandler(caplog.handler)  # the CLI's logging setup may stop propagation to the root
    try:
        with caplog.at_level("INFO", logger="moeprune"):
            assert ModelSource.of(str(tiny_checkpoint), device="cpu").placement() == "stream"
    finally:
        logger.removeHandler(caplog.handler)
    assert "memory.limit_in_bytes" in caplog.text and "--no-stream" in caplog.text
    assert ModelSource.of(str(tiny_checkpoint), device="cpu", stream=False).placement() == "memory"
    proc, cgroups = _fake_cgroup(tmp_path / "large", 2, limit=100 * size, usage=0, inactive=0)
    monkeypatch.setattr(memory, "PROC", proc)
    monkeypatch.setattr(memory, "CGROUP_ROOT", cgroups)
    assert ModelSource.of(str(tiny_checkpoint), device="cpu").placement() == "memory"


# ------------------------------------------------------------------------------------------ refusals
@pytest.fixture
def no_reads(monkeypatch):
    def fail(self, keys):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr(stream_layers.DiskLayers, "_materialize", fail)


def _refused(capsys, argv: list[str], *expected: str) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert line.startswith("moeprune: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in line, line
    return line


def test_stream_refuses_a_pickle_checkpoint(tiny_checkpoint, tmp_path, capsys, no_reads):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    _refused(capsys, ["profile", folder, *CALIBRATION, "--device", "cpu", "--stream", "--out", tmp_path / "o"],
             "pickle", "pytorch_model.bin", "safetensors")
    assert not (tmp_path / "o").exists()


def test_stream_refuses_a_missing_shard(tiny_checkpoint, tmp_path, capsys, no_reads):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, folder / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
                  for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _refused(capsys, ["profile", folder, *CALIBRATION, "--device", "cpu", "--stream", "--out", tmp_path / "o"],
             "model-00002-of-00002.safetensors", "re-download")
    assert not (tmp_path / "o").exists()


def test_stream_refuses_memory_too_small_for_one_layer(tiny_checkpoint, tmp_path, capsys, monkeypatch, no_reads):
    proc, cgroups = _fake_cgroup(tmp_path / "tiny", 2, limit=4096, usage=0, inactive=0)
    monkeypatch.setattr(memory, "PROC", proc)
    monkeypatch.setattr(memory, "CGROUP_ROOT", cgroups)
    line = _refused(capsys, ["profile", tiny_checkpoint, *CALIBRATION, "--device", "cpu", "--out", tmp_path / "o"],
                    "Too little memory to stream", "one decoder layer takes", "0.00 GiB available", "memory.max")
    assert "nothing was read" in line
    assert not (tmp_path / "o").exists()
    with pytest.raises(MoePruneError, match="Too little memory"):
        ModelSource.of(str(tiny_checkpoint), device="cpu").open_stream(Memory(4096, "test"))


# ------------------------------------------------------------------------------------------ evaluation
def test_streamed_perplexity_equals_in_memory_with_and_without_a_mask(tiny_checkpoint, text_corpus, tmp_path):
    prof = api.profile(_src(tiny_checkpoint, False), [f"notes={text_corpus}"], tmp_path / "prof",
                       calibration={"samples": 4, "seq_len": 16}, progress=False)
    mask = api.plan(prof, "frequency", 0.5, progress=False)
    settings = EvalSettings(ppl_datasets=(str(text_corpus),), ppl_seq_len=24, max_windows=5, tasks="none",
                            eval_batch_size=2)
    for m in (None, mask):
        kwargs = dict(mask=m, settings=settings, progress=False)
        streamed = api.evaluate(_src(tiny_checkpoint, True), **kwargs)
        plain = api.evaluate(_src(tiny_checkpoint, False), **kwargs)
        (a,), (b,) = streamed["perplexity"].values(), plain["perplexity"].values()
        assert a["windows"] == b["windows"] == 5
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
        assert streamed["footprint"] == plain["footprint"]
        assert streamed["metadata"]["stream"] is True
    dense = api.evaluate(_src(tiny_checkpoint, True), settings=settings, progress=False)
    assert streamed["footprint"]["params_total"] < dense["footprint"]["params_total"]


def test_streamed_lm_eval_loglikelihoods_equal_in_memory(tiny_checkpoint, tokenizer, monkeypatch):
    from moeprune.evaluation.hflm import SplitSafeHFLM, StreamedHFLM
    from moeprune.loading import load_model

    model = load_model(str(tiny_checkpoint), device="cpu")
    place = ModelSource.of(str(tiny_checkpoint), device="cpu", stream=True).open_stream()
    texts = ["The cat sat on", "A river runs", "Numbers are", "The cat sat on the"]
    requests = [((a, b), tokenizer.encode(a), tokenizer.encode(b))
                for a in texts for b in (" the mat", " quickly", " x")]
    plain = SplitSafeHFLM(pretrained=model, tokenizer=tokenizer, batch_size=3)._loglikelihood_tokens(requests)
    loads = []
    load = stream_layers.DiskLayers._load_layer
    monkeypatch.setattr(stream_layers.DiskLayers, "_load_layer", lambda self, i: (loads.append(i), load(self, i)))
    lm = StreamedHFLM(place, tokenizer=tokenizer, batch_size=3)
    lm.chunk_bytes = 1  # one batch per chunk: the chunked path, every layer read once per batch
    streamed = lm._loglikelihood_tokens(requests)
    assert [g for _, g in streamed] == [g for _, g in plain]
    assert [ll for ll, _ in streamed] == pytest.approx([ll for ll, _ in plain], rel=1e-5)
    # chunks of one batch: every layer read once per batch HFLM runs (5 here: two rounds of split requests)
    assert len(loads) == len(place.layers) * 5


def test_streamed_eval_with_tasks_equals_in_memory(tiny_checkpoint, tmp_path):
    settings = EvalSettings(ppl_datasets=(), tasks="bundled", limit=3, eval_batch_size=4)
    streamed = api.evaluate(_src(tiny_checkpoint, True), settings=settings, progress=False)
    plain = api.evaluate(_src(tiny_checkpoint, False), settings=settings, progress=False)
    assert streamed["summary"]["tasks"] == pytest.approx(plain["summary"]["tasks"], rel=1e-6)


# ------------------------------------------------------------------------------------------ expert-sparsity
def _outcome(run):
    try:
        return {k: {i: (r.kept, round(r.loss, 4)) for i, r in layers.items()} for k, layers in run().items()}
    except MoePruneError as err:
        return f"refused: {err}"


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_expert_sparsity_equals_in_memory(arch, tmp_path):
    model = _saved(arch, tmp_path / arch)
    windows = _windows(model.config.vocab_size, n=4, length=16)
    search = SearchSettings(batch_size=2, loss="per-batch", loss_batch=2)
    plain = _outcome(lambda: reconstruction_selection(model, windows, [4, 6], WorkDir(tmp_path / "work", "k"), search,
                                                      progress=False))
    place = DiskLayers(tmp_path / arch, model.config, torch.float32)
    streamed = _outcome(lambda: reconstruction_selection_streamed(place, windows, [4, 6], search, progress=False))
    assert streamed == plain
    assert isinstance(plain, str) or all(len(layers) for layers in plain.values())


def test_plan_expert_sparsity_streamed_equals_in_memory(tiny_checkpoint, text_corpus, tmp_path):
    prof = api.profile(_src(tiny_checkpoint, False), [f"c4={text_corpus}"], tmp_path / "prof",
                       calibration={"samples": 4, "seq_len": 16}, progress=False)
    masks = {}
    for stream in (True, False):
        recon = {"samples": 4, "seq_len": 16, "workdir": str(tmp_path / "w")}
        masks[stream] = api.plan(prof, "tb-coverage", 0.5, model=_src(tiny_checkpoint, stream),
                                 reconstruction=recon, progress=False)
    assert masks[True].layers == masks[False].layers


# ------------------------------------------------------------------------------------------ apply, prune, recovery
@pytest.fixture(scope="module")
def half_mask(tiny_checkpoint, tmp_path_factory):
    prof = api.profile(_src(tiny_checkpoint, False), ["wiki"], tmp_path_factory.mktemp("prof"),
                       calibration={"samples": 4, "seq_len": 16}, progress=False)
    return api.plan(prof, "frequency", 0.5, progress=False)


def test_streamed_apply_writes_the_model_free_checkpoint_verified(tiny_checkpoint, half_mask, tmp_path):
    streamed = api.apply(_src(tiny_checkpoint, True), half_mask, tmp_path / "s", progress=False)
    plain = api.apply(_src(tiny_checkpoint, False), half_mask, tmp_path / "p", progress=False)
    a, b = load_file(streamed / "model.safetensors"), load_file(plain / "model.safetensors")
    fused = {k for k in b if "experts" in k}
    assert fused  # the in-memory export's fused experts; the streamed one keeps the source's layout
    with torch.no_grad():
        from moeprune.loading import load_model

        ids = _windows(128, 2, 12)
        x = load_model(str(streamed), device="cpu")(input_ids=ids).logits
        y = load_model(str(plain), device="cpu")(input_ids=ids).logits
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert (streamed / "mask.json").exists() and len(a) > 0


def test_streamed_apply_verification_catches_a_wrong_checkpoint(tiny_checkpoint, half_mask, tmp_path, monkeypatch):
    from moeprune.surgery import shards

    real = shards._pruned_shard

    def corrupted(*args, **kwargs):
        tensors = real(*args, **kwargs)
        name = next(k for k in sorted(tensors) if "mlp.gate.weight" in k)
        tensors[name] = tensors[name] + 1.0
        return tensors

    monkeypatch.setattr(shards, "_pruned_shard", corrupted)
    with pytest.raises(MoePruneError, match="Verification failed"):
        api.apply(_src(tiny_checkpoint, True), half_mask, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_recovery_is_refused_up_front_when_streaming(tiny_checkpoint, half_mask, tmp_path, capsys, no_reads):
    mask_file = half_mask.save(tmp_path / "mask.json") or tmp_path / "mask.json"
    _refused(capsys, ["apply", tiny_checkpoint, mask_file, "--device", "cpu", "--stream", "--recover", "router-kd",
                      "--recover-seq-len", "32", "--out", tmp_path / "o"], "--recover needs the whole model in memory",
             "GiB")
    assert not (tmp_path / "o").exists()


def test_prune_streamed_end_to_end(tiny_checkpoint, text_corpus, tmp_path):
    calibration = {"corpora": (f"c4={text_corpus}",), "samples": 4, "seq_len": 16, "batch_size": 2}
    recon = {"samples": 4, "seq_len": 16}
    streamed = api.prune(_src(tiny_checkpoint, True), 0.5, tmp_path / "s", calibration=calibration,
                         reconstruction=recon, progress=False)
    plain = api.prune(_src(tiny_checkpoint, False), 0.5, tmp_path / "p", calibration=calibration,
                      reconstruction=recon, progress=False)
    a = json.loads((streamed / "mask.json").read_text())
    b = json.loads((plain / "mask.json").read_text())
    assert a["layers"] == b["layers"]

