"""DeepSeek-MoE (model_type deepseek) loads through moeprune's port from a hub-format folder and prunes end to end.

The folder is written without moeprune (tests/deepseek_checkpoint.py): the hub's config.json fields and
auto_map, the hub's weight names, and auto_map code files that raise if executed. Logits are checked
against a plain-torch forward of the published architecture, not against the port itself.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from moeprune.arch.view import moe_layers
from moeprune.cli import main
from moeprune.inspect import describe
from moeprune.loading import load_model
from moeprune.planning.mask import ExpertMask
from moeprune.surgery import masked
from tests.deepseek_checkpoint import (
    DEEPSEEK_MOE_16B_CONFIG,
    REMOTE_FILES,
    hub_config,
    moe_block_reference,
    random_state,
    reference_logits,
    write_checkpoint,
)

PORT_MODULE = "moeprune.models.deepseek_moe"
CALIBRATION = ["--samples", "4", "--seq-len", "32", "--batch-size", "2"]
EXPERT_KEY = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts\.)(\d+)(\..*)$")


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory, tokenizer):
    """16 routed experts, top-6, 2 shared, layer 0 dense: DeepSeek-MoE-16B's routing at tiny widths."""
    config = hub_config(num_experts=16, top_k=6, vocab_size=len(tokenizer))
    state = random_state(config)
    path = write_checkpoint(tmp_path_factory.mktemp("hub") / "deepseek-moe-tiny", config, state)
    tokenizer.save_pretrained(path)
    return path, config, state


