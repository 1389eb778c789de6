"""Build the two bundled English corpora (``wiki`` and ``web``) deterministically.

Sources (all shipped inside registry packages, see ``src/moeprune/bundled/SOURCES.md``):

* ``wiki``: the English Wikipedia sample carried by the ``gensim`` wheel, cleaned with
  ``mwparserfromhell``.
* ``web``: a mix of Debian packages with clear licences -- ``fortunes`` (quotes, jokes,
  usenet-style snippets), ``python3.11-doc`` (FAQ / HOWTO / tutorial prose, q&a style),
  ``debian-handbook`` (admin guide) and ``dict-foldoc`` (computing glossary).

Each corpus is split by document (seeded) into train/validation/test and written as gzip
text with documents separated by ``DOC_SEPARATOR`` (see ``moeprune.bundled``).

Usage::

    apt-get install -y fortunes debian-handbook python3.11-doc dict-foldoc
    python scripts/testbed/build_corpora.py
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import html
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from html.parser import HTMLParser
from pathlib import Path

from domains import DOMAIN_BUILDERS, chunk, sample_bytes

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "src" / "moeprune" / "bundled" / "corpora"
DOC_SEPARATOR = "\n\n\n"
SEED = 20261122
HELDOUT_FRACTION = 0.05  # of bytes, for each of validation and test
# Domains the model is never trained on: their train split only feeds the unigram baseline,
# so a larger share goes to test (enough tokens to measure perplexity and build tasks).
UNSEEN = ("devil",)
UNSEEN_TEST_FRACTION = 0.3

GENSIM_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Skipped: ascii art (not prose) and files whose humour targets groups of people.
FORTUNE_FILES = (
    "computers cookie debian definitions education food fortunes goedel humorists kids "
    "law linux linuxcookie literature love magic medicine miscellaneous news paradoxum "
    "people perl pets platitudes pratchett riddles science songs-poems sports startrek "
    "tao wisdom work zippy"
).split()
PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
PYDOC_SUBDIRS = ("faq", "howto", "tutorial", "using", "extending")
HANDBOOK_DIR = Path("/usr/share/doc/debian-handbook/html/en-US")
FOLDOC_DICT = Path("/usr/share/dictd/foldoc.dict.dz")
FOLDOC_MAX_BYTES = 600_000
FORTUNE_MAX_BYTES = 1_200_000
GROUP_SIZE = 12  # short items (quotes, glossary entries) are grouped into one document


def normalise(text: str) -> str:
    """Collapse whitespace so no document contains the separator (3+ newlines)."""
    lines = [re.sub(r"[ \t]+", " ", line).rstrip() for line in text.splitlines()]
    text = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


# ----------------------------------------------------------------------------- wiki
def _wiki_pages(path: Path) -> Iterator[tuple[str, str]]:
    """Yield (title, wikitext) of main-namespace, non-redirect pages."""
    with bz2.open(path) as fh:
        for _, elem in ET.iterparse(fh):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            text = elem.find("{*}revision/{*}text")
            title = elem.find("{*}title")
            if ns is not None and ns.text == "0" and text is not None and text.text:
                if not text.text.lstrip().lower().startswith("#redirect"):
                    yield (title.text or "", text.text)
            elem.clear()


_DROP_LINK = re.compile(r"^(file|image|category|media|[a-z]{2,3}(-[a-z]+)?):", re.I)


def clean_wikitext(wikitext: str) -> str:
    """Wikitext -> prose: drop templates, refs, tables, files, categories, interwikis."""
    import mwparserfromhell  # only the wiki corpus needs the testbed extra

    code = mwparserfromhell.parse(wikitext)
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).lower() in {"ref", "table", "gallery", "math", "references"}:
            _safe_remove(code, tag)
    for link in code.filter_wikilinks(recursive=True):
        if _DROP_LINK.match(str(link.title).strip()):
            _safe_remove(code, link)
    text = code.strip_code(normalize=True, collapse=True)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)  # headings
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "()" left by removed templates
    text = html.unescape(text)
    # Drop list/table debris and trailing "See also / References" stubs (short lines).
    keep = [ln for ln in text.splitlines() if not ln.strip().startswith(("|", "{", "!"))]
    return normalise("\n".join(keep))


def _safe_remove(code: object, node: object) -> None:
    try:
        code.remove(node)
    except ValueError:  # already removed together with a parent
        pass


def wiki_documents() -> list[str]:
    import gensim  # only the wiki corpus needs the testbed extra

    docs = []
    for title, wikitext in _wiki_pages(Path(gensim.__file__).parent / GENSIM_WIKI_FILE):
        body = clean_wikitext(wikitext)
        if len(body) >= 500:
            docs.append(normalise(f"{title}\n\n{body}"))
    return docs


# ------------------------------------------------------------------------------ web
def _grouped(items: list[str], size: int) -> list[str]:
    return ["\n\n".join(items[i : i + size]) for i in range(0, len(items), size)]


def fortune_documents() -> list[str]:
    docs = []
    for name in FORTUNE_FILES:
        raw = (FORTUNE_DIR / name).read_text(encoding="utf-8", errors="replace")
        quotes = [normalise(q) for q in re.split(r"^%\s*$", raw, flags=re.M)]
        docs += _grouped([q for q in quotes if q], GROUP_SIZE)
    return _sample_bytes(docs, FORTUNE_MAX_BYTES)


def _sample_bytes(docs: list[str], max_bytes: int) -> list[str]:
    """Seeded sample of whole documents up to ``max_bytes`` (keeps the web mix balanced), from the order given."""
    return sample_bytes(docs, max_bytes, SEED, sort=False)


_RST_ROLE = re.compile(r":[a-z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")


def clean_rst(text: str) -> str:
    """reStructuredText -> readable text: keep prose and examples, drop directives."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        if re.match(r"^\.\. ", line):
            # Directive/comment: skip it and its indented body, except the
            # admonitions whose body is prose.
            skipping = not re.match(r"^\.\. (note|seealso|warning|tip|important)::", line)
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        if re.fullmatch(r"\s*([=\-~^*#+\"'`])\1{3,}\s*", line):
            continue  # heading under/overline
        line = _RST_ROLE.sub(r"\1", line)
        line = _RST_LINK.sub(r"\1", line)
        line = re.sub(r"``([^`]+)``", r"\1", line)
        line = re.sub(r"`([^`]+)`_?", r"\1", line)
        line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)
        line = line.replace("::", ":") if line.rstrip().endswith("::") else line
        out.append(line)
    return normalise("\n".join(out))


