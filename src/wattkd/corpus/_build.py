"""Rebuild the bundled corpus from the raw public-domain texts (maintainers only).

    python -m wattkd.corpus._build /path/to/shared/data/corpus

Cleans the texts (Project Gutenberg header/footer, byte-order marks, trailing spaces),
splits them into documents of ~0.5-4 KB at natural boundaries (Bible chapters, scenes,
chapters, books, groups of sonnets) and writes one gzip file per sub-corpus with documents
separated by a form-feed line. Output is byte-identical for the same input (gzip mtime 0).
"""

from __future__ import annotations

import gzip
import io
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from wattkd.atomic import atomic_write_bytes

DOC_SEP = "\n\f\n"
MAX_CHARS = 4000
MIN_CHARS = 600

SHAKESPEARE = [
    "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
    "midsummer_nights_dream", "merchant_of_venice", "twelfth_night", "much_ado_about_nothing",
    "as_you_like_it", "richard_iii", "henry_v", "antony_and_cleopatra", "winters_tale",
    "sonnets",
]
MILTON = [
    "paradise_lost_no_introduction", "paradise_regained",
    "lallegro_il_penseroso_comus_and_lycidas", "areopagitica",
]
KJV_BOOKS = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers",
    "Deu": "Deuteronomy", "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth",
    "1Sm": "1 Samuel", "2Sm": "2 Samuel", "1Ki": "1 Kings", "2Ki": "2 Kings",
    "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra", "Neh": "Nehemiah",
    "Est": "Esther", "Job": "Job", "Psa": "Psalms", "Prv": "Proverbs", "Eccl": "Ecclesiastes",
    "SSol": "Song of Solomon", "Isa": "Isaiah", "Jer": "Jeremiah", "Lam": "Lamentations",
    "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel", "Amos": "Amos",
    "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah", "Nahum": "Nahum", "Hab": "Habakkuk",
    "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah", "Mal": "Malachi",
    "Mat": "Matthew", "Mark": "Mark", "Luke": "Luke", "John": "John", "Acts": "Acts",
    "Rom": "Romans", "1Cor": "1 Corinthians", "2Cor": "2 Corinthians", "Gal": "Galatians",
    "Eph": "Ephesians", "Phi": "Philippians", "Col": "Colossians", "1Th": "1 Thessalonians",
    "2Th": "2 Thessalonians", "1Tim": "1 Timothy", "2Tim": "2 Timothy", "Titus": "Titus",
    "Phmn": "Philemon", "Heb": "Hebrews", "Jas": "James", "1Pet": "1 Peter",
    "2Pet": "2 Peter", "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John", "Jude": "Jude",
    "Rev": "Revelation",
}
HEADING = re.compile(r"^(ACT\b|Act\b|SCENE\b|Scene\b|Chapter\b|CHAPTER\b|BOOK\b|THE \w+ BOOK\b"
                     r"|[IVXLC]+\.?$)")
VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg licence header and footer where present."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.MULTILINE | re.IGNORECASE)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project "
                    r"Gutenberg).*$", text, re.MULTILINE | re.IGNORECASE)
    if end:
        text = text[:end.start()]
    return text


def clean(text: str) -> str:
    text = strip_gutenberg(text.replace("\ufeff", "").replace("\r\n", "\n"))
    lines = [re.sub(r"^\.{4,}", "    ", ln.rstrip()) for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    if "\f" in text:
        raise ValueError("form feed in source text would break the document separator")
    return text


def group_blocks(blocks: Iterable[str]) -> Iterator[str]:
    """Greedily pack blank-line blocks into documents; a heading starts a new one."""
    cur: list[str] = []
    size = 0
    for block in blocks:
        heading = bool(HEADING.match(block)) and size >= MIN_CHARS
        if cur and (heading or (size + len(block) > MAX_CHARS and size >= MIN_CHARS)):
            yield "\n\n".join(cur)
            cur, size = [], 0
        cur.append(block)
        size += len(block) + 2
    if cur:
        yield "\n\n".join(cur)


def split_long(block: str) -> Iterator[str]:
    """Cut a block longer than MAX_CHARS (a whole book with no blank line) at line ends."""
    if len(block) <= MAX_CHARS:
        yield block
        return
    cur: list[str] = []
    size = 0
    for line in block.split("\n"):
        if cur and size + len(line) > MAX_CHARS:
            yield "\n".join(cur)
            cur, size = [], 0
        cur.append(line)
        size += len(line) + 1
    if cur:
        yield "\n".join(cur)


def prose_documents(path: Path) -> Iterator[str]:
    text = clean(path.read_text(encoding="utf-8", errors="strict"))
    return group_blocks(p for b in text.split("\n\n") if b.strip() for p in split_long(b))


def kjv_documents(path: Path) -> Iterator[str]:
    """One document per chapter (long chapters split at verse boundaries)."""
    chapter_key = None
    verses: list[str] = []
    title = ""

    def flush() -> Iterator[str]:
        # Cut a long chapter into near-equal parts rather than a full part and a scrap.
        total = sum(len(v) + 1 for v in verses)
        parts = max(1, -(-total // MAX_CHARS))
        target = total / parts
        lines: list[str] = []
        size = 0
        done = 0
        for v in verses:
            if not lines:
                lines.append(title if done == 0 else f"{title} (continued)")
            lines.append(v)
            size += len(v) + 1
            if size >= target * (done + 1) and done < parts - 1:
                yield "\n".join(lines)
                lines, done = [], done + 1
        if lines:
            yield "\n".join(lines)

    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = VERSE.match(line.strip())
        if not m:
            raise ValueError(f"{path}:{n}: not a verse line: {line[:60]!r}")
        book, chap, verse, body = m.groups()
        if (book, chap) != chapter_key:
            yield from flush()
            chapter_key, verses = (book, chap), []
            title = f"{KJV_BOOKS[book]} {chap}"
        verses.append(f"{verse} {body.strip()}")
    yield from flush()


def build(src: Path, dest: Path) -> dict[str, int]:
    plan = {
        "kjv": lambda: kjv_documents(src / "kjv.txt"),
        "shakespeare": lambda: (d for name in SHAKESPEARE
                                for d in prose_documents(src / "shakespeare" / f"{name}_gut.txt")),
        "milton": lambda: (d for name in MILTON
                           for d in prose_documents(src / "milton" / f"{name}_gut.txt")),
        "austen": lambda: prose_documents(src / "austen_pride_and_prejudice.txt"),
    }
    counts = {}
    for name, docs_fn in plan.items():
        docs = list(docs_fn())
        text = DOC_SEP.join(docs) + "\n"
        if "gutenberg" in text.lower():
            raise ValueError(f"{name}: Project Gutenberg boilerplate left after cleaning")
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
            gz.write(text.encode("utf-8"))
        atomic_write_bytes(dest / f"{name}.txt.gz", buf.getvalue())
        counts[name] = len(docs)
        print(f"{name}: {len(docs)} documents, {len(text):,} chars, "
              f"{len(buf.getvalue()):,} bytes gzip")
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m wattkd.corpus._build SHARED_CORPUS_DIR")
    build(Path(sys.argv[1]), Path(__file__).parent)
