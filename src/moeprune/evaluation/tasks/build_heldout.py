"""Build the ``heldout_*`` lm-eval tasks from the TEST splits of domains calibration never uses.

The bundled model was trained on ``bible``, ``man`` and ``glossary`` (train splits) and never on
``devil``; calibration uses only ``wiki`` and ``web``. Every item comes from the test split of one of
those four domains, and an item whose true text also occurs verbatim in that domain's train or
validation split is dropped. The tasks, each with ``ITEMS`` items (a quarter per domain):

* ``heldout_order`` (2-way, chance 50%): a passage, then the true next unit (sentence, or a glossary
  entry) vs. the same unit with two adjacent words swapped. Both choices hold the same words, so
  only word order separates them (a minimal pair, scored by summed log-likelihood, ``acc``).
* ``heldout_domain`` (4-way, chance 25%): a passage, then its true next unit vs. three length-matched
  units from the three *other* domains, scored by pointwise mutual information
  (``acc_mutual_info``: log P(choice | passage) - log P(choice)), so that a choice's own likelihood
  does not decide. A model keeps this only while it still models each domain.
* ``heldout_cloze`` (4-way, chance 25%): a passage and the start of a unit; the choices are the rest
  of the unit with its next word kept or replaced by one of three words of about the same frequency
  in the domain's test split (same capitalisation), so a unigram model has no preference. Its units
  come from the same pools, so a cloze context often ends inside another task's gold unit (the same
  text split elsewhere): lm-eval's HFLM misscored such requests, ``evaluation/hflm.py`` fixes that.

(A same-domain next-sentence task was tried and dropped: the dense model scored 32% against a chance
of 25%, too close to rank methods.)

The true unit follows the passage exactly as in the document (the separator, a space or a blank
line, is the start of every choice and ``target_delimiter`` is empty), so the true choice is the
original text. Run ``python -m moeprune.evaluation.tasks.build_heldout``; the output is
byte-identical for the same corpora.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from moeprune.bundled import HELDOUT_DOMAINS, UNSEEN_DOMAINS, read_bundled_corpus
from moeprune.evaluation.tasks import HELDOUT_TASKS, build

TASKS_DIR = Path(__file__).resolve().parent
SEED = 20261130
DOMAINS: tuple[str, ...] = HELDOUT_DOMAINS + UNSEEN_DOMAINS
ITEMS = 1200  # per task: standard error <= 0.5 / sqrt(1200) = 1.44 points
UNIT_CHARS = (30, 250)
CONTEXT_CHARS = 400  # at most this much text before the true unit
LENGTH_RATIO = 1.5
FREQUENCY_BAND = 0.5  # cloze distractors occur between 0.5x and 2x as often as the true word
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]?( +|\n)")


@dataclass(frozen=True)
class Unit:
    domain: str
    doc: int
    context: str  # the text before the unit, at most CONTEXT_CHARS, starting at a unit boundary
    sep: str  # the whitespace between the context and the unit in the document
    text: str


def _spans(doc: str) -> list[tuple[int, int]]:
    """(start, end) of each unit: paragraphs cut at sentence ends (a glossary entry is one unit)."""
    spans = []
    for para in re.finditer(r"[^\n]+(?:\n[^\n]+)*", doc):
        start = para.start()
        for match in _BOUNDARY.finditer(para.group()):
            spans.append((start, para.start() + match.start(1)))
            start = para.start() + match.end(1)
        if start < para.end():
            spans.append((start, para.end()))
    return spans


def _is_unit(text: str) -> bool:
    words = text.split()
    return (
        UNIT_CHARS[0] <= len(text) <= UNIT_CHARS[1]
        and len(words) >= 6
        and "\n" not in text
        and sum(c.isalpha() for c in text) > 0.6 * len(text)
    )


def units(domain: str) -> list[Unit]:
    """Every unit of the domain's test split that has a context and is not in train/validation."""
    seen = "\n".join(read_bundled_corpus(domain, "train") + read_bundled_corpus(domain, "validation"))
    found = []
    for index, doc in enumerate(read_bundled_corpus(domain, "test")):
        spans = _spans(doc)
        for i in range(1, len(spans)):
            start, end = spans[i]
            text = doc[start:end]
            if not _is_unit(text) or text in seen:
                continue
            first = next((j for j in range(i) if start - spans[j][0] <= CONTEXT_CHARS), i)
            if first == i:
                continue  # the previous unit alone is too long to be a context
            context = doc[spans[first][0] : spans[i - 1][1]]
            found.append(Unit(domain, index, context, doc[spans[i - 1][1] : start], text))
    return found


