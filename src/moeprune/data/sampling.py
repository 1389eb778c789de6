"""Calibration samples: seeded random windows of a corpus's tokenized train text.

What is sampled, exactly:

1. The corpus's documents (``corpora.load_documents``): C4 and JSON/parquet rows are documents;
   WikiText2 (hub rows or a raw ``wiki.train.raw`` file) is cut into whole **articles** (a level-1
   heading with all its sections and paragraphs, in their original order), never single rows.
2. The documents are put in a seeded random order (``random.Random(seed).shuffle``).
3. Each is tokenized on its own with ``add_special_tokens=False`` and appended to one stream, followed
   by the tokenizer's EOS token when it has one, until the stream holds enough tokens.
4. The stream is cut into non-overlapping windows of ``seq_len`` tokens, taken in order.

So every window is contiguous text, most of it from within one article or document, and a window may
start mid-document. **No BOS token** is added to a window (nor to a document), as in the random
calibration windows of GPTQ/SparseGPT, which are cut from one tokenized text. Only as much text as
needed is tokenized, so a large corpus such as C4 costs seconds.

``skip`` drops the first windows of the same stream: :func:`held_out_windows` uses it to give windows
that follow the calibration windows, disjoint from them in tokens, from the same (train) split.
"""

from __future__ import annotations

import random

import torch

from moeprune.data.corpora import CorpusSpec, load_documents
from moeprune.errors import MoePruneError


def calibration_windows(
    spec: CorpusSpec,
    tokenizer,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    min_samples: int = 1,
    skip: int = 0,
) -> torch.Tensor:
    """``[num_samples, seq_len]`` int64 token windows (fewer, with a warning, if the corpus is small), after
    the first ``skip`` windows of the stream."""
    documents = load_documents(spec)
    if not documents:
        raise MoePruneError(f"Corpus {spec.name!r} has no text.")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    needed = (skip + num_samples) * seq_len
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for index in order:
        # verbose=False: long documents are fine here, they are cut into windows below.
        stream.extend(tokenizer.encode(documents[index], add_special_tokens=False, verbose=False))
        stream.extend(separator)
        if len(stream) >= needed:
            break
    stream = stream[skip * seq_len :]
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


def held_out_windows(
    spec: CorpusSpec, tokenizer, num_samples: int, seq_len: int, seed: int, calibration_samples: int
) -> torch.Tensor:
    """Windows of the calibration corpus that calibration did not see: the ``num_samples`` windows that
    follow its first ``calibration_samples`` windows in the same seeded stream (same split, same seed)."""
    return calibration_windows(spec, tokenizer, num_samples, seq_len, seed, skip=calibration_samples)
