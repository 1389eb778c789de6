"""The architecture sweep: every MoE causal LM of the installed transformers, pruned end to end.

For each model type :func:`run_case` builds a tiny random model from its config class (structural
switches kept: a dense layer where the family has one, routing groups, shared experts, ...), then runs
profile -> plan -> apply (export, reload) and compares the reloaded checkpoint's logits with an
independent reference: the *dense* model whose removed experts are taken out of routing (their router
logits at -inf, or their choice bias at -inf for sigmoid routers with a correction bias).

:func:`run_reconstruction_case` plans ``expert-sparsity`` instead: its routing guard passes, or refuses.

:func:`run_recovery_case` runs router-kd on the REAP mask (a few steps on random tokens) and asks merge
whether it can merge the layout.

Used by tests/test_architecture_sweep.py and scripts/support_matrix.py (which writes docs/support_matrix.md).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moeprune.arch.adapters import spec_for
from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from moeprune.loading import load_model
from moeprune.options import Calibration
from moeprune.planning import plan
from moeprune.profiling.runner import model_meta, profile_windows
from moeprune.profiling.stats import Profile
from moeprune.surgery import export_pruned

ATOL = 1e-5
TOKENS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
RECON_TOKENS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(3))  # expert-sparsity calibration
EXPERT_KEY = re.compile(r"expert")

# Tiny sizes set on every config that has the key (kept small so the whole sweep runs in minutes on 2 cores).
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    moe_intermediate_size=16,
    expert_ffn_hidden_size=16,
    shared_expert_intermediate_size=24,
    moe_shared_expert_intermediate_size=24,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    num_experts_per_token=2,
    moe_top_k=2,
    moe_topk=2,
    moe_k=2,
    top_k_experts=2,
    first_k_dense_replace=1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
# Grouped routers keep their groups: 8 experts in 2 groups, both groups searched.
GROUPS = dict(n_group=2, topk_group=2, num_expert_group=2, topk_group_count=2)

# Multi-head latent attention (DeepSeek-V2 style): every head has its own KV, small ranks.
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=8, qk_head_dim=16)
# Settings a config leaves None by default but the model needs (shared experts present, as in the checkpoints).
FILL_NONE = dict(n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1)

DROP = object()  # an override value that removes a tiny setting the config does not take as such

# Extra config settings per model type, for what the generic tiny sizes cannot express.
OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma4_text": dict(enable_moe_block=True, hidden_size_per_layer_input=16, vocab_size_per_layer_input=128,
                        global_head_dim=8, layer_types=["sliding_attention", "full_attention", "full_attention"]),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                             layer_types=["mamba", "attention", "mamba"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_dt_rank=4),
    "beam": dict(mlp_layer_types=["dense", "sparse", "sparse"]),
    "bailing_hybrid": dict(layer_group_size=2),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention", "linear_attention"], linear_head_dim=8,
                        linear_num_heads=2),
    # Layer 0 hash-routed (a frozen token -> expert table), then learned routing.
    "deepseek_v4": dict(mlp_layer_types=["hash_moe", "moe", "moe"]),
    "zaya": dict(num_experts_per_tok=1),
    "longcat_flash": dict(zero_expert_num=2, ffn_hidden_size=48, num_layers=2),
    "qwen4_exp_text": dict(layer_types=["linear_attention", "indexed_attention", "linear_attention"],
                           indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
                           indexer_compress_ratio=2),
    # NVFP4-rounded keys and values need head_dim % 16 == 0; its indexer scores with the query heads of key head 0.
    "kolibri1_1": dict(head_dim=16, index_num_heads=2, mlp_only_layers=[0]),
    "inkling2_text": dict(unpadded_vocab_size=128),
    "inkling2_loop_text": dict(unpadded_vocab_size=128),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    "dbrx": dict(num_key_value_heads=DROP, d_model=32, n_heads=4, n_layers=2, max_seq_len=128,
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"moe_num_experts": 8, "moe_top_k": 2, "ffn_hidden_size": 16}),
}


@dataclass
class CaseResult:
    model_type: str
    status: str  # "exact" | "refused" | "wrong" | "error"
    reason: str = ""
    diff: float | None = None


def moe_model_types() -> list[str]:
    """Causal-LM model types of the installed transformers whose config names an expert count.

    One model type per causal-LM class: a multimodal wrapper whose ``ForCausalLM`` class is its text
    model's (llama4 -> llama4_text) is swept as the text model type the class is built from.
    """
    found = set()
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        model_class = getattr(transformers, class_name, None)
        if model_class is None or not class_name.endswith("ForCausalLM"):
            continue
        keys = _config_keys(model_type)
        if keys is None or not any(EXPERT_KEY.search(k) for k in keys):
            continue
        own_type = getattr(model_class.config_class, "model_type", None)
        wrapper = "text_config" in keys and own_type in CONFIG_MAPPING
        found.add(own_type if wrapper else model_type)
    return sorted(found)


def tiny_config(model_type: str):
    """The model type's config with tiny sizes, 8 experts top-2, and its structural switches kept."""
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    settings = {k: v for k, v in {**TINY, **GROUPS}.items() if k in defaults}
    if "kv_lora_rank" in defaults:
        settings.update({k: v for k, v in MLA.items() if k in defaults and defaults[k] is not None})
    settings.update({k: v for k, v in FILL_NONE.items() if k in defaults and defaults[k] is None})
    settings.update(OVERRIDES.get(model_type, {}))
    settings = {k: v for k, v in settings.items() if v is not DROP}
    # Only the tiny settings are passed: the config derives its per-layer lists for the tiny depth itself.
    config = config_class(**settings)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) > 1 and set(types) == {"linear_attention"}:
        # Hybrid linear-attention models (Qwen3-Next, ...) need one full-attention layer to run.
        config = config_class(**{**settings, "layer_types": [types[0], "full_attention", *types[2:]]})
    return config


