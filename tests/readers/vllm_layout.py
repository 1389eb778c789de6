"""What vLLM's loaders expect of a checkpoint, as data, and a static check of an export against it.

Read from vLLM 0.34.0's wheel (``pip download vllm==0.34.0 --no-deps``), files
``vllm/model_executor/models/{qwen2_moe,mixtral,deepseek_v2,registry}.py``; vLLM has no ``deepseek.py`` any more:
registry.py maps ``DeepseekForCausalLM`` to ``deepseek_v2.DeepseekForCausalLM`` (a subclass of
``DeepseekV2ForCausalLM`` with multi-head attention, ``use_mha = config.model_type == "deepseek"``).

What the loaders need from a pruned checkpoint:

- the expert count in one config field, used for every MoE layer (``FusedMoE(num_experts=...)`` and the router
  ``gate`` of ``[num_experts, hidden]``); top-k from ``num_experts_per_tok``;
- routed experts under hub per-expert names, mapped into the fused tensors by expert id
  (``make_expert_params_mapping(ckpt_gate_proj_name="gate_proj", ...)`` for ``0..num_experts-1``; Mixtral
  ``ckpt_names=("w1", "w2", "w3")``): an id at or above the config count has no slot, a missing id leaves a
  slot uninitialised;
- every other tensor under a name its module tree has (``load_weights`` indexes ``params_dict[name]``), so the
  check also lists what the export holds outside the patterns below;
- which layers are MoE: Qwen2-MoE ``num_experts > 0 and (i + 1) % decoder_sparse_step == 0`` and not in
  ``mlp_only_layers``; DeepSeek ``n_routed_experts is not None and i >= first_k_dense_replace and
  i % moe_layer_freq == 0``; Mixtral every layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

VLLM_VERSION = "0.34.0"
ATTN_MHA = r"self_attn\.(q|k|v|o)_proj\.(weight|bias)"
NORMS = r"(input_layernorm|post_attention_layernorm)\.weight"
TOP = r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"


def _qwen_moe(config: dict, i: int) -> bool:
    return (config["num_experts"] > 0 and (i + 1) % config["decoder_sparse_step"] == 0
            and i not in (config.get("mlp_only_layers") or []))


def _deepseek_moe(config: dict, i: int) -> bool:
    return (config["n_routed_experts"] is not None and i >= config["first_k_dense_replace"]
            and i % config.get("moe_layer_freq", 1) == 0)


@dataclass(frozen=True)
class VllmLayout:
    architecture: str
    source: str  # the vLLM file the expectations were read from
    experts_key: str
    width_key: str  # the routed experts' intermediate size
    block: str  # module holding router and experts
    projections: tuple[str, str, str]  # gate, up, down names in the checkpoint
    is_moe: Callable[[dict, int], bool]
    layer_keys: str  # regex of every other per-layer tensor name (after "model.layers.N.")

    def check(self, folder: Path) -> list[str]:
        """Problems vLLM's loader would hit with the checkpoint in ``folder``; empty when it fits."""
        config = json.loads((folder / "config.json").read_text())
        shapes = _shapes(folder)
        problems = []
        if config.get("architectures") != [self.architecture]:
            problems.append(f"architectures is {config.get('architectures')}, vLLM registers {self.architecture}")
        experts, hidden, width = config[self.experts_key], config["hidden_size"], config[self.width_key]
        if config["num_experts_per_tok"] > experts:
            problems.append(f"num_experts_per_tok {config['num_experts_per_tok']} > {self.experts_key} {experts}")
        if experts % (config.get("n_group") or 1):
            problems.append(f"{self.experts_key} {experts} does not split over n_group {config['n_group']}")
        seen = set()
        for i in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{i}.{self.block}"
            if not self.is_moe(config, i):
                continue
            router = f"{prefix}.gate.weight"
            seen.add(router)
            if shapes.get(router) != (experts, hidden):
                problems.append(f"{router} is {shapes.get(router)}, vLLM builds ({experts}, {hidden})")
            gate, up, down = self.projections
            for j in range(experts):
                for name, shape in ((gate, (width, hidden)), (up, (width, hidden)), (down, (hidden, width))):
                    key = f"{prefix}.experts.{j}.{name}.weight"
                    seen.add(key)
                    if shapes.get(key) != shape:
                        problems.append(f"{key} is {shapes.get(key)}, vLLM's expert slot is {shape}")
        other = re.compile(rf"({TOP})|model\.layers\.\d+\.({self.layer_keys})")
        stray = sorted(k for k in shapes if k not in seen and not other.fullmatch(k))
        problems += [f"{k}: no parameter of that name in vLLM's {self.architecture}" for k in stray]
        return problems


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


