"""Train the testbed's byte-level BPE tokenizer on both corpora's train splits.

Usage::

    python scripts/testbed/train_tokenizer.py [--vocab-size 4096] [--out DIR]

The result is wrapped in ``PreTrainedTokenizerFast(tokenizer_object=...)`` and saved with
``save_pretrained`` so ``AutoTokenizer.from_pretrained(out)`` loads it offline; tokenizer_config.json then
names ``PreTrainedTokenizerFast`` (not transformers 5's ``TokenizersBackend``) so transformers 4.x loads it too.
(``GPT2TokenizerFast(vocab_file=...)`` would silently ignore the files.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import CORPORA, EOS_TOKEN, MODEL_DIR, read_corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moeprune.surgery.tokenizer_files import make_portable


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        min_frequency=2,
        show_progress=False,
    )
    docs = [doc for name in CORPORA for doc in read_corpus(name, "train")]
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1024,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    args = ap.parse_args()
    tokenizer = train_tokenizer(args.vocab_size)
    tokenizer.save_pretrained(args.out)
    make_portable(args.out)  # transformers 5 writes TokenizersBackend, which transformers 4.x lacks
    print(f"saved tokenizer with {len(tokenizer)} tokens to {args.out}")


if __name__ == "__main__":
    main()
