"""Perplexity equals a hand computation of the SparseGPT/Wanda protocol; windows, tail and sources."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from moeprune.bundled import read_bundled_corpus
from moeprune.errors import MoePruneError
from moeprune.evaluation.perplexity import load_eval_text, perplexity, sequence_nll, split_windows
from moeprune.options import EvalSettings
from tests.evaluation import bundled_tokenizer, tiny_lm

SEQ = 64
ppl_module = importlib.import_module("moeprune.evaluation.perplexity")  # the package re-exports the function


@pytest.fixture(scope="module")
def tok():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_lm(len(tok))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "sample.txt"
    path.write_text("\n\n".join(read_bundled_corpus("wiki", "test")[:1])[:3000], encoding="utf-8")
    return path


def reference_ppl(model, tok, text: str, seq_len: int) -> tuple[float, int, int]:
    """The protocol written out: tokenise once, cut windows, mean shifted CE per window, exp of the mean."""
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    losses = []
    with torch.no_grad():
        for i in range(n):
            window = ids[i * seq_len:(i + 1) * seq_len]
            logits = model(window[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], window[1:]).item())
    return math.exp(sum(losses) / n), n, n * (seq_len - 1)


def test_matches_hand_computation(model, tok, text_file):
    got = perplexity(model, tok, str(text_file), EvalSettings(ppl_seq_len=SEQ), progress=False)
    want, windows, tokens = reference_ppl(model, tok, text_file.read_text(encoding="utf-8"), SEQ)
    assert got["windows"] == windows >= 3
    assert got["tokens"] == tokens == windows * (SEQ - 1)
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    assert got["nll"] == pytest.approx(math.log(want), rel=1e-5)
    assert got["seq_len"] == SEQ and "tail dropped" in got["protocol"]


def test_batching_and_max_windows(model, tok, text_file):
    one = perplexity(model, tok, str(text_file), EvalSettings(ppl_seq_len=SEQ), progress=False)
    batched = perplexity(model, tok, str(text_file), EvalSettings(ppl_seq_len=SEQ), batch_size=3, progress=False)
    assert batched["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
    first2 = perplexity(model, tok, str(text_file), EvalSettings(ppl_seq_len=SEQ, max_windows=2), progress=False)
    assert first2["windows"] == 2 and first2["tokens"] == 2 * (SEQ - 1)
    assert first2["ppl"] != pytest.approx(one["ppl"], rel=1e-6)


def test_windows_drop_the_tail():
    ids = torch.arange(3 * SEQ + SEQ - 1)
    windows = split_windows(ids, SEQ)
    assert windows.shape == (3, SEQ)
    assert torch.equal(windows.flatten(), ids[:3 * SEQ])
    assert split_windows(ids, SEQ, max_windows=1).shape == (1, SEQ)
    assert split_windows(ids[:SEQ - 1], SEQ).shape == (0, SEQ)


def test_chunked_nll_equals_full():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 50, 97), torch.randint(0, 97, (2, 50))
    full = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").double()
    assert sequence_nll(logits, labels, chunk=7).item() == pytest.approx(full.item(), rel=1e-6)
    assert sequence_nll(logits, labels).dtype == torch.float64


def test_bundled_corpus_texts():
    name, text, protocol = load_eval_text("web")
    assert name == "web" and text == "\n\n".join(read_bundled_corpus("web", "test"))
    assert "test split" in protocol


def test_unreachable_hub_names_the_fix(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MoePruneError, match=r"--ppl-data wikitext2="):
        load_eval_text("wikitext2")


def test_local_wikitext_rebuilds_hub_rows(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Body text . \n", encoding="utf-8")
    _, text, protocol = load_eval_text("wikitext2", {"wikitext2": raw})
    # The hub rows are the file's lines with their '\n', blank lines as '', joined by '\n\n'.
    assert text == "\n\n".join(["", " = Title = \n", "", " Body text . \n"])
    assert str(raw) in protocol


def test_local_c4_uses_first_documents_and_caps_windows(model, tok, tmp_path, monkeypatch):
    path = tmp_path / "c4.jsonl"
    docs = [f"Document number {i} talks about the weather and the sea." for i in range(1102)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    _, text, _ = load_eval_text("c4", {"c4": path})
    assert text == " ".join(docs[:1100])
    monkeypatch.setattr(ppl_module, "C4_WINDOWS", 2)
    assert perplexity(model, tok, "c4", EvalSettings(ppl_seq_len=SEQ, ppl_sources={"c4": path}),
                      progress=False)["windows"] == 2


def test_bad_requests(model, tok, text_file):
    with pytest.raises(MoePruneError, match="max_position_embeddings"):
        perplexity(model, tok, str(text_file), EvalSettings(ppl_seq_len=4096), progress=False)
    with pytest.raises(MoePruneError, match="Unknown perplexity dataset"):
        perplexity(model, tok, "no-such-dataset", EvalSettings(ppl_seq_len=SEQ), progress=False)
