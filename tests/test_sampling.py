"""Calibration windows: WikiText is sampled as whole articles, windows carry no BOS, held-out windows follow."""

from __future__ import annotations

import datasets
import pytest

from moeprune.data.corpora import load_documents, parse_corpus, wikitext_articles
from moeprune.data.sampling import calibration_windows, held_out_windows

ARTICLES = [
    " = Alpha Station = \n \n Alpha Station was built in the north of the valley near the river crossing . \n \n"
    " = = History = = \n \n The line opened in 1890 and closed to passengers in 1962 after a long decline . \n \n",
    " = Beta ( band ) = \n \n Beta are a rock band formed by three brothers who grew up on a farm . \n \n"
    " = = Members = = \n \n The drummer joined late and left early ; the band then used a machine . \n \n"
    " = = = Former members = = = \n \n Two guitarists left to start a bakery in the capital . \n \n",
    " = Gamma Ray Burst 990123 = \n \n A bright burst seen by several satellites in January of that year . \n \n",
]
RAW = " \n" + "".join(ARTICLES)  # wiki.train.raw starts with a blank line


@pytest.fixture
def wikitext_file(tmp_path):
    path = tmp_path / "wiki.train.txt"
    path.write_text(RAW)
    return path


def test_wikitext_raw_file_gives_whole_articles(wikitext_file):
    docs = load_documents(parse_corpus(str(wikitext_file)))
    assert docs == ARTICLES  # not 12 rows of single lines and headings
    assert wikitext_articles("no headings here\n") == ["no headings here\n"]


def test_hub_wikitext_rows_are_joined_into_articles(monkeypatch):
    rows = [line + "\n" for line in RAW.split("\n")[:-1]]  # the hub stores one line per row, "\n" kept

    def fake_load_dataset(source, config=None, split=None, **kwargs):
        assert (source, config, split) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train")
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_documents(parse_corpus("wikitext2")) == ARTICLES


def test_windows_are_articles_in_seeded_order_without_bos(wikitext_file, tokenizer):
    spec = parse_corpus(str(wikitext_file))
    encoded = [tokenizer.encode(a, add_special_tokens=False) for a in ARTICLES]
    total = sum(len(e) + 1 for e in encoded)
    seq_len = 16
    windows = calibration_windows(spec, tokenizer, total // seq_len, seq_len, seed=3)
    stream = windows.flatten().tolist()
    eos = tokenizer.eos_token_id
    pieces, current = [], []
    for token in stream:
        if token == eos:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    assert all(piece in encoded for piece in pieces) and len(pieces) >= 2  # whole articles, each once
    assert len({tuple(p) for p in pieces}) == len(pieces)
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != eos:
        assert tokenizer.bos_token_id not in stream


def test_held_out_windows_follow_the_calibration_windows(wikitext_file, tokenizer):
    spec = parse_corpus(str(wikitext_file))
    both = calibration_windows(spec, tokenizer, 6, 8, seed=1)
    held = held_out_windows(spec, tokenizer, 2, 8, seed=1, calibration_samples=4)
    assert held.tolist() == both[4:6].tolist()


def test_joined_fields(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text('{"instruction": "Sort a list.", "output": "sorted(xs)"}\n{"instruction": "Hi", "output": ""}\n')
    docs = load_documents(parse_corpus(f"{path}:instruction+output"))
    assert docs == ["Sort a list.\n\nsorted(xs)", "Hi"]
    assert parse_corpus("evol-codealpaca").field == "instruction+output"
