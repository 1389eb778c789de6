"""llama.cpp's GGUF converter converts the pruned bundled model, and llama.cpp's perplexity equals moeprune's.

Protocol: the evaluation text is the bundled ``wiki`` test split as moeprune's ``perplexity`` reads it. Both sides
cut the same token windows: llama-perplexity splits the tokenised text into consecutive non-overlapping chunks
of ``-c`` tokens (the tail dropped), as moeprune's ``split_windows`` does, and the ids are checked equal
(llama-tokenize vs the transformers tokenizer). llama.cpp scores only the second half of each chunk (token
``t`` predicted from logits at ``t - 1`` for ``t`` in ``c/2 + 1 .. c-1``; no BOS is inserted: the converter writes
``add_bos_token false``), so moeprune's side sums its per-token NLL over the same positions. Both in fp32 (the
GGUF is converted with ``--outtype f32``, from the export with its tied output layer written out: see
``untied_copy``). moeprune's own protocol (every token but each window's first) is
reported beside it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprune.bundled import bundled_model_path
from moeprune.evaluation.perplexity import load_eval_text, sequence_nll, split_windows, tokenize, window_nll
from moeprune.loading import load_model, load_tokenizer
from moeprune.surgery import export_pruned
from tests.surgery import make_mask

from .conftest import BUILD, HOME, run_side, side_python

pytestmark = pytest.mark.readers

N_CTX = 256
CHUNKS = 16
RTOL = 0.01


def llama_cpp() -> Path:
    src = HOME / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").exists():
        pytest.skip(f"no llama.cpp source at {src}: `{BUILD}` unpacks llama-cpp-python's vendored release")
    return src


def llama_tool(name: str) -> Path:
    tool = llama_cpp() / "build" / "bin" / name
    if not tool.exists():
        pytest.skip(f"{tool} is not built: `{BUILD}` builds it (about 1 h on 2 cores)")
    return tool


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(pruned export, its GGUF, what the GGUF holds) for the bundled model with 16 of 32 experts kept."""
    tf4, src = side_python("tf4"), llama_cpp()
    root = tmp_path_factory.mktemp("gguf")
    model = load_model(bundled_model_path(), dtype="float32")
    mask = make_mask(model, kept_sets=[list(range(0, 32, 2)), list(range(1, 32, 2))], num_experts=32)
    out = export_pruned(bundled_model_path(), mask, root / "pruned", progress=False)
    gguf = root / "pruned.gguf"
    report = json.loads(run_side(tf4, "convert_gguf.py", src, untied_copy(out, root / "untied"), gguf).splitlines()[-1])
    return out, gguf, report


def untied_copy(out: Path, dest: Path) -> Path:
    """The export with its tied output layer written out (``lm_head.weight`` = the embeddings) and
    ``tie_word_embeddings`` false: the same model, in the form llama.cpp's qwen2moe loader needs (it requires
    ``output.weight`` and, unlike its qwen2 loader, has no fallback to the embeddings), which the converter only
    writes for an untied checkpoint. The bundled model is tied, dense or pruned alike."""
    shutil.copytree(out, dest)
    config = json.loads((dest / "config.json").read_text())
    assert config["tie_word_embeddings"] and (dest / "model.safetensors").exists()
    state = load_file(str(dest / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(dest / "model.safetensors"), {"format": "pt"})
    (dest / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    return dest


def test_converter_writes_the_pruned_expert_count(converted) -> None:
    out, _, report = converted
    config = json.loads((out / "config.json").read_text())
    fields, tensors = report["fields"], report["tensors"]
    assert fields["qwen2moe.expert_count"] == config["num_experts"] == 16
    assert fields["qwen2moe.expert_used_count"] == config["num_experts_per_tok"]
    for i in range(config["num_hidden_layers"]):
        assert tensors[f"blk.{i}.ffn_gate_inp.weight"] == [config["hidden_size"], 16]
        assert tensors[f"blk.{i}.ffn_gate_exps.weight"][-1] == 16


def test_llama_cpp_perplexity_equals_moeprune(converted, tmp_path: Path) -> None:
    out, gguf, _ = converted
    _, text, _ = load_eval_text("wiki")
    text = text.rstrip("\n")  # llama.cpp's -f drops one trailing newline
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    tok = load_tokenizer(out)
    ids = tokenize(tok, text)
    llama_ids = subprocess.run([llama_tool("llama-tokenize"), "-m", gguf, "-f", tmp_path / "eval.txt", "--ids",
                                "--no-bos", "--no-escape", "--log-disable"], capture_output=True, text=True,
                               check=True).stdout
    assert json.loads(llama_ids.strip().splitlines()[-1]) == ids.tolist(), "llama.cpp tokenises differently"

    ran = subprocess.run([llama_tool("llama-perplexity"), "-m", gguf, "-f", tmp_path / "eval.txt", "-c", str(N_CTX),
                          "-b", str(N_CTX), "--chunks", str(CHUNKS), "--no-escape", "-t", "2", "--no-warmup"],
                         capture_output=True, text=True, check=True)
    log = ran.stdout + ran.stderr
    llama_ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))

    windows = split_windows(ids, N_CTX, CHUNKS)
    model = load_model(out, dtype="float32")
    first = N_CTX // 2
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    nll = sequence_nll(logits[:, first:-1], windows[:, first + 1:])
    ours = math.exp(float(nll) / (windows.shape[0] * (N_CTX - first - 1)))
    full = math.exp(window_nll(model, windows) / (windows.shape[0] * (N_CTX - 1)))
    print(f"llama.cpp PPL {llama_ppl:.4f}, moeprune on the same positions {ours:.4f} "
          f"({(llama_ppl / ours - 1) * 100:+.3f}%), moeprune's protocol {full:.4f} ({CHUNKS} x {N_CTX} tokens)")
    assert abs(llama_ppl / ours - 1) <= RTOL