def build_model(model_type: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    _spread_weights(model)
    return model.eval()


def run_case(model_type: str, workdir: Path | None = None) -> CaseResult:
    """Profile, plan, export and reload ``model_type``'s tiny model; the status says how it went."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        try:
            diff = _prune_and_compare(model_type, workdir)
        except MoePruneError as err:
            return CaseResult(model_type, "refused", str(err))
        except Exception as err:  # noqa: BLE001 - the sweep reports every other failure as a traceback
            return _error_result(model_type, err)
    status = "exact" if diff <= ATOL else "wrong"
    return CaseResult(model_type, status, "" if status == "exact" else f"max |diff| {diff:.3g}", diff)


STREAM_RTOL = 1e-5  # streamed profile sums against in-memory ones (float32)


def run_stream_case(model_type: str, workdir: Path | None = None) -> CaseResult:
    """Profile and run the tiny model streamed from its saved checkpoint one layer at a time: *exact* when the
    counts equal the in-memory profile's, the sums agree to STREAM_RTOL and the logits to ATOL (the diff is the
    logits'); *refused* with moeprune's reason (in memory or streamed)."""
    from moeprune.profiling.sequential import profile_windows_layer_major
    from moeprune.profiling.stats import SUM_FIELDS
    from moeprune.streaming.layers import DiskLayers
    from moeprune.streaming.runner import run_layer_major

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        try:
            model = build_model(model_type)
            model.save_pretrained(workdir / model_type)
            ids = torch.randint(3, min(int(model.config.vocab_size), 100), (3, 12),
                                generator=torch.Generator().manual_seed(1))
            plain = profile_windows(model, ids, Calibration(batch_size=2, checkpoint_every=16), {}, progress=False)
            place = DiskLayers(workdir / model_type, model.config, torch.float32)
            streamed = profile_windows_layer_major(place, ids, 2, {}, progress=False)
            got: dict[int, torch.Tensor] = {}
            batches = [{"input_ids": b} for b in torch.split(ids, 2)]
            run_layer_major(place, batches, on_logits=lambda b, x: got.__setitem__(b, x.float()), progress=False)
            with torch.no_grad():
                expected = model(input_ids=ids).logits.float()
        except MoePruneError as err:
            return CaseResult(model_type, "refused", str(err))
        except Exception as err:  # noqa: BLE001 - the sweep reports every other failure as a traceback
            return _error_result(model_type, err)
    diff = (torch.cat([got[b] for b in sorted(got)]) - expected).abs().max().item()
    sums = all(torch.allclose(getattr(streamed, f), getattr(plain, f), rtol=STREAM_RTOL, atol=1e-7)
               for f in SUM_FIELDS)
    if torch.equal(streamed.count, plain.count) and sums and diff <= ATOL:
        return CaseResult(model_type, "exact", "", diff)
    return CaseResult(model_type, "wrong", f"streamed differs (counts equal: {torch.equal(streamed.count, plain.count)}"
                      f", sums within rtol: {sums}, logits max |diff| {diff:.3g})", diff)


def _error_result(model_type: str, err: Exception) -> CaseResult:
    last = traceback.extract_tb(err.__traceback__)[-1]
    return CaseResult(model_type, "error", f"{type(err).__name__}: {err} ({Path(last.filename).name}:{last.lineno})")


def run_reconstruction_case(model_type: str, workdir: Path | None = None) -> CaseResult:
    """Plan ``expert-sparsity`` (half the experts) on ``model_type``'s tiny model: "exact" when the routing
    guard passes and every MoE layer gets a mask, "refused" with the guard's (or the table's) message."""
    from moeprune.reconstruction import SearchSettings, WorkDir, expert_sparsity_mask

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        try:
            spec_for(tiny_config(model_type))
            model = build_model(model_type)
            mask = expert_sparsity_mask(model, RECON_TOKENS, 0.5, WorkDir(workdir, "sweep"),
                                        SearchSettings(loss="global"), progress=False)
        except MoePruneError as err:
            return CaseResult(model_type, "refused", str(err))
        except Exception as err:  # noqa: BLE001 - reported as a traceback, never as a result
            return _error_result(model_type, err)
        layers = [layer.index for layer in moe_layers(model)]
        if sorted(mask.layers) != layers or any(len(m.kept) != mask.kept_per_layer for m in mask.layers.values()):
            return CaseResult(model_type, "wrong", f"mask layers {sorted(mask.layers)} vs MoE layers {layers}")
        gap = reconstruction_loss_gap(model, mask, WorkDir(workdir, "sweep"))
    status = "exact" if gap <= 1e-4 else "wrong"
    return CaseResult(model_type, status, "" if status == "exact" else f"loss off by {gap:.3g} (relative)", gap)


@torch.no_grad()
def reconstruction_loss_gap(dense: nn.Module, mask, work) -> float:
    """Max over MoE layers of |loss(kept) - ||block(h) - block_masked(h)||_F| / the latter, on the captured inputs.

    The reconstruction loss comes from cached router logits and Gram matrices; the reference runs the
    model's own MoE block on the same inputs, dense and with the removed experts taken out of routing
    (shared experts add the same term to both and cancel).
    """
    from moeprune.reconstruction import LayerProblem

    gaps = []
    for layer in moe_layers(dense):
        hidden = work.load_layer(layer.index)
        kept = mask.kept(layer.index)
        predicted = LayerProblem.build(layer, dense.config, hidden).loss(kept)
        full = _block_output(layer.block, hidden)
        with routing_without_removed(dense, mask):
            without = _block_output(layer.block, hidden)
        actual = float(torch.linalg.vector_norm((full - without).double()))
        gaps.append(abs(predicted - actual) / max(actual, 1e-12))
    return max(gaps)


def _block_output(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = block(hidden[None])
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, out.shape[-1])


def run_recovery_case(model_type: str) -> tuple[CaseResult, CaseResult]:
    """(router-kd, merge) on ``model_type``'s tiny model under the REAP 50% mask.

    router-kd "exact": it trains at least one tensor, only routing tensors (router weight or bias, a
    shared-expert gate), the trained tensors change the pruned model's KL, and the dense model is left
    bit-identical; the reason says when the KL rose (a few steps on random tokens of a random tiny model
    is no promise of descent: phimoe's and zaya's did). merge: "exact"
    when ``merge_supported`` accepts the layout and a merge delta replaces only kept experts' tensors of
    the pruned model, "refused" with its reason."""
    from moeprune.recovery import RecoveryOptions, apply_delta, recover
    from moeprune.recovery.router_kd import routing_parameters
    from moeprune.surgery import masked

    try:
        spec_for(tiny_config(model_type))
        model = build_model(model_type)
        mask = plan(_profile(model), "reap", 0.5)
    except MoePruneError as err:
        refused = CaseResult(model_type, "refused", str(err))
        return refused, refused
    except Exception as err:  # noqa: BLE001 - reported as a traceback, never as a result
        failed = _error_result(model_type, err)
        return failed, failed
    windows = {"random": torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(3))}
    results = []
    for kind in ("router-kd", "merge"):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            options = RecoveryOptions(kind=kind, epochs=3 if kind == "router-kd" else None, lr=3e-3, batch_size=2,
                                      samples=4, seq_len=16)
            found = recover(model, mask, options, windows=windows, progress=False)
            with masked(model, mask):
                allowed = set(routing_parameters(model)) if kind == "router-kd" else _expert_names(model)
                apply_delta(model, found.delta)
        except MoePruneError as err:
            results.append(CaseResult(model_type, "refused", str(err)))
            continue
        except Exception as err:  # noqa: BLE001
            results.append(_error_result(model_type, err))
            continue
        after = model.state_dict()
        wrong = [k for k in before if not torch.equal(before[k], after[k])]
        outside = sorted(set(found.delta) - allowed)
        kd = found.record.get("router_kd") or {"kl_before": {}, "kl_after": {}}
        before_kl, after_kl = kd["kl_before"].get("random"), kd["kl_after"].get("random")
        unused = kind == "router-kd" and before_kl == after_kl
        if wrong or outside or (kind == "router-kd" and not found.delta) or unused:
            why = f"changed {wrong[:2]}" if wrong else f"replaced {outside[:2]}" if outside else \
                "the trained tensors do not change the output" if unused else "nothing trained"
            results.append(CaseResult(model_type, "wrong", why))
        else:
            rose = kind == "router-kd" and after_kl > before_kl
            results.append(CaseResult(model_type, "exact", f"KL rose {before_kl:.3g} -> {after_kl:.3g}" if rose
                                      else ""))
    return results[0], results[1]


def _expert_names(model: nn.Module) -> set[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(m)]}.{a}" for layer in moe_layers(model) for m in layer.experts.modules()
            for a, p in m._parameters.items() if p is not None}


@torch.no_grad()
def _prune_and_compare(model_type: str, workdir: Path) -> float:
    spec_for(tiny_config(model_type))  # a refused architecture is refused before any model is built
    return check_model(build_model(model_type), workdir)


@torch.no_grad()
def check_model(dense: nn.Module, workdir: Path) -> float:
    """Profile, plan, export and reload ``dense``; max |diff| of the reloaded logits from the reference."""
    profile = _profile(dense)
    mask = plan(profile, "reap", 0.5)
    dense.name_or_path = str(workdir)  # a local source without tokenizer files: export looks no further
    out = export_pruned(dense, mask, workdir / "pruned", progress=False)
    pruned = load_model(out, dtype="float32")
    reference = reference_logits(dense, mask)
    if torch.equal(reference, _logits(dense)):
        raise AssertionError("pruning changed nothing: the check has no teeth for this model")
    return (_logits(pruned) - reference).abs().max().item()


def _profile(model: nn.Module) -> Profile:
    windows = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    settings = Calibration(samples=4, seq_len=16, batch_size=2, checkpoint_every=16)
    stats = profile_windows(model, windows, settings, model_meta(model), progress=False)
    return Profile({"random": stats})


@torch.no_grad()
def reference_logits(dense: nn.Module, mask) -> torch.Tensor:
    """Logits of the dense model with the removed experts taken out of routing (restored afterwards)."""
    with routing_without_removed(dense, mask) as calls:
        result = _logits(dense)
    if not calls:
        raise AssertionError("the reference never masked a router's logits")
    return result


@contextlib.contextmanager
def routing_without_removed(dense: nn.Module, mask) -> Iterator[list[int]]:
    """Inside: the dense model routes as if the removed experts were gone; yields the list of masked router calls.

    Every router's logits get -inf in the removed experts' columns (whatever module computes them with
    ``F.linear`` from the router weight); a choice bias (``e_score_correction_bias``, ``expert_bias``, ...)
    gets -inf there too, since a sigmoid of -inf is 0 and a bias could still pick the expert.
    """
    removed = {}
    with contextlib.ExitStack() as stack:
        for layer in moe_layers(dense):
            gone = sorted(set(range(layer.num_experts)) - set(mask.kept(layer.index)))
            removed[layer.router.weight.data_ptr()] = gone
            stack.enter_context(_biases_at_minus_inf(layer, gone))
        calls, real_linear = [], F.linear

        def linear(x, weight, bias=None):
            out = real_linear(x, weight, bias)
            gone = removed.get(weight.data_ptr())
            if gone is not None:
                calls.append(1)
                column_mask = torch.zeros(out.shape[-1], dtype=out.dtype, device=out.device)
                column_mask[gone] = float("-inf")
                out = out + column_mask
            return out

        with mock.patch.object(F, "linear", linear):
            yield calls


@contextlib.contextmanager
def _biases_at_minus_inf(layer, removed: list[int]) -> Iterator[None]:
    biases = [t for t in _choice_biases(layer) if t.numel() in (layer.num_experts, layer.router_rows)]
    saved = [t.clone() for t in biases]
    try:
        for tensor in biases:
            tensor.view(-1)[removed] = float("-inf")
        yield
    finally:
        for tensor, original in zip(biases, saved, strict=True):
            tensor.copy_(original)


def _choice_biases(layer) -> list[torch.Tensor]:
    names = ("e_score_correction_bias", "expert_bias", "balancing_biases")
    block = layer.vector_scope or layer.block
    return [t for name, t in block.named_buffers() if name.rsplit(".", 1)[-1] in names] + [
        p.data for name, p in block.named_parameters() if name.rsplit(".", 1)[-1] in names
    ]


def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS).logits.float()


def _config_keys(model_type: str) -> list[str] | None:
    try:
        config = CONFIG_MAPPING[model_type]()
    except Exception:  # noqa: BLE001 - a config that cannot be built with defaults is not swept
        return None
    return _keys(config.to_dict())


def _keys(values: dict[str, Any]) -> list[str]:
    """Keys of a config dict and of the dicts nested in it (dbrx keeps its expert counts in ffn_config)."""
    nested = [_keys(v) for v in values.values() if isinstance(v, dict)]
    return [str(k) for k in values] + [k for keys in nested for k in keys]


@torch.no_grad()
def _spread_weights(model: nn.Module) -> None:
    """Decisive, varied routing: larger random router rows, small random expert biases."""
    for name, param in model.named_parameters():
        if "norm" in name and param.dim() == 2 and param.shape[0] == 8:  # a per-expert norm (Ergo's post_expert_norm)
            param.uniform_(0.5, 1.5)  # rows differ, so a norm row left unsliced changes the logits
        if "norm" in name or param.dim() == 0:
            continue
        param.normal_(0.0, 0.5 if param.dim() == 2 and param.shape[0] in (8, 9) and "expert" not in name else 0.1)
    for name, buffer in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "expert_bias")):
            buffer.normal_(0.0, 0.05)
        if name.endswith("tid2eid"):  # hash routing: a random token -> experts table, as in a checkpoint
            buffer.copy_(torch.randint(0, 8, buffer.shape))


__all__ = ["CaseResult", "build_model", "check_model", "moe_model_types", "run_case", "run_reconstruction_case",
           "tiny_config"]