def pydoc_documents() -> list[str]:
    docs = []
    for sub in PYDOC_SUBDIRS:
        for path in sorted((PYDOC_DIR / sub).rglob("*.rst.txt")):
            text = clean_rst(path.read_text(encoding="utf-8"))
            # Long pages are split at blank-line boundaries into ~8 kB documents so a
            # few huge pages cannot dominate one split.
            docs += [d for d in chunk(text, 8000) if len(d) >= 300]
    return docs


class _HandbookText(HTMLParser):
    """Collect prose from the handbook pages, skipping banner, navigation and TOCs.

    The pages are XHTML (balanced tags), so a depth counter is enough to skip a subtree.
    """

    BLOCKS = {"p", "li", "h1", "h2", "h3", "h4", "dt", "dd", "pre", "td", "div"}
    SKIP_TAGS = {"script", "style", "head"}
    SKIP_IDS = {"banner", "title"}
    SKIP_CLASSES = {"docnav", "toc", "navfooter", "navheader"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._depth = 0
        self._skip_at: int | None = None

    def _is_skipped(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        return tag in self.SKIP_TAGS or a.get("id") in self.SKIP_IDS or bool(classes & self.SKIP_CLASSES)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._depth += 1
        if self._skip_at is None and self._is_skipped(tag, attrs):
            self._skip_at = self._depth
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if self._skip_at == self._depth:
            self._skip_at = None
        self._depth -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._skip_at is None:
            self.parts.append(data)


def handbook_documents() -> list[str]:
    docs = []
    for path in sorted(HANDBOOK_DIR.glob("*.html")):
        parser = _HandbookText()
        parser.feed(path.read_text(encoding="utf-8"))
        paras = [re.sub(r"\s+", " ", p).strip() for p in "".join(parser.parts).split("\n\n")]
        text = normalise("\n\n".join(p for p in paras if p))
        if len(text) >= 300:
            docs.append(text)
    return docs


def foldoc_documents() -> list[str]:
    raw = gzip.open(FOLDOC_DICT, "rt", encoding="utf-8", errors="replace").read()
    entries, cur = [], []
    for line in raw.splitlines():
        if line and not line[0].isspace():  # a headword starts a new entry
            if cur:
                entries.append(cur)
            cur = [line]
        elif cur:
            cur.append(line.strip())
    entries.append(cur)
    texts = []
    for entry in entries:
        if entry[0].startswith("00-database") or len(" ".join(entry[1:]).strip()) < 40:
            continue  # header, or a bare synonym with no definition
        body = "\n".join(entry[1:])
        body = re.sub(r"\{([^}]*?)(?: \([^)]*\))?\}", r"\1", body)  # {cross refs}
        body = re.sub(r"<([^>]*)>", r"(\1)", body, count=1)  # <category> tag
        texts.append(normalise(f"{entry[0]}: {body}"))
    return _grouped(sorted(_sample_bytes(texts, FOLDOC_MAX_BYTES)), GROUP_SIZE)


def web_documents() -> list[str]:
    return fortune_documents() + pydoc_documents() + handbook_documents() + foldoc_documents()


# -------------------------------------------------------------------------- splitting
def split_documents(docs: list[str], seed: int, test_fraction: float = HELDOUT_FRACTION) -> dict[str, list[str]]:
    """Seeded split by document; validation and test each get ~5% of the bytes.

    Splitting by bytes (not document count) keeps the held-out splits usable even
    though document sizes are heavy-tailed (105 Wikipedia articles).
    """
    docs = sorted(set(docs))  # dedupe; sorted so the shuffle is input-order independent
    random.Random(seed).shuffle(docs)
    total = sum(len(d.encode()) for d in docs)
    budget = {"test": test_fraction * total, "validation": HELDOUT_FRACTION * total}
    splits: dict[str, list[str]] = {"test": [], "validation": [], "train": []}
    used = {"test": 0.0, "validation": 0.0}
    for doc in docs:
        name = next((s for s in ("test", "validation") if used[s] < budget[s]), "train")
        splits[name].append(doc)
        if name in used:
            used[name] += len(doc.encode())
    return splits


def write_split(path: Path, docs: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = DOC_SEPARATOR.join(docs).encode("utf-8")
    # mtime=0 and no filename keep the .gz bytes reproducible.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)


def build(
    name: str, make_docs: Callable[[], list[str]], out_dir: Path, test_fraction: float = HELDOUT_FRACTION
) -> None:
    docs = [d for d in make_docs() if d.strip()]
    for split, split_docs in split_documents(docs, SEED, test_fraction).items():
        write_split(out_dir / name / f"{split}.txt.gz", split_docs)
        n_bytes = sum(len(d.encode()) for d in split_docs)
        print(f"{name}/{split}: {len(split_docs)} docs, {n_bytes / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--only", nargs="*", default=None, help="corpora to build (default: all)")
    ap.add_argument(
        "--pkg-root", type=Path, default=Path("/"),
        help="where the Debian packages of the extra domains are (/ if installed, or a `dpkg -x` dir)",
    )  # fmt: skip
    args = ap.parse_args()
    builders: dict[str, Callable[[], list[str]]] = {"wiki": wiki_documents, "web": web_documents}
    builders |= {name: partial(make, args.pkg_root) for name, make in DOMAIN_BUILDERS.items()}
    for name, make_docs in builders.items():
        if args.only is None or name in args.only:
            build(name, make_docs, args.out, UNSEEN_TEST_FRACTION if name in UNSEEN else HELDOUT_FRACTION)


if __name__ == "__main__":
    main()
