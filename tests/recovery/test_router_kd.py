"""Router KD: only routing tensors train, the KL goes down, the model is left as it was, one seed one result."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moeprune.errors import MoePruneError
from moeprune.recovery import RecoveryOptions, apply_delta, recover
from moeprune.recovery.router_kd import _token_kl, routing_parameters, teacher_targets
from moeprune.surgery import masked
from tests.surgery import make_mask
from tests.tiny_models import build_model

TINY = RecoveryOptions(kind="router-kd", epochs=2, batch_size=4, lr=1e-2, samples=12, seq_len=24)


def _windows(seed: int = 0, vocab: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randint(0, vocab, (8, 24), generator=g), "b": torch.randint(0, vocab, (4, 24), generator=g)}


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_only_routing_tensors_train_and_the_kl_goes_down(arch: str) -> None:
    model = build_model(arch)
    mask = make_mask(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = recover(model, mask, TINY, windows=_windows(), progress=False)
    kd = result.record["router_kd"]
    for corpus in ("a", "b"):
        assert kd["kl_after"][corpus] < kd["kl_before"][corpus]
    with masked(model, mask):
        allowed = set(routing_parameters(model))
    assert set(result.delta) == allowed
    assert all(name.endswith(("gate.weight", "gate.bias", "shared_expert_gate.weight")) for name in allowed)
    if arch == "qwen2_moe":  # the shared-expert gate trains with the router
        assert any(name.endswith("shared_expert_gate.weight") for name in allowed)
    # The dense model is exactly as it was (masters swapped out, masked() restored, no grad flags left).
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_deepseek_v3_correction_bias_is_not_trained() -> None:
    model = build_model("deepseek_v3")
    result = recover(model, make_mask(model), TINY, windows=_windows(), progress=False)
    assert not any("e_score_correction_bias" in name for name in result.delta)


def test_recovered_model_in_memory_has_the_trained_kl() -> None:
    model = build_model("qwen2_moe")
    mask, windows = make_mask(model), _windows()
    result = recover(model, mask, TINY, windows=windows, progress=False)
    targets = teacher_targets(model, windows, TINY, progress=False)
    with masked(model, mask):
        apply_delta(model, result.delta)
        with torch.no_grad():
            kl = _token_kl(model(input_ids=targets.windows[:8]).logits.float(), targets.slice(torch.arange(8)))
    assert kl.mean().item() == pytest.approx(result.record["router_kd"]["kl_after"]["a"], rel=1e-5)


def test_same_seed_same_delta_other_seed_another() -> None:
    model = build_model("qwen2_moe")
    mask = make_mask(model)
    first = recover(model, mask, TINY, windows=_windows(), progress=False).delta
    again = recover(model, mask, TINY, windows=_windows(), progress=False).delta
    other = recover(model, mask, replace(TINY, seed=5), windows=_windows(), progress=False).delta
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_top_k_teacher_bucket_kl_is_the_full_kl_when_k_is_the_vocabulary(monkeypatch) -> None:
    """With the vocabulary above the full limit the KL is over top-k + rest buckets; with k = V it is exact."""
    import moeprune.recovery.router_kd as rk

    model = build_model("qwen2_moe")
    windows = _windows()
    full = teacher_targets(model, windows, TINY, progress=False)
    monkeypatch.setattr(rk, "FULL_VOCAB_LIMIT", 16)
    top_all = teacher_targets(model, windows, replace(TINY, teacher_top_k=128), progress=False)
    top_few = teacher_targets(model, windows, replace(TINY, teacher_top_k=8), progress=False)
    assert top_all.mode == top_few.mode == "topk"
    student = torch.randn(2, 24, 128)
    index = torch.arange(2)
    exact = _token_kl(student, full.slice(index))
    assert torch.allclose(_token_kl(student, top_all.slice(index)), exact, atol=1e-5)
    bucketed = _token_kl(student, top_few.slice(index))
    assert (bucketed <= exact + 1e-5).all() and (bucketed >= -1e-6).all()  # a coarser partition: a lower bound


def test_full_teacher_targets_stay_bounded() -> None:
    """Full log-probabilities only for a small vocabulary that fits: Mixtral's 32,000 entries over the paper
    preset's 256 x 1024 tokens (33.5 GB) fall back to top-k buckets; the bundled defaults stay full."""
    from moeprune.recovery.router_kd import full_targets

    assert full_targets(128, 256, 4096)  # bundled: 0.5 GB
    assert not full_targets(256, 1024, 32_000)  # Mixtral at the paper preset
    assert not full_targets(2, 8, 151_936)  # Qwen: above the vocabulary limit whatever the size
    assert full_targets(16, 1024, 32_000) and not full_targets(17, 1024, 32_000)  # 2.10e9 vs 2.23e9 bytes, 2 GiB


def test_checkpointing_gives_the_same_training() -> None:
    model = build_model("mixtral")
    mask = make_mask(model)
    plain = recover(model, mask, TINY, windows=_windows(), progress=False).delta
    checked = recover(model, mask, replace(TINY, checkpointing=True), windows=_windows(), progress=False).delta
    assert all(torch.allclose(plain[k], checked[k], atol=1e-6) for k in plain)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"kind": "rk"}, "Unknown recovery"),
        ({"samples": 0}, "--recover-samples must be"),
        ({"epochs": -1}, "--recover-epochs must be"),
        ({"lr": 0.0}, "--recover-lr must be a positive"),
        ({"lr": float("nan")}, "--recover-lr must be a positive"),
        ({"seed": -1}, "--recover-seed must be"),
        ({"corpora": ("wiki:test",)}, "evaluation split"),
        ({"corpora": ("hf:org/data:cfg:validation",)}, "evaluation split"),
    ],
)
def test_bad_settings_are_one_line_errors(settings: dict, message: str) -> None:
    with pytest.raises(MoePruneError, match=message) as err:
        RecoveryOptions(**settings)
    assert "\n" not in str(err.value)


def test_merge_of_a_mask_keeping_every_expert_is_refused() -> None:
    model = build_model("qwen2_moe")
    everything = make_mask(model, [list(range(8))])
    with pytest.raises(MoePruneError, match="nothing to merge"):
        recover(model, everything, replace(TINY, kind="merge"), windows=_windows(), progress=False)
