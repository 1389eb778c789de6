"""Run under an llm-compressor side venv: W4A16 GPTQ oneshot on a checkpoint, save it compressed, reload, forward.

Usage: python llmc_oneshot.py MODEL_DIR TEXTS.json OUT_DIR [--samples 16] [--seq-len 128] [--group-size 64]

The first half of the windows cut from TEXTS calibrates, the second half is scored before and after
quantization. Prints one JSON line: versions, perplexities, the saved quantization config and which tensors
came out packed.
"""

import argparse
import json
import math
from pathlib import Path

import llmcompressor
import torch
import transformers
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("texts")
ap.add_argument("out")
ap.add_argument("--samples", type=int, default=16)
ap.add_argument("--seq-len", type=int, default=128)
ap.add_argument("--group-size", type=int, default=64)
args = ap.parse_args()

tok = AutoTokenizer.from_pretrained(args.model)
stream = [i for text in json.load(open(args.texts)) for i in tok(text)["input_ids"] + [tok.eos_token_id]]
n = args.seq_len
windows = [stream[k * n:(k + 1) * n] for k in range(min(2 * args.samples, len(stream) // n))]
calib, held_out = windows[: len(windows) // 2], torch.tensor(windows[len(windows) // 2:])


@torch.no_grad()
def perplexity(model) -> float:
    logits = model(input_ids=held_out).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), held_out[:, 1:].flatten())
    return math.exp(loss.item())


# oneshot linearizes the fused experts after loading (load_quantizable_moe would do it while loading, but its
# patch mapping makes transformers 5.17 import every model module, torchvision-dependent ones included).
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
before = perplexity(model)
dataset = Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * n for _ in calib]})
# The W4A16 preset (4-bit int symmetric weights, 16-bit activations) at group size 64: the preset's 128 does not
# divide the bundled model's 64-wide expert down_proj inputs, which llm-compressor then refuses.
w4a16 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group_size}
recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": w4a16}},
                      ignore=["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"])
oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(calib), max_seq_length=n)
quantized = perplexity(model)
model.save_pretrained(args.out, save_compressed=True)
tok.save_pretrained(args.out)
del model

reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
after = perplexity(reloaded)
packed = []
for path in Path(args.out).glob("*.safetensors"):
    with safe_open(str(path), "pt") as handle:
        packed += [k for k in handle.keys() if k.endswith("weight_packed")]
config = json.loads((Path(args.out) / "config.json").read_text())
print(json.dumps({
    "llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
    "ppl_before": before, "ppl_quantized": quantized, "ppl_reloaded": after, "windows": len(held_out),
    "quantization_config": config.get("quantization_config"), "packed": sorted(packed),
}))
