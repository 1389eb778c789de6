"""Document builders for the testbed's extra domains (see ``build_corpora.py``).

* ``bible``: the King James Bible (``bible-kjv`` + ``bible-kjv-text``), one chapter per
  document, verse numbers dropped. Public domain.
* ``man``: Linux man-pages (``manpages``, ``manpages-dev``), rendered to plain text with
  groff, one page (or ~8 kB piece of a long page) per document.
* ``glossary``: WordNet 3.0 synsets (``wordnet-base``): "lemma, lemma: gloss; "example"",
  12 consecutive synsets (same lexicographer file, so related senses) per document.
* ``devil``: Ambrose Bierce, *The Devil's Dictionary* (``dict-devil``), 12 entries per
  document. Public domain. Never trained on: the testbed's "unseen kind" of text.

Every function takes ``root``, the directory the Debian packages were unpacked into
(``/`` when installed, or ``dpkg -x pkg.deb DIR``), so nothing has to be installed.
"""

from __future__ import annotations

import gzip
import random
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

SEED = 20261130
GROUP_SIZE = 12
BIBLE_MAX_BYTES = 2_500_000
MAN_MAX_BYTES = 3_000_000
GLOSSARY_MAX_BYTES = 2_500_000
MAN_SECTIONS = ("man2", "man3", "man4", "man5", "man7")


def normalise(text: str) -> str:
    """Collapse whitespace so no document contains the separator (3+ newlines)."""
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines).strip())


def sample_bytes(docs: list[str], max_bytes: int, seed: int = SEED, *, sort: bool = True) -> list[str]:
    """Seeded sample of whole documents up to ``max_bytes``, shuffled from sorted order (``sort=False``: from
    the order given, as the calibration corpora were built)."""
    docs = sorted(docs) if sort else list(docs)
    random.Random(seed).shuffle(docs)
    kept, total = [], 0
    for doc in docs:
        if total >= max_bytes:
            break
        kept.append(doc)
        total += len(doc.encode())
    return kept


def chunk(text: str, max_chars: int) -> list[str]:
    """Cut at paragraph boundaries into pieces of at most ~``max_chars``."""
    chunks, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > max_chars:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    return chunks + ([cur] if cur else [])


def grouped(items: list[str], size: int = GROUP_SIZE) -> list[str]:
    return ["\n\n".join(items[i : i + size]) for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------- bible
_CHAPTER = re.compile(r"^(\S.*\S) (\d+)$")
_VERSE = re.compile(r"^\s*(\d+) (.*)$")


def bible_documents(root: Path) -> list[str]:
    """One document per chapter: "Genesis 1" then the verses as running text."""
    out = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-l100000", "Gen1:1-Rev22:21"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    docs, title, verses = [], None, []
    for line in out.splitlines():
        if not line.strip():
            continue
        if (m := _CHAPTER.match(line)) and not line[0].isspace():
            if title and verses:
                docs.append(normalise(f"{title}\n\n" + " ".join(verses)))
            title, verses = line.strip(), []
        elif m := _VERSE.match(line):
            verses.append(m.group(2).strip())
        elif verses:  # a wrapped continuation line
            verses[-1] += " " + line.strip()
    if title and verses:
        docs.append(normalise(f"{title}\n\n" + " ".join(verses)))
    return sample_bytes(docs, BIBLE_MAX_BYTES)


# ------------------------------------------------------------------------------- man
def render_man(path: Path) -> str:
    """A man page as plain text: no hyphenation, no justification, one line per paragraph."""
    source = gzip.decompress(path.read_bytes())
    if source.lstrip().startswith(b".so "):
        return ""  # a redirect to another page
    text = subprocess.run(
        "preconv | groff -t -man -Tutf8 -P-cbou -rLL=3000n -rHY=0 -dAD=l -rcR=1",
        shell=True, input=source, capture_output=True, check=False,
    ).stdout.decode("utf-8", errors="replace")  # fmt: skip
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 4:
        return ""
    body = text.split(lines[0], 1)[1].rsplit(lines[-1], 1)[0]  # drop page header and footer
    body = re.sub(r"[\u2500-\u257f]+", " ", body.replace("\u2010", "-"))  # table rules
    return normalise(body)


def man_documents(root: Path) -> list[str]:
    docs = []
    for section in MAN_SECTIONS:
        for path in sorted((root / "usr/share/man" / section).glob("*.gz")):
            text = render_man(path)
            if len(text) >= 500:
                docs += [d for d in chunk(text, 8000) if len(d) >= 300]
    return sample_bytes(docs, MAN_MAX_BYTES)


# -------------------------------------------------------------------------- glossary
def _synset_text(line: str) -> str | None:
    """``data.*`` line -> "lemma, lemma: gloss" (None for header/licence lines)."""
    if line.startswith(" ") or " | " not in line:
        return None
    fields, gloss = line.split(" | ", 1)
    parts = fields.split()
    n_words = int(parts[3], 16)
    lemmas = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * n_words : 2]]
    return f"{', '.join(lemmas)}: {gloss.strip()}"


def glossary_documents(root: Path) -> list[str]:
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        raw = (root / "usr/share/wordnet" / f"data.{pos}").read_text(encoding="utf-8", errors="replace")
        entries = [t for t in map(_synset_text, raw.splitlines()) if t]
        docs += [normalise(d) for d in grouped(entries)]
    return sample_bytes(docs, GLOSSARY_MAX_BYTES)


# ----------------------------------------------------------------------------- devil
def devil_documents(root: Path) -> list[str]:
    """Dictionary entries (a line starting with the headword in capitals), 12 per document."""
    raw = gzip.open(root / "usr/share/dictd/devil.dict.dz", "rt", encoding="utf-8", errors="replace").read()
    raw = raw[raw.index("\nABASEMENT, n.") + 1 :]  # skip the dictd header and the preface
    raw = re.sub(r"^\s*abcdefghijklmnopqrstuvwxyz\s*$", "", raw, flags=re.M)  # dictd trailer
    entries, cur = [], []
    for line in raw.splitlines():
        if _HEADWORD.match(line) and cur:
            entries.append(cur)
            cur = []
        cur.append(line)
    entries.append(cur)
    texts = []
    for entry in entries:
        body = normalise(re.sub(r"_([^_]+)_", r"\1", _unwrap(entry)))  # _italics_
        if len(body) >= 40:
            texts.append(body)
    return grouped(texts)


def _unwrap(lines: list[str]) -> str:
    """Join hard-wrapped prose lines into one line per paragraph; indented verse keeps its lines."""
    out: list[str] = []
    for line in lines:
        # An unindented line continues the line above (a paragraph's first line may be indented).
        if line.strip() and not line[0].isspace() and out and out[-1].strip():
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return "\n".join(out)


_HEADWORD = re.compile(r"^[A-Z][A-Z'\- ]*[A-Z][,.]")


DOMAIN_BUILDERS: dict[str, Callable[[Path], list[str]]] = {
    "bible": bible_documents,
    "man": man_documents,
    "glossary": glossary_documents,
    "devil": devil_documents,
}
