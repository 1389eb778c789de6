"""Calibration samples: seeded random windows of a corpus's tokenized train text.

Documents are put in a seeded random order, tokenized one by one and concatenated (separated by
the tokenizer's EOS token when it has one) until the stream holds enough tokens, and the stream is
cut into non-overlapping windows of ``seq_len``. Only as much text as needed is tokenized, so a
large corpus such as C4 costs seconds, and every window is real contiguous text of the corpus.
"""

from __future__ import annotations

import random

import torch

from moeprune.data.corpora import CorpusSpec, load_documents
from moeprune.errors import MoePruneError


def calibration_windows(
    spec: CorpusSpec,
    tokenizer,
    num_samples: int = 512,
    seq_len: int = 1024,
    seed: int = 0,
    min_samples: int = 1,
) -> torch.Tensor:
    """``[num_samples, seq_len]`` int64 token windows (fewer, with a warning, if the corpus is small)."""
    documents = load_documents(spec)
    if not documents:
        raise MoePruneError(f"Corpus {spec.name!r} has no text.")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    needed = num_samples * seq_len
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for index in order:
        # verbose=False: long documents are fine here, they are cut into windows below.
        stream.extend(tokenizer.encode(documents[index], add_special_tokens=False, verbose=False))
        stream.extend(separator)
        if len(stream) >= needed:
            break
    available = len(stream) // seq_len
    if available < min(num_samples, max(min_samples, 1)):
        raise MoePruneError(
            f"Corpus {spec.name!r} holds {len(stream)} tokens, less than one window of {seq_len}; "
            "lower --seq-len or use a larger corpus."
        )
    if available < num_samples:
        import warnings

        warnings.warn(
            f"Corpus {spec.name!r} yields only {available} windows of {seq_len} tokens (asked for {num_samples}); "
            "using all of them.",
            stacklevel=2,
        )
    count = min(available, num_samples)
    return torch.tensor(stream[: count * seq_len], dtype=torch.int64).view(count, seq_len)
