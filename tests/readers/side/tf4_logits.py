"""Run under a transformers 4.x side venv: load a checkpoint as a 4.x user would and write its logits.

Usage: python tf4_logits.py MODEL_DIR IDS.safetensors OUT.safetensors [--trust-remote-code] [--texts TEXTS.json]

Writes ``logits`` (fp32) for ``ids``, and with --texts the tokenizer's ids of each text (``text_ids_N``), so the
caller compares both with transformers 5. Prints the reader's versions and the rope base the config gave it.
"""

import argparse
import json

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("ids")
ap.add_argument("out")
ap.add_argument("--trust-remote-code", action="store_true")
ap.add_argument("--texts")
args = ap.parse_args()

config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32,
                                             trust_remote_code=args.trust_remote_code).eval()
ids = load_file(args.ids)["ids"]
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits.float()
out = {"logits": logits.contiguous()}
if args.texts:
    tok = AutoTokenizer.from_pretrained(args.model)
    for i, text in enumerate(json.load(open(args.texts))):
        out[f"text_ids_{i}"] = torch.tensor(tok(text)["input_ids"] or [-1], dtype=torch.long)
save_file(out, args.out)
print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                  "rope_theta": getattr(config, "rope_theta", None), "class": type(model).__name__}))