_DENSE = r"mlp\.(gate|up|down)_proj\.weight"
LAYOUTS = {
    "qwen2_moe": VllmLayout(
        "Qwen2MoeForCausalLM", "qwen2_moe.py", "num_experts", "moe_intermediate_size", "mlp",
        ("gate_proj", "up_proj", "down_proj"), _qwen_moe,
        rf"{ATTN_MHA}|{NORMS}|{_DENSE}|mlp\.shared_expert\.(gate|up|down)_proj\.weight|mlp\.shared_expert_gate\.weight",
    ),
    "mixtral": VllmLayout(
        "MixtralForCausalLM", "mixtral.py", "num_local_experts", "intermediate_size", "block_sparse_moe",
        ("w1", "w3", "w2"), lambda config, i: True, rf"{ATTN_MHA}|{NORMS}",
    ),
    "deepseek_v2": VllmLayout(
        "DeepseekV2ForCausalLM", "deepseek_v2.py", "n_routed_experts", "moe_intermediate_size", "mlp",
        ("gate_proj", "up_proj", "down_proj"), _deepseek_moe,
        rf"{NORMS}|{_DENSE}|mlp\.shared_experts\.(gate|up|down)_proj\.weight|"
        r"self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.weight|"
        r"self_attn\.(q_a_layernorm|kv_a_layernorm)\.weight",
    ),
    "deepseek": VllmLayout(  # DeepSeek-MoE 16B: deepseek_v2.py's DeepseekForCausalLM, multi-head attention
        "DeepseekForCausalLM", "deepseek_v2.py", "n_routed_experts", "moe_intermediate_size", "mlp",
        ("gate_proj", "up_proj", "down_proj"), _deepseek_moe,
        rf"{ATTN_MHA}|{NORMS}|{_DENSE}|mlp\.shared_experts\.(gate|up|down)_proj\.weight",
    ),
}

# Lines of vLLM 0.34.0's source the data above was read from: the check that the data still describes a vLLM
# source tree (tests/readers/test_vllm_static.py) looks for each.
ANCHORS = {
    "registry.py": ['"Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM")',
                    '"MixtralForCausalLM": ("mixtral", "MixtralForCausalLM")',
                    '"DeepseekForCausalLM": ("deepseek_v2", "DeepseekForCausalLM")',
                    '"DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM")'],
    "qwen2_moe.py": ["num_experts=config.num_experts", "top_k=config.num_experts_per_tok",
                     "intermediate_size=config.moe_intermediate_size",
                     "config.num_experts > 0 and (layer_idx + 1) % config.decoder_sparse_step == 0",
                     'prefix=f"{prefix}.shared_expert_gate"'],
    "mixtral.py": ["num_experts=config.num_local_experts", 'ckpt_names=("w1", "w2", "w3")',
                   "intermediate_size=config.intermediate_size", "self.block_sparse_moe = MixtralMoE("],
    "deepseek_v2.py": ["num_experts=config.n_routed_experts", 'ckpt_gate_proj_name="gate_proj"',
                       'ckpt_up_proj_name="up_proj"', 'ckpt_down_proj_name="down_proj"',
                       "layer_idx >= config.first_k_dense_replace", "layer_idx % moe_layer_freq == 0",
                       'use_mha = config.model_type == "deepseek"',
                       "intermediate_size = config.moe_intermediate_size * config.n_shared_experts",
                       "class DeepseekForCausalLM(DeepseekV2ForCausalLM):"],
}