def swap_adjacent(rng: random.Random, text: str) -> str | None:
    """The text with one random pair of adjacent, different words swapped (None if there is none)."""
    words = text.split(" ")
    pairs = [i for i in range(len(words) - 1) if words[i] and words[i + 1] and words[i] != words[i + 1]]
    if not pairs:
        return None
    i = rng.choice(pairs)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _length_matched(rng: random.Random, true: Unit, pool: list[Unit], k: int) -> list[str]:
    others = sorted({u.text for u in pool if (u.domain, u.doc) != (true.domain, true.doc) and u.text != true.text})
    n = len(true.text)
    close = [t for t in others if n / LENGTH_RATIO <= len(t) <= n * LENGTH_RATIO]
    return rng.sample(close if len(close) >= k else others, k)


def _item(rng: random.Random, task: str, index: int, unit: Unit, wrong: list[str]) -> dict:
    texts = [unit.text, *wrong]
    rng.shuffle(texts)
    return {
        "id": f"{task}-{index:04d}",
        "domain": unit.domain,
        "doc": unit.doc,
        "context": unit.context,
        "choices": [unit.sep + t for t in texts],
        "gold": texts.index(unit.text),
    }


def _picked(rng: random.Random, pools: dict[str, list[Unit]]) -> list[Unit]:
    """ITEMS units, a quarter from each domain, interleaved (so ``--limit`` still sees every domain)."""
    per_domain = [rng.sample(pools[d], ITEMS // len(DOMAINS)) for d in DOMAINS]
    return [u for group in zip(*per_domain, strict=True) for u in group]


def _word_counts(pool: list[Unit]) -> Counter[str]:
    return Counter(w for u in pool for w in u.text.split(" ") if w.isalpha())


def cloze(rng: random.Random, unit: Unit, counts: Counter[str]) -> dict | None:
    """(context, choices, gold) for one unit: a word from the 3rd on swapped for frequency-matched words."""
    words = unit.text.split(" ")
    slots = [i for i in range(2, len(words)) if words[i].isalpha() and len(words[i]) >= 3]
    if not slots:
        return None
    i = rng.choice(slots)
    true, n = words[i], counts[words[i]]
    like = sorted(
        w for w, c in counts.items()
        if w.lower() != true.lower() and w[0].isupper() == true[0].isupper()
        and n * FREQUENCY_BAND <= c <= n / FREQUENCY_BAND and len(w) >= 3
    )  # fmt: skip
    if len(like) < 3:
        return None
    rest = " ".join(words[i + 1 :])
    tail = f" {rest}" if rest else ""
    candidates = [true, *rng.sample(like, 3)]
    rng.shuffle(candidates)
    return {
        "context": unit.context + unit.sep + " ".join(words[:i]),
        "choices": [f" {w}{tail}" for w in candidates],
        "gold": candidates.index(true),
    }


def _cloze_items(rng: random.Random, pools: dict[str, list[Unit]]) -> list[dict]:
    """A quarter of ITEMS per domain (units without a usable word are skipped), interleaved."""
    per_domain = []
    for domain in DOMAINS:
        counts, found = _word_counts(pools[domain]), []
        for unit in rng.sample(pools[domain], len(pools[domain])):
            if len(found) == ITEMS // len(DOMAINS):
                break
            if (item := cloze(rng, unit, counts)) is not None:
                found.append({"domain": domain, "doc": unit.doc, **item})
        per_domain.append(found)
    rows = [row for group in zip(*per_domain, strict=True) for row in group]
    return [{"id": f"heldout_cloze-{i:04d}", **row} for i, row in enumerate(rows)]


def build_all() -> dict[str, list[dict]]:
    pools = {d: units(d) for d in DOMAINS}
    tasks: dict[str, list[dict]] = {}
    rng = random.Random(f"{SEED}-order")
    items = []
    for unit in _picked(rng, pools):
        swapped = swap_adjacent(rng, unit.text)
        if swapped is not None and swapped != unit.text:
            items.append(_item(rng, "heldout_order", len(items), unit, [swapped]))
    tasks["heldout_order"] = items
    rng = random.Random(f"{SEED}-domain")
    tasks["heldout_domain"] = [
        _item(rng, "heldout_domain", i, u, [_length_matched(rng, u, pools[d], 1)[0] for d in DOMAINS if d != u.domain])
        for i, u in enumerate(_picked(rng, pools))
    ]
    tasks["heldout_cloze"] = _cloze_items(random.Random(f"{SEED}-cloze"), pools)
    assert tuple(tasks) == HELDOUT_TASKS
    return tasks


def write_all(out_dir: Path = TASKS_DIR) -> dict[str, int]:
    return build.write_all(out_dir, build_all)


if __name__ == "__main__":
    for name, size in write_all().items():
        print(f"{name}: {size} items")
