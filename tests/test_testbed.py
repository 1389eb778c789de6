"""The bundled testbed: corpora are sane and disjoint, the model is a real trained MoE LM.

Runs offline on CPU in well under a minute: the perplexity and routing checks use a
slice of each test split (``N_WINDOWS`` windows of 256 tokens).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeprune.bundled import (
    BUNDLED_CORPORA,
    BUNDLED_DOMAINS,
    HELDOUT_DOMAINS,
    SPLITS,
    UNSEEN_DOMAINS,
    bundled_corpus_path,
    bundled_model_path,
    bundled_testbed_json,
    read_bundled_corpus,
)

SEQ_LEN = 256
N_WINDOWS = 12
PPL_BOUND = 0.4  # model ppl / unigram ppl on the domains the model was trained on
UNSEEN_PPL_BOUND = 0.35  # ... and on the domain it never saw
MAX_SAFETENSORS_BYTES = 20_000_000


@cache
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_model_path())


@cache
def model():
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(bundled_model_path(), dtype=torch.float32).eval()


@cache
def token_stream(name: str, split: str) -> torch.Tensor:
    tok = tokenizer()
    encoded = tok(read_bundled_corpus(name, split))["input_ids"]
    return torch.tensor([t for ids in encoded for t in [*ids, tok.eos_token_id]], dtype=torch.long)


def _doc_hashes(docs: list[str]) -> tuple[set[str], set[str]]:
    """Exact hashes and hashes of a normalised form (case/whitespace-insensitive)."""
    exact = {hashlib.sha256(d.encode()).hexdigest() for d in docs}
    norm = {hashlib.sha256(re.sub(r"\s+", " ", d).strip().lower().encode()).hexdigest() for d in docs}
    return exact, norm


# --------------------------------------------------------------------------- corpora
@pytest.mark.parametrize("name", BUNDLED_DOMAINS)
def test_corpus_files_and_sizes(name: str) -> None:
    for split in SPLITS:
        assert bundled_corpus_path(name, split).is_file()
        docs = read_bundled_corpus(name, split)
        assert len(docs) >= 5, f"{name}/{split} has only {len(docs)} documents"
        # leading spaces are allowed: a Python-docs chunk may open with an indented example
        assert all(d.strip() and d == d.rstrip() and not d.startswith("\n") for d in docs)
        assert not any("\n\n\n" in d for d in docs)
    train_bytes = sum(len(d.encode()) for d in read_bundled_corpus(name, "train"))
    # the never-trained domain's train split only feeds the unigram baseline
    minimum = 200_000 if name in UNSEEN_DOMAINS else 1_500_000
    assert train_bytes >= minimum, f"{name}/train is only {train_bytes} bytes"
    test_bytes = sum(len(d.encode()) for d in read_bundled_corpus(name, "test"))
    assert test_bytes >= 100_000, f"{name}/test is only {test_bytes} bytes"


def test_domain_roles_are_disjoint() -> None:
    assert set(BUNDLED_CORPORA) | set(HELDOUT_DOMAINS) | set(UNSEEN_DOMAINS) == set(BUNDLED_DOMAINS)
    assert len(BUNDLED_DOMAINS) == len(BUNDLED_CORPORA) + len(HELDOUT_DOMAINS) + len(UNSEEN_DOMAINS)


@pytest.mark.parametrize("name", BUNDLED_DOMAINS)
def test_corpus_splits_disjoint_by_document(name: str) -> None:
    seen_exact: dict[str, str] = {}
    seen_norm: dict[str, str] = {}
    for split in SPLITS:
        docs = read_bundled_corpus(name, split)
        assert len(set(docs)) == len(docs), f"duplicate documents inside {name}/{split}"
        exact, norm = _doc_hashes(docs)
        for h in exact:
            assert h not in seen_exact, f"a document of {name}/{split} is also in {seen_exact.get(h)}"
            seen_exact[h] = split
        for h in norm:
            assert h not in seen_norm, f"a {name}/{split} document nearly equals one in {seen_norm.get(h)}"
            seen_norm[h] = split


def test_corpora_read_as_english_prose() -> None:
    for name in BUNDLED_DOMAINS:
        text = " ".join(read_bundled_corpus(name, "test"))
        words = re.findall(r"[A-Za-z]+", text.lower())
        common = sum(w in {"the", "of", "and", "to", "a", "in", "is"} for w in words)
        assert common / len(words) > 0.1, f"{name} does not look like English prose"
        # leftover wiki/rst/html markup would show up as these
        assert text.count("{{") + text.count("[[") + text.count("</") < 20


def test_bundled_unknown_names_rejected() -> None:
    with pytest.raises(ValueError):
        bundled_corpus_path("nope", "train")
    with pytest.raises(ValueError):
        bundled_corpus_path("wiki", "dev")


# ----------------------------------------------------------------------------- model
def test_model_config_is_qwen2_moe_with_shared_expert() -> None:
    cfg = model().config
    assert cfg.model_type == "qwen2_moe"
    assert cfg.num_experts >= 16
    assert cfg.num_experts_per_tok == 4
    assert cfg.norm_topk_prob is False
    assert cfg.shared_expert_intermediate_size > 0
    layer = model().model.layers[0].mlp
    assert hasattr(layer, "shared_expert") and hasattr(layer, "shared_expert_gate")
    assert layer.gate.weight.shape[0] == cfg.num_experts


def test_model_file_small_and_half_precision() -> None:
    path = bundled_model_path() / "model.safetensors"
    assert path.stat().st_size <= MAX_SAFETENSORS_BYTES
    config = json.loads((bundled_model_path() / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) in {"float16", "bfloat16"}


def test_tokenizer_roundtrip_and_eos() -> None:
    tok = tokenizer()
    text = "The quick brown fox, in 1999, asked: how does pip install work?\n\nIt works."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token is not None and tok.eos_token_id < len(tok)
    assert len(tok) == model().config.vocab_size


@cache
def _slice_eval(name: str) -> tuple[float, float, torch.Tensor]:
    """(model ppl, add-one unigram ppl, routing counts [layers, N]) on a test slice."""
    stream = token_stream(name, "test")
    n = min(N_WINDOWS, (len(stream) - 1) // SEQ_LEN)
    inputs = stream[: n * SEQ_LEN].view(n, SEQ_LEN)
    labels = stream[1 : n * SEQ_LEN + 1].view(n, SEQ_LEN)
    cfg = model().config
    with torch.no_grad():
        out = model()(inputs, output_router_logits=True)
    nll = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten())
    top_k, n_experts = cfg.num_experts_per_tok, cfg.num_experts
    top = [r.topk(top_k, dim=-1).indices.flatten() for r in out.router_logits]
    counts = torch.stack([torch.bincount(t, minlength=n_experts) for t in top])
    uni = torch.bincount(token_stream(name, "train"), minlength=cfg.vocab_size).double() + 1.0
    uni_nll = -(uni / uni.sum()).log()[labels.flatten()].mean()
    return math.exp(float(nll)), math.exp(float(uni_nll)), counts


def _bound(name: str) -> float:
    return UNSEEN_PPL_BOUND if name in UNSEEN_DOMAINS else PPL_BOUND


@pytest.mark.parametrize("name", BUNDLED_DOMAINS)
def test_perplexity_well_below_unigram(name: str) -> None:
    ppl, uni, _ = _slice_eval(name)
    assert ppl <= _bound(name) * uni, f"{name}: model ppl {ppl:.1f} vs unigram {uni:.1f}"


@pytest.mark.parametrize("name", BUNDLED_CORPORA)
def test_routing_is_balanced_per_layer(name: str) -> None:
    _, _, counts = _slice_eval(name)
    ln_n = math.log(counts.shape[1])
    for layer, c in enumerate(counts):
        p = c.double() / c.sum()
        ent = float(-(p[p > 0] * p[p > 0].log()).sum())
        assert ent >= 0.7 * ln_n, f"{name} layer {layer}: routing entropy {ent:.2f} < 0.7 ln N"


def test_testbed_json_matches_bundle() -> None:
    report = json.loads(bundled_testbed_json().read_text())
    cfg = model().config
    assert report["model"]["num_experts"] == cfg.num_experts
    assert report["model"]["parameters"] == sum(p.numel() for p in model().parameters())
    for name in BUNDLED_DOMAINS:
        entry = report["corpora"][name]
        assert entry["model_ppl"] <= _bound(name) * entry["unigram_ppl"]
        assert len(entry["routing_entropy"]) == cfg.num_hidden_layers
