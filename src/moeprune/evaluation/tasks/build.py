"""Build the offline ``bundled_*`` lm-eval tasks from the bundled corpora's TEST splits.

Each item is a passage (the context) and candidate next sentences (the choices): the true
continuation plus distractor sentences drawn, with a fixed seed, from *other* test documents.
Distractors are length-matched to the true sentence so that raw log-likelihood (``acc``) is not
won by simply preferring short choices. Nothing comes from the train or validation splits, and
an item whose context also occurs in those splits is dropped, so a model trained on the train
split has never seen an item verbatim.

Run ``python scripts/build_eval_tasks.py`` (or ``python -m moeprune.evaluation.tasks.build``);
the output is byte-identical for the same corpora.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeprune.bundled import BUNDLED_CORPORA, read_bundled_corpus

TASKS_DIR = Path(__file__).resolve().parent
SEED = 1234
CONT_ITEMS = 300  # per corpus, 4-way
CROSS_ITEMS = 300  # in all, 2-way, half from each corpus
CONTEXT_CHARS = (200, 600)  # context length range, in characters
SENTENCE_CHARS = (30, 250)
LENGTH_RATIO = 1.5  # distractors are at most this factor longer or shorter than the true sentence

# End of a sentence: terminal punctuation (optionally closing quote/bracket) followed by whitespace.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]?(\s+)")


@dataclass(frozen=True)
class Candidate:
    doc: int
    context: str
    sentence: str


def sentence_spans(doc: str) -> list[tuple[int, int, str]]:
    """(start, end, whitespace after) of each sentence, in document order."""
    spans, start = [], 0
    for match in _BOUNDARY.finditer(doc):
        spans.append((start, match.start(1), match.group(1)))
        start = match.end(1)
    if start < len(doc):
        spans.append((start, len(doc), ""))
    return spans


def _is_sentence(text: str) -> bool:
    # Hard-wrapped lines (single newlines) are kept as they are; a blank line ends a paragraph.
    return (
        SENTENCE_CHARS[0] <= len(text) <= SENTENCE_CHARS[1]
        and "\n\n" not in text
        and text[0].isupper()
        and text[-1] in ".!?\"')]"
        and sum(c.isalpha() for c in text) > len(text) / 2
    )


def candidates(doc_index: int, doc: str) -> list[Candidate]:
    """Every (context, next sentence) pair of one document that meets the length rules.

    The true sentence must follow the context after exactly one space, so that lm-eval's
    ``context + " " + choice`` reproduces the original text.
    """
    spans, found = sentence_spans(doc), []
    for i in range(1, len(spans)):
        start, end, _ = spans[i]
        sentence = doc[start:end]
        if spans[i - 1][2] != " " or not _is_sentence(sentence):
            continue
        context_end = spans[i - 1][1]
        # The longest run of whole sentences before it that fits in CONTEXT_CHARS[1], starting at a
        # capital letter (a split after an abbreviation such as "Mr." starts lower-case).
        first = next(
            (j for j in range(i) if context_end - spans[j][0] <= CONTEXT_CHARS[1] and doc[spans[j][0]].isupper()), i - 1
        )
        context = doc[spans[first][0] : context_end].strip()
        if len(context) >= CONTEXT_CHARS[0]:
            found.append(Candidate(doc_index, context, sentence))
    return found


def _distractors(rng: random.Random, true: Candidate, pool: list[Candidate], k: int) -> list[str]:
    """k distinct sentences from other documents, length-matched to the true one when possible."""
    others = [c.sentence for c in pool if c.doc != true.doc and c.sentence != true.sentence]
    n = len(true.sentence)
    close = sorted({s for s in others if n / LENGTH_RATIO <= len(s) <= n * LENGTH_RATIO})
    source = close if len(close) >= k else sorted(set(others))
    return rng.sample(source, k)


def _item(rng: random.Random, task: str, index: int, corpus: str, true: Candidate, wrong: list[str]) -> dict:
    choices = [true.sentence, *wrong]
    rng.shuffle(choices)
    return {
        "id": f"{task}-{index:04d}",
        "corpus": corpus,
        "doc": true.doc,
        "context": true.context,
        "choices": choices,
        "gold": choices.index(true.sentence),
    }


def _unseen(cands: list[Candidate], corpus: str) -> list[Candidate]:
    seen = "\n".join(read_bundled_corpus(corpus, "train") + read_bundled_corpus(corpus, "validation"))
    return [c for c in cands if c.context not in seen]


def corpus_candidates(corpus: str) -> list[Candidate]:
    docs = read_bundled_corpus(corpus, "test")
    return _unseen([c for i, d in enumerate(docs) for c in candidates(i, d)], corpus)


def build_cont(corpus: str, pool: list[Candidate], n: int = CONT_ITEMS) -> list[dict]:
    rng = random.Random(f"{SEED}-{corpus}-cont")
    task = f"bundled_{corpus}_cont"
    picked = rng.sample(pool, min(n, len(pool)))
    return [_item(rng, task, i, corpus, c, _distractors(rng, c, pool, 3)) for i, c in enumerate(picked)]


def build_cross(pools: dict[str, list[Candidate]], n: int = CROSS_ITEMS) -> list[dict]:
    """2-way: the true next sentence vs a length-matched sentence from the other corpus."""
    rng = random.Random(f"{SEED}-cross")
    picked = [
        (corpus, other, c)
        for corpus, other in (("wiki", "web"), ("web", "wiki"))
        for c in rng.sample(pools[corpus], min(n // 2, len(pools[corpus])))
    ]
    rng.shuffle(picked)  # interleave the corpora, so that lm-eval's --limit still sees both
    items = []
    for corpus, other, c in picked:
        # doc=-1 marks every sentence of the other corpus as "another document".
        other_pool = [Candidate(-1, o.context, o.sentence) for o in pools[other]]
        items.append(_item(rng, "bundled_cross_cont", len(items), corpus, c, _distractors(rng, c, other_pool, 1)))
    return items


def build_all() -> dict[str, list[dict]]:
    pools = {corpus: corpus_candidates(corpus) for corpus in BUNDLED_CORPORA}
    tasks = {f"bundled_{corpus}_cont": build_cont(corpus, pools[corpus]) for corpus in BUNDLED_CORPORA}
    tasks["bundled_cross_cont"] = build_cross(pools)
    return tasks


def write_all(out_dir: Path = TASKS_DIR, build: Callable[[], dict[str, list[dict]]] | None = None) -> dict[str, int]:
    """Write each task's items as ``<task>.jsonl`` (``build`` defaults to this module's tasks)."""
    sizes = {}
    for task, items in (build or build_all)().items():
        lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        (out_dir / f"{task}.jsonl").write_text(lines, encoding="utf-8")
        sizes[task] = len(items)
    return sizes


if __name__ == "__main__":
    for name, size in write_all().items():
        print(f"{name}: {size} items")