def _ids(config: dict) -> torch.Tensor:
    return torch.randint(3, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_port_equals_the_published_architecture(hub_folder, trust_remote_code: bool) -> None:
    path, config, state = hub_folder
    model = load_model(path, dtype="float32", trust_remote_code=trust_remote_code)
    assert type(model).__module__ == PORT_MODULE  # the folder's modeling_deepseek.py was never run
    assert set(model.state_dict()) == set(state)  # every hub key loaded, nothing left at random init
    assert [layer.index for layer in moe_layers(model)] == [1, 2]
    ids = _ids(config)
    diff = (_logits(model, ids) - reference_logits(state, config, ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_renormalised_top_k_equals_the_reference(tmp_path) -> None:
    config = hub_config(num_experts=8, top_k=3, norm_topk_prob=True)
    state = random_state(config, seed=1)
    model = load_model(write_checkpoint(tmp_path / "renorm", config, state), dtype="float32")
    ids = _ids(config)
    assert (_logits(model, ids) - reference_logits(state, config, ids)).abs().max().item() <= 1e-5


def test_linear_rope_scaling_equals_the_reference_and_is_saved_as_the_hub_writes_it(tmp_path) -> None:
    config = hub_config()
    config["rope_scaling"] = {"type": "linear", "factor": 4.0}
    state = random_state(config, seed=2)
    model = load_model(write_checkpoint(tmp_path / "linear", config, state), dtype="float32")
    ids = _ids(config)
    assert (_logits(model, ids) - reference_logits(state, config, ids)).abs().max().item() <= 1e-5
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["rope_scaling"] == {"type": "linear", "factor": 4.0} and saved["rope_theta"] == 10000
    assert "rope_parameters" not in saved and saved["torch_dtype"] == "float32"


def test_loads_identically_twice(hub_folder) -> None:
    path, config, _ = hub_folder
    first, second = (load_model(path, dtype="float32") for _ in range(2))
    ids = _ids(config)
    assert torch.equal(_logits(first, ids), _logits(second, ids))
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    expected = 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for model in (first, second):  # the hub code left this buffer uninitialised on transformers 5
        assert torch.allclose(model.model.rotary_emb.inv_freq, expected)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_bf16_moe_block_is_the_hub_arithmetic_bit_for_bit(tmp_path, norm_topk_prob: bool) -> None:
    """In bf16 the hub code weights and sums the routed experts' outputs in bf16, expert by expert; the port
    must do the same (an fp32 accumulator, tried, changes bits; a bf16 softmax equals the fp32 softmax
    rounded once to bf16 on the CPU, so the softmax dtype is not what this pins)."""
    config = hub_config(num_experts=16, top_k=6, norm_topk_prob=norm_topk_prob)
    state = random_state(config, seed=3)
    model = load_model(write_checkpoint(tmp_path / "bf16", config, state), dtype="bfloat16")
    block = model.model.layers[1].mlp
    x = torch.randn(2, 64, config["hidden_size"], generator=torch.Generator().manual_seed(4)).bfloat16()
    bf16_state = {name: tensor.bfloat16() for name, tensor in state.items()}
    with torch.no_grad():
        assert torch.equal(block(x), moe_block_reference(x, bf16_state, "model.layers.1.mlp", config))


def test_bf16_load_keeps_the_rope_frequencies_in_float32(hub_folder) -> None:
    """The hub code computes cos/sin from float32 angles and rounds them once to the model dtype. A bf16
    ``inv_freq`` (e.g. after ``model.to(torch.bfloat16)``) would round the angles instead: wrong by ~0.03 at
    position 200 already."""
    path, config, _ = hub_folder
    model = load_model(path, dtype="bfloat16")
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(config["max_position_embeddings"]).float(), inv_freq)
    cos, sin = rotary(torch.zeros(1, dtype=torch.bfloat16), torch.arange(config["max_position_embeddings"])[None])
    assert torch.equal(cos[0], torch.cat((angles, angles), -1).cos().bfloat16())
    assert torch.equal(sin[0], torch.cat((angles, angles), -1).sin().bfloat16())


def test_inspect_with_trust_remote_code(hub_folder) -> None:
    text = describe(str(hub_folder[0]), trust_remote_code=True)
    assert "deepseek" in text and "16 routed per layer, top-6" in text


def _renumbered(state: dict[str, torch.Tensor], mask: ExpertMask) -> dict[str, torch.Tensor]:
    """The hub keys after pruning: kept experts renumbered 0..K-1 in original-id order, other keys as they were."""
    out = {}
    for name, tensor in state.items():
        match = EXPERT_KEY.match(name)
        if match is None:
            out[name] = tensor[mask.kept(int(name.split(".")[2]))] if name.endswith("mlp.gate.weight") else tensor
            continue
        kept = mask.kept(int(match.group(2)))
        if int(match.group(3)) in kept:
            out[f"{match.group(1)}{kept.index(int(match.group(3)))}{match.group(4)}"] = tensor
    return out


def test_profile_plan_apply_keeps_the_hub_format(hub_folder, tmp_path) -> None:
    path, config, state = hub_folder
    prof, masks, out = tmp_path / "profile", tmp_path / "masks", tmp_path / "pruned"
    assert main(["profile", str(path), "--corpus", "wiki", *CALIBRATION, "--out", str(prof)]) == 0
    assert main(["plan", str(prof), "--method", "reap", "--retain", "0.5", "--out", str(masks)]) == 0
    mask_file = masks / "reap-0.50.json"
    assert main(["apply", str(path), str(mask_file), "--out", str(out), "--trust-remote-code"]) == 0
    mask = ExpertMask.load(mask_file)
    assert mask.kept_per_layer == 8 and sorted(mask.layers) == [1, 2]

    # Logits: the reloaded checkpoint == the published architecture routing over the kept experts only
    # == the dense model with the removed experts masked in memory.
    pruned = load_model(out, dtype="float32")
    dense = load_model(path, dtype="float32")
    ids = _ids(config)
    kept = {layer: mask.kept(layer) for layer in mask.layers}
    got = _logits(pruned, ids)
    assert (got - reference_logits(state, config, ids, kept)).abs().max().item() <= 1e-5
    with masked(dense, mask):
        assert (got - _logits(dense, ids)).abs().max().item() <= 1e-5

    # The config is the hub's, field for field, with only the expert count changed.
    written = json.loads((out / "config.json").read_text())
    for key, value in config.items():
        if key not in ("n_routed_experts", "transformers_version"):
            assert written.get(key, "<missing>") == value, key
    assert written["n_routed_experts"] == 8
    # The hub's key layout, kept experts renumbered; the auto_map code files come along.
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        saved = {name: handle.get_tensor(name) for name in handle.keys()}
    expected = _renumbered(state, mask)
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[name], expected[name]) for name in expected)
    assert all((out / name).read_text() == (path / name).read_text() for name in REMOTE_FILES)


def test_the_published_16b_config_builds_the_published_model(tmp_path) -> None:
    """The real config.json, full size, on the meta device: 16.4B parameters, 2.8B of them active per token."""
    path = tmp_path / "deepseek-moe-16b-base"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(DEEPSEEK_MOE_16B_CONFIG))
    text = describe(str(path), trust_remote_code=True)
    assert "MoE layers   27 of 28" in text and "64 routed per layer, top-6, shared: shared_experts" in text
    total = float(re.search(r"parameters\s+([\d.]+)M total", text).group(1)) * 1e6
    routed = float(re.search(r"([\d.]+)M in routed experts", text).group(1)) * 1e6
    assert abs(total / 1e9 - 16.38) < 0.01
    assert abs((total - routed * 58 / 64) / 1e9 - 2.8) < 0.1  # 6 of 64 routed experts run per token
