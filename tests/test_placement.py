"""Where and in which dtype models load, with CUDA faked on this CPU machine.

torch.cuda is patched (is_available, current_device, device_count, mem_get_info) and from_pretrained is
replaced by a recorder, so the tests check what load_model and profile would ask transformers for on a GPU
machine without needing one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeprune import api, loading
from moeprune.bundled import bundled_model_path
from moeprune.errors import MoePruneError
from moeprune.loading import load_model, weight_bytes
from tests.tiny_models import build_model, save_model


class _Loaded(Exception):
    """Raised by the fake from_pretrained: the call's arguments are all the test needs."""


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    recorded: list[dict] = []

    def fake_from_pretrained(path, **kwargs):
        recorded.append(kwargs)
        raise _Loaded

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    return recorded


def _fake_gpus(monkeypatch, free: list[int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (free[int(index)], 2 * free[int(index)]))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    return save_model(build_model("qwen3_moe").to(torch.bfloat16), tmp_path_factory.mktemp("bf16") / "model")


def _load(path: Path, calls: list[dict], **kwargs) -> dict:
    with pytest.raises(_Loaded):
        load_model(path, **kwargs)
    return calls[-1]


def _bytes(path: Path, dtype="auto") -> int:
    return weight_bytes(loading.load_config(path), loading.parse_dtype(dtype))


def test_with_cuda_the_model_loads_on_the_gpu_in_its_own_dtype(bf16_checkpoint, calls, monkeypatch) -> None:
    _fake_gpus(monkeypatch, [10 * _bytes(bf16_checkpoint)])
    call = _load(bf16_checkpoint, calls)
    assert call["device_map"] == {"": 0} and call["dtype"] == "auto"  # "auto": transformers keeps bf16


def test_a_model_too_big_for_one_gpu_is_spread_over_all(bf16_checkpoint, calls, monkeypatch) -> None:
    _fake_gpus(monkeypatch, [_bytes(bf16_checkpoint) // 2] * 4)
    assert _load(bf16_checkpoint, calls)["device_map"] == "auto"


def test_the_fit_check_counts_the_requested_dtype(bf16_checkpoint, calls, monkeypatch) -> None:
    # Room for the bf16 weights but not for fp32 ones.
    _fake_gpus(monkeypatch, [int(1.5 * _bytes(bf16_checkpoint) / loading.FIT_FRACTION)])
    assert _load(bf16_checkpoint, calls, dtype="bfloat16")["device_map"] == {"": 0}
    assert _load(bf16_checkpoint, calls, dtype="float32")["device_map"] == "auto"


def test_device_cpu_forces_the_cpu_and_auto_means_fp32_there(bf16_checkpoint, calls, monkeypatch) -> None:
    _fake_gpus(monkeypatch, [10 * _bytes(bf16_checkpoint)])
    call = _load(bf16_checkpoint, calls, device="cpu")
    assert "device_map" not in call and call["dtype"] == torch.float32


def test_an_explicit_device_gets_every_weight(bf16_checkpoint, calls, monkeypatch) -> None:
    _fake_gpus(monkeypatch, [1, 1])  # no fit check for an explicit device
    assert _load(bf16_checkpoint, calls, device="cuda:1")["device_map"] == {"": "cuda:1"}
    assert _load(bf16_checkpoint, calls, device="cuda")["device_map"] == {"": "cuda:0"}
    assert _load(bf16_checkpoint, calls, device="auto")["device_map"] == "auto"


def test_without_cuda_the_model_loads_on_the_cpu(bf16_checkpoint, calls, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    call = _load(bf16_checkpoint, calls)
    assert "device_map" not in call and call["dtype"] == torch.float32


def test_asking_for_cuda_without_it_names_the_fix(bf16_checkpoint, calls, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MoePruneError, match=r"--device cuda:1 .*no CUDA device.*--device cpu"):
        load_model(bf16_checkpoint, device="cuda:1")


def _with_tokenizer(path: Path, **settings) -> loading.ModelSource:
    """The checkpoint (saved without tokenizer files) with the testbed's tokenizer: the API's preflight checks it."""
    return loading.ModelSource.of(path, tokenizer=str(bundled_model_path()), **settings)


def test_profile_loads_a_fitting_model_on_the_gpu(bf16_checkpoint, calls, monkeypatch) -> None:
    _fake_gpus(monkeypatch, [10 * _bytes(bf16_checkpoint)])
    with pytest.raises(_Loaded):
        api.profile(_with_tokenizer(bf16_checkpoint), ["wiki"], "unused", calibration={"seq_len": 32},
                    progress=False)
    assert calls[-1]["device_map"] == {"": 0} and calls[-1]["dtype"] == "auto"


def test_profile_parks_a_too_big_model_on_the_cpu_in_its_own_dtype(bf16_checkpoint, calls, monkeypatch) -> None:
    _fake_gpus(monkeypatch, [_bytes(bf16_checkpoint) // 4] * 2)  # not even all GPUs together hold it
    with pytest.raises(_Loaded):
        api.profile(_with_tokenizer(bf16_checkpoint), ["wiki"], "unused", calibration={"seq_len": 32},
                    progress=False)
    # Layer-sequential: weights on the CPU, in bf16 (they run on the GPU), not upcast to fp32.
    assert "device_map" not in calls[-1] and calls[-1]["dtype"] == torch.bfloat16


def test_the_fit_check_honours_trust_remote_code(tmp_path, calls, monkeypatch) -> None:
    remote = save_model(build_model("deepseek"), tmp_path / "remote")
    _fake_gpus(monkeypatch, [10 * weight_bytes(loading.load_config(remote, True), "auto", True)])
    with pytest.raises(_Loaded):
        api.profile(_with_tokenizer(remote, trust_remote_code=True), ["wiki"], "unused",
                    calibration={"seq_len": 32}, progress=False)
    assert calls[-1]["device_map"] == {"": 0} and calls[-1]["trust_remote_code"] is True
