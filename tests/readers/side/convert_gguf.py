"""Run llama.cpp's convert_hf_to_gguf.py (from a llama.cpp source release) under the tf4 side venv.

Usage: python convert_gguf.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a test string and stops on a
hash it does not list (a new tokenizer such as the bundled model's). Only then, and only for a tokenizer whose
pre-tokenizer is exactly GPT-2's (tokenizers' ByteLevel with its regex, no prefix space), this names it
"gpt-2", the llama.cpp pre-tokenizer with the same regex; the caller checks that llama.cpp's ids equal
transformers' on the evaluation text. Anything else still stops as the converter does.
"""

import json
import os
import runpy
import sys
from pathlib import Path

llama_cpp, model, out = map(Path, sys.argv[1:4])
# The converter's own gguf-py (its default): PyPI's gguf 0.19.0 carries the same version number but lacks
# constants this converter uses (AttributeError: DFLASH).
os.environ.pop("NO_LOCAL_GGUF", None)
sys.path.insert(0, str(llama_cpp))
from conversion import base  # noqa: E402  (the converter's own package)

recognised = base.TextModel.get_vocab_base_pre


def _is_gpt2_byte_level(folder: Path) -> bool:
    pre = json.loads((folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")


def get_vocab_base_pre(self, tokenizer) -> str:
    try:
        return recognised(self, tokenizer)
    except NotImplementedError:
        if not _is_gpt2_byte_level(model):
            raise
        print("convert_gguf: unlisted tokenizer hash; its pre-tokenizer is GPT-2's ByteLevel: using 'gpt-2'")
        return "gpt-2"


base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", str(model), "--outfile", str(out), "--outtype", "f32"]
runpy.run_path(str(llama_cpp / "convert_hf_to_gguf.py"), run_name="__main__")

# What a GGUF reader sees: the MoE metadata and the routed-expert tensors' shapes, as one JSON line.
import gguf  # noqa: E402  (the converter put its gguf-py on sys.path)

reader = gguf.GGUFReader(str(out))
fields = {}
for name, field in reader.fields.items():
    if name.endswith(("expert_count", "expert_used_count", "block_count")) or name == "tokenizer.ggml.pre":
        value = field.parts[field.data[0]]
        fields[name] = bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else int(value[0])
shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors if "_exps" in t.name or "gate_inp" in t.name}
print(json.dumps({"fields": fields, "tensors": shapes}))
