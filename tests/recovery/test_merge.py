"""Expert merging (moeprune.recovery.merge): the rule computed by hand, exactness, the delta's names, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from moeprune.recovery.merge import merge_delta, merge_supported
from moeprune.surgery.slicing import masked
from tests.surgery import KEPT_SETS, logits, make_mask, max_diff
from tests.tiny_models import build_model

WINDOWS = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(7))


def apply_delta(model: nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """Replace the named Parameters (never in place), as the recovery stage does on the masked model."""
    for name, tensor in delta.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        assert attr in module._parameters, name
        module._parameters[attr] = nn.Parameter(tensor.to(module._parameters[attr].device), requires_grad=False)


def merged_logits(model: nn.Module, mask, delta) -> torch.Tensor:
    with masked(model, mask):
        apply_delta(model, delta)
        return logits(model)


def masked_logits(model: nn.Module, mask) -> torch.Tensor:
    with masked(model, mask):
        return logits(model)


@torch.no_grad()
def copy_expert(layer, source: int, target: int) -> None:
    """Make expert ``target`` an exact copy of expert ``source``."""
    if layer.spec.layout == "modulelist":
        layer.experts[target].load_state_dict(layer.experts[source].state_dict())
        return
    for param in layer.experts.parameters():
        if param.dim() > 0 and param.shape[0] == layer.num_experts:
            param[target] = param[source]


# --- (a) a dropped expert identical to a kept one changes nothing ---------------------------------


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek"])
def test_dropped_copies_of_kept_experts_change_nothing(arch):
    model = build_model(arch)
    mask = make_mask(model, [[0, 1, 2, 3]])
    for layer in moe_layers(model):
        for kept in range(4):
            copy_expert(layer, kept, kept + 4)  # each dropped expert is a copy of one kept expert
    delta, record = merge_delta(model, mask, WINDOWS, progress=False)
    assert delta  # every kept expert received its copy: the delta is not empty
    for entry in record["layers"].values():
        assert {d: a["into"] for d, a in entry["assigned"].items()} == {"4": 0, "5": 1, "6": 2, "7": 3}
        assert sum(a["mass"] > 0 for a in entry["assigned"].values()) >= 3  # the copies do carry weight
        assert all(a["similarity"] == pytest.approx(1.0, abs=1e-6) for a in entry["assigned"].values())
    assert torch.equal(merged_logits(model, mask, delta), masked_logits(model, mask))


def test_merging_different_experts_changes_the_model():
    """The control for the test above: a delta that merges distinct experts does change the logits."""
    model = build_model("qwen2_moe")
    mask = make_mask(model)
    delta, _ = merge_delta(model, mask, WINDOWS, progress=False)
    assert max_diff(merged_logits(model, mask, delta), masked_logits(model, mask)) > 1e-3


# --- (b) the merged weights are the hand-computed mass-weighted averages ---------------------------


@torch.no_grad()
def hand_merge(model, mask, windows, max_tokens):
    """The rule computed independently: a pre-hook on the experts module sees what the router sends it."""
    seen = {layer.index: {"mass": torch.zeros(layer.num_experts, dtype=torch.float64), "hidden": []}
            for layer in moe_layers(model)}

    def hook_for(index):
        def hook(module, args):
            hidden, top_k_index, top_k_weights = args
            for t in range(top_k_index.shape[0]):
                for slot in range(top_k_index.shape[1]):
                    seen[index]["mass"][int(top_k_index[t, slot])] += float(top_k_weights[t, slot])
            seen[index]["hidden"].append(hidden.reshape(-1, hidden.shape[-1]))
        return hook

    hooks = [layer.experts.register_forward_pre_hook(hook_for(layer.index)) for layer in moe_layers(model)]
    try:
        model(input_ids=windows)
    finally:
        for hook in hooks:
            hook.remove()
    expected = {}
    for layer in moe_layers(model):
        hidden = torch.cat(seen[layer.index]["hidden"])[:max_tokens]
        gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj

        def output(e, hidden=hidden, gate_up=gate_up, down=down):
            gate, up = (hidden @ gate_up[e].T).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ down[e].T

        kept = mask.kept(layer.index)
        dropped = [e for e in range(layer.num_experts) if e not in kept]
        mass = seen[layer.index]["mass"]
        groups = {j: [j] for j in kept}
        for d in dropped:
            sims = [F.cosine_similarity(output(d), output(j), dim=-1).mean().item() for j in kept]
            groups[kept[max(range(len(kept)), key=lambda i: (sims[i], -i))]].append(d)
        rows = {}
        for name, tensor in (("gate_up_proj", gate_up), ("down_proj", down)):
            rows[name] = torch.stack([
                sum(mass[e] * tensor[e].double() for e in groups[j]) / mass[groups[j]].sum() for j in kept])
        expected[layer.index] = (rows, mass, groups)
    return expected


def test_merged_weights_are_the_mass_weighted_average():
    model = build_model("qwen2_moe")
    mask = make_mask(model)
    delta, record = merge_delta(model, mask, WINDOWS, progress=False, max_tokens=40)
    expected = hand_merge(model, mask, WINDOWS, max_tokens=40)
    names = {layer.index: f"model.layers.{layer.index}.mlp.experts" for layer in moe_layers(model)}
    assert sum(len(g) > 2 for _, _, groups in expected.values() for g in groups.values()) > 0  # some 3-way merges
    for index, (rows, mass, groups) in expected.items():
        entry = record["layers"][str(index)]
        assert entry["tokens_sampled"] == 40
        torch.testing.assert_close(torch.tensor(entry["mass"], dtype=torch.float64), mass, rtol=1e-6, atol=1e-9)
        assert {int(d): a["into"] for d, a in entry["assigned"].items()} == {
            d: j for j, group in groups.items() for d in group[1:]}
        for name, want in rows.items():
            torch.testing.assert_close(delta[f"{names[index]}.{name}"].double(), want, rtol=1e-6, atol=1e-6)


def test_zero_mass_group_keeps_the_kept_expert_unchanged():
    """A group whose experts were never routed to (mass 0) keeps its kept expert's weights exactly."""
    model = build_model("mixtral")
    mask = make_mask(model, [[0, 1, 2, 3]])
    never = [0, 4, 5, 6, 7]

    def route_around(module, args, output):  # Mixtral's router, with experts `never` masked out
        router_logits = output[0].clone()
        router_logits[:, never] = float("-inf")
        weights, index = router_logits.float().softmax(dim=-1).topk(2, dim=-1)
        return router_logits, weights / weights.sum(dim=-1, keepdim=True), index

    hooks = [layer.router.register_forward_hook(route_around) for layer in moe_layers(model)]
    try:
        for layer in moe_layers(model):
            copy_expert(layer, 1, 4)  # 4 is most like 1 ...
            with torch.no_grad():
                layer.experts.gate_up_proj[4] += 0.01  # ... but not a copy, and it goes to 1, with mass 0
        delta, record = merge_delta(model, mask, WINDOWS, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in moe_layers(model):
        entry = record["layers"][str(layer.index)]
        assert all(entry["mass"][e] == 0.0 for e in never) and entry["mass"][1] > 0
        assert entry["assigned"]["4"]["into"] == 1
        name = f"model.layers.{layer.index}.mlp.experts.gate_up_proj"
        receivers = {a["into"] for a in entry["assigned"].values()}
        for new_id, j in enumerate(mask.kept(layer.index)):
            if j == 0 or j not in receivers:  # mass 0 in the group, or nothing received: unchanged
                assert torch.equal(delta[name][new_id], layer.experts.gate_up_proj[j]), (layer.index, j)
            if j == 0 and j in receivers:
                assert 0 in entry["unchanged"]
        # 1's group has mass only on 1 itself: the massless copy adds nothing
        assert torch.equal(delta[name][1], layer.experts.gate_up_proj[1])


# --- (c) the delta names kept experts' weights of the pruned model, same shapes and dtypes ----------


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek"])
def test_delta_names_only_kept_expert_weights_of_the_pruned_model(arch):
    model = build_model(arch).to(torch.bfloat16)
    mask = make_mask(model)
    delta, record = merge_delta(model, mask, WINDOWS, progress=False)
    with masked(model, mask):
        pruned = model.state_dict()
        router_names = {n for n, _ in model.named_parameters() if ".gate." in n or "shared" in n}
        for name, tensor in delta.items():
            assert name in pruned and ".experts." in name and name not in router_names
            assert tensor.shape == pruned[name].shape and tensor.dtype == pruned[name].dtype == torch.bfloat16
            assert tensor.device.type == "cpu"
        for layer in moe_layers(model):  # kept experts that received nothing keep their exact weights
            kept = mask.kept(layer.index)
            receivers = {a["into"] for a in record["layers"][str(layer.index)]["assigned"].values()}
            for new_id, j in enumerate(kept):
                if j in receivers:
                    continue
                prefix = f"model.layers.{layer.index}.mlp.experts"
                for name in (n for n in delta if n.startswith(prefix)):
                    if arch == "deepseek":
                        assert not name.startswith(f"{prefix}.{new_id}.")
                    else:
                        assert torch.equal(delta[name][new_id], pruned[name][new_id])
    if arch == "deepseek":  # renumbered ids: experts.<0..K-1>
        assert {int(n.split(".experts.")[1].split(".")[0]) for n in delta} <= set(range(len(KEPT_SETS[0])))


# --- (d) refusals: one line, before any work ---------------------------------------------------------


def test_flat_dbrx_experts_are_refused_in_one_line():
    from tests.arch_sweep import build_model as build_swept_model

    model = build_swept_model("dbrx")
    reason = merge_supported(model)
    assert reason is not None and "\n" not in reason and "flat" in reason and "dbrx" in reason
    with pytest.raises(MoePruneError, match="flat"):
        merge_delta(model, make_mask(model), WINDOWS, progress=False)


def test_experts_tensors_with_rows_past_the_routed_experts_are_refused():
    model = build_model("qwen2_moe")
    layer = moe_layers(model)[0]
    padded = torch.cat([layer.experts.gate_up_proj.detach(), torch.zeros(2, *layer.experts.gate_up_proj.shape[1:])])
    layer.experts.gate_up_proj = nn.Parameter(padded)  # 10 rows for 8 routed experts (down_proj keeps 8)
    reason = merge_supported(model)
    assert reason is not None and "10 rows for 8 routed experts" in reason and "\n" not in reason


@pytest.mark.parametrize("windows, options, message", [
    (torch.zeros(0, 8, dtype=torch.long), {}, "non-empty"),
    (torch.zeros(2, 8), {}, "token ids"),
    (WINDOWS, {"max_tokens": 0}, "max_tokens"),
    (WINDOWS, {"batch_size": 0}, "batch_size"),
])
def test_bad_settings_are_one_line_errors(windows, options, message):
    model = build_model("qwen2_moe")
    with pytest.raises(MoePruneError, match=message):
        merge_delta(model, make_mask(model), windows, progress=False, **options)


def test_a_mask_of_another_model_is_refused():
    model = build_model("qwen2_moe")
    other = make_mask(model, layers=[0, 1, 2])  # layer 1 is dense in this model
    with pytest.raises(MoePruneError):
        merge_delta(model, other, WINDOWS, progress=False)


# --- (e) architectures and the bundled model ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v3", "deepseek"])
def test_merges_tiny_models(arch):
    model = build_model(arch)
    mask = make_mask(model)
    before = logits(model)
    assert merge_supported(model) is None
    delta, record = merge_delta(model, mask, WINDOWS, progress=False)
    assert torch.equal(logits(model), before)  # the dense model is left exactly as it was
    assert set(record["layers"]) == {str(layer.index) for layer in moe_layers(model)}
    merged = merged_logits(model, mask, delta)
    assert torch.isfinite(merged).all() and max_diff(merged, masked_logits(model, mask)) > 1e-4
    assert torch.equal(logits(model), before)  # and masked() put it back


def test_merges_llama4_scaled_inputs_experts():
    from tests.arch_sweep import build_model as build_swept_model

    model = build_swept_model("llama4_text")
    mask = make_mask(model)
    assert merge_supported(model) is None
    delta, _ = merge_delta(model, mask, WINDOWS % 64, progress=False)
    with masked(model, mask):
        plain = model(input_ids=WINDOWS[:2] % 64).logits
        apply_delta(model, delta)
        merged = model(input_ids=WINDOWS[:2] % 64).logits
    assert torch.isfinite(merged).all() and max_diff(merged, plain) > 1e-5


def test_merges_the_bundled_model():
    from transformers import AutoModelForCausalLM

    from moeprune.bundled import bundled_model_path

    model = AutoModelForCausalLM.from_pretrained(bundled_model_path(), dtype=torch.float32).eval()
    mask = make_mask(model, [list(range(0, 32, 2))], num_experts=32)
    windows = torch.randint(3, 4096, (4, 64), generator=torch.Generator().manual_seed(3))
    delta, record = merge_delta(model, mask, windows, progress=False, max_tokens=128)
    assert len(delta) == 2 * 4  # gate_up_proj and down_proj of each of the 4 MoE layers
    assert all(len(entry["assigned"]) == 16 for entry in record["layers"].values())
    with masked(model, mask):
        plain = model(input_ids=windows).logits
        apply_delta(model, delta)
        merged = model(input_ids=windows).logits
    assert torch.isfinite(merged).all() and max_diff(merged, plain) > 1e-4


# --- (f) deterministic ------------------------------------------------------------------------------


def test_same_inputs_give_the_same_delta():
    model = build_model("deepseek_v3")
    mask = make_mask(model)
    first, record = merge_delta(model, mask, WINDOWS, progress=False)
    second, again = merge_delta(model, mask, WINDOWS, progress=False)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    record.pop("seconds"), again.pop("seconds")
    assert record == again
    import json

    json.dumps(record)  # JSON-able
