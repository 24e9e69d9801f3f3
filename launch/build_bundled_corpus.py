r"""Regenerates the bundled KJV corpus and labelled task in bert_jax/data/bundled/.

The source is the King James Bible as shipped by the Debian package ``bible-kjv-text``,
read through the ``bible`` program of the package ``bible-kjv``:

  apt-get install -y bible-kjv bible-kjv-text
  python -m launch.build_bundled_corpus

The output is deterministic (fixed split rule, seeded hash sampling, gzip without
timestamps), so running it again on the same package version reproduces the committed
files byte for byte. Nothing at run time needs the Debian package: the generated files are
committed and installed with ``bert_jax``.

What it writes (see the generated README.md for sizes):
  kjv_train.txt.gz, kjv_valid.txt.gz  one verse per line, blank line between chapters;
                                      every 33rd chapter in canonical order is validation.
  kjv_task_{train,dev}.jsonl.gz       verse -> section of the Bible (6 classes), train
                                      verses from train chapters, dev from validation ones.
  kjv_task_labels.json                the class names in label order.
  README.md                           provenance, licence, split rule, sizes, this command.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import io
import json
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence

from absl import app, flags, logging

from launch import errors

from bert_jax.data import bundled

_BIBLE = flags.DEFINE_string(
    "bible", "bible", "The `bible` program of the Debian package bible-kjv."
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", str(bundled.BUNDLED_DIR), "Where to write the files."
)
_VALID_EVERY = flags.DEFINE_integer(
    "valid_every", 33, "Every N-th chapter in canonical order goes to validation."
)
_SPLIT_WORDS = flags.DEFINE_integer(
    "split_words", 60,
    "Verses longer than this many words are split at sentence-final punctuation.",
)
_TASK_TRAIN_PER_CLASS = flags.DEFINE_integer(
    "task_train_per_class", 1000, "Most task train examples per class."
)
_TASK_DEV_PER_CLASS = flags.DEFINE_integer(
    "task_dev_per_class", 100, "Most task dev examples per class."
)
_TASK_MIN_WORDS = flags.DEFINE_integer(
    "task_min_words", 5, "Verses with fewer words are left out of the task."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the task's example sampling.")

# The 66 books in canonical (KJV) order: the abbreviation `bible -f` prints, the full name.
BOOKS: tuple[tuple[str, str], ...] = (
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"), ("1Ki", "1 Kings"), ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"), ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"),
    ("Prv", "Proverbs"), ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"),
    ("Isa", "Isaiah"), ("Jer", "Jeremiah"), ("Lam", "Lamentations"), ("Eze", "Ezekiel"),
    ("Dan", "Daniel"), ("Hos", "Hosea"), ("Joel", "Joel"), ("Amos", "Amos"),
    ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nahum", "Nahum"),
    ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"),
    ("Mal", "Malachi"), ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"),
    ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"), ("1Cor", "1 Corinthians"),
    ("2Cor", "2 Corinthians"), ("Gal", "Galatians"), ("Eph", "Ephesians"),
    ("Phi", "Philippians"), ("Col", "Colossians"), ("1Th", "1 Thessalonians"),
    ("2Th", "2 Thessalonians"), ("1Tim", "1 Timothy"), ("2Tim", "2 Timothy"),
    ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"), ("Jas", "James"),
    ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"), ("2Jn", "2 John"),
    ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
)

# The task's classes, in label order: (name, first book, last book), both inclusive.
SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("law", "Genesis", "Deuteronomy"),
    ("history", "Joshua", "Esther"),
    ("wisdom_poetry", "Job", "Song of Solomon"),
    ("prophets", "Isaiah", "Malachi"),
    ("gospels_acts", "Matthew", "Acts"),
    ("epistles_revelation", "Romans", "Revelation"),
)

_REFERENCE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")
# Sentence boundary inside a long verse: . ? or ! then a space then a capital letter.
_SENTENCE_END = re.compile(r"(?<=[.?!]) +(?=[A-Z])")


@dataclasses.dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str


@dataclasses.dataclass(frozen=True)
class Chapter:
    index: int  # 0-based position in canonical order.
    book: str
    chapter: int
    verses: tuple[Verse, ...]


def read_bible(bible: str) -> list[Verse]:
    """Every verse, in canonical order, from ``bible -f Gen1:1-Rev22:21``."""
    program = shutil.which(bible)
    if program is None:
        raise FileNotFoundError(
            f"{bible!r} not found; install it with `apt-get install bible-kjv bible-kjv-text`."
        )
    # -f turns pretty-printing off: one "Ge1:1 text" line per verse.
    out = subprocess.run(
        [program, "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True
    ).stdout.decode("ascii")
    names = dict(BOOKS)
    verses = []
    for line in out.splitlines():
        if not line.strip():
            continue
        match = _REFERENCE.match(line)
        if match is None:
            raise ValueError(f"Unexpected line from {program}: {line!r}")
        verses.append(Verse(
            book=names[match["book"]],
            chapter=int(match["chapter"]),
            verse=int(match["verse"]),
            text=" ".join(match["text"].split()),
        ))
    books_seen = list(dict.fromkeys(v.book for v in verses))
    if books_seen != [name for _, name in BOOKS]:
        raise ValueError(f"Books out of canonical order or missing: {books_seen}")
    return verses


def group_chapters(verses: Iterable[Verse]) -> list[Chapter]:
    """Verses grouped into chapters, in order; checks the verse numbering."""
    grouped: dict[tuple[str, int], list[Verse]] = {}
    for verse in verses:
        grouped.setdefault((verse.book, verse.chapter), []).append(verse)
    chapters = []
    for index, ((book, number), chapter_verses) in enumerate(grouped.items()):
        numbers = [v.verse for v in chapter_verses]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"{book} {number}: verses not numbered 1..n: {numbers}")
        chapters.append(Chapter(index, book, number, tuple(chapter_verses)))
    return chapters


def verse_sentences(text: str, split_words: int) -> list[str]:
    """A verse as corpus sentences: whole, or cut at sentence ends if it is very long."""
    if len(text.split()) <= split_words:
        return [text]
    return [s for s in _SENTENCE_END.split(text) if s]


def is_validation(chapter: Chapter, every: int) -> bool:
    return (chapter.index + 1) % every == 0


def section_of_book() -> dict[str, int]:
    order = [name for _, name in BOOKS]
    labels = {}
    for label, (_, first, last) in enumerate(SECTIONS):
        for name in order[order.index(first): order.index(last) + 1]:
            labels[name] = label
    if len(labels) != len(order):
        raise ValueError("SECTIONS does not cover every book exactly once.")
    return labels


def order_key(verse: Verse, seed: int) -> str:
    """A seeded hash of the verse's reference: sampling and shuffling order.

    A hash instead of a PRNG keeps the order independent of library versions.
    """
    return hashlib.sha256(f"{seed}:{verse.book}:{verse.chapter}:{verse.verse}".encode()).hexdigest()


def sample(items: Sequence[Verse], k: int, seed: int) -> list[Verse]:
    """Up to k items: the first k by :func:`order_key`."""
    return sorted(items, key=lambda v: order_key(v, seed))[:k]


def gzip_bytes(data: bytes) -> bytes:
    """gzip -9 with no file name and a zero timestamp, so output is reproducible."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buffer, mtime=0) as f:
        f.write(data)
    return buffer.getvalue()


def corpus_text(chapters: Iterable[Chapter], split_words: int) -> str:
    documents = []
    for chapter in chapters:
        sentences = [s for v in chapter.verses for s in verse_sentences(v.text, split_words)]
        documents.append("\n".join(sentences))
    return "\n\n".join(documents) + "\n"


def dpkg_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    out_dir = pathlib.Path(_OUT_DIR.value)
    out_dir.mkdir(parents=True, exist_ok=True)

    verses = read_bible(_BIBLE.value)
    chapters = group_chapters(verses)
    logging.info("%d verses in %d chapters.", len(verses), len(chapters))
    splits = {
        "train": [c for c in chapters if not is_validation(c, _VALID_EVERY.value)],
        "validation": [c for c in chapters if is_validation(c, _VALID_EVERY.value)],
    }
    corpus_stats = {}
    for split, split_chapters in splits.items():
        text = corpus_text(split_chapters, _SPLIT_WORDS.value).encode("utf-8")
        compressed = gzip_bytes(text)
        path = out_dir / bundled.corpus_path(split).name
        path.write_bytes(compressed)
        corpus_stats[split] = dict(
            file=path.name,
            documents=len(split_chapters),
            verses=sum(len(c.verses) for c in split_chapters),
            sentences=sum(1 for line in text.decode().splitlines() if line),
            raw_bytes=len(text),
            gz_bytes=len(compressed),
        )
        logging.info("%s: %s", split, corpus_stats[split])

    # The task: verse -> section. A text that occurs more than once in the Bible is left
    # out if it occurs in two sections (ambiguous label), and dev leaves out any text that
    # also occurs in a train chapter, so no dev example is seen in pretraining or training.
    labels = section_of_book()
    label_names = [name for name, _, _ in SECTIONS]
    sections_of_text: dict[str, set[int]] = collections.defaultdict(set)
    for verse in verses:
        sections_of_text[verse.text].add(labels[verse.book])
    train_texts = {v.text for c in splits["train"] for v in c.verses}
    task_stats = {}
    for split, corpus_split, per_class in (
        ("train", "train", _TASK_TRAIN_PER_CLASS.value),
        ("dev", "validation", _TASK_DEV_PER_CLASS.value),
    ):
        candidates: dict[int, list[Verse]] = collections.defaultdict(list)
        seen: set[str] = set()
        for chapter in splits[corpus_split]:
            for verse in chapter.verses:
                if (len(verse.text.split()) < _TASK_MIN_WORDS.value
                        or len(sections_of_text[verse.text]) > 1
                        or verse.text in seen
                        or (split == "dev" and verse.text in train_texts)):
                    continue
                seen.add(verse.text)
                candidates[labels[verse.book]].append(verse)
        examples = []
        counts = {}
        for label, name in enumerate(label_names):
            chosen = sample(candidates[label], per_class, _SEED.value)
            counts[name] = (len(chosen), len(candidates[label]))
            examples.extend((verse, label) for verse in chosen)
        # Classes interleaved in a seeded order, so a reader that does not shuffle still
        # sees every class early.
        examples.sort(key=lambda e: order_key(e[0], _SEED.value))
        lines = [
            json.dumps({"text": v.text, "label": label, "label_name": label_names[label]},
                       ensure_ascii=False)
            for v, label in examples
        ]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        compressed = gzip_bytes(data)
        path = out_dir / bundled.task_path(split).name
        path.write_bytes(compressed)
        task_stats[split] = dict(file=path.name, counts=counts, gz_bytes=len(compressed))
        logging.info("task %s: %s", split, task_stats[split])
    (out_dir / bundled.TASK_LABELS_FILE).write_text(json.dumps(label_names, indent=2) + "\n")

    readme = render_readme(
        version=dpkg_version("bible-kjv-text"),
        n_verses=len(verses),
        n_chapters=len(chapters),
        corpus_stats=corpus_stats,
        task_stats=task_stats,
    )
    (out_dir / "README.md").write_text(readme)
    logging.info("Wrote %s", out_dir)


def render_readme(
    *,
    version: str,
    n_verses: int,
    n_chapters: int,
    corpus_stats: dict[str, dict],
    task_stats: dict[str, dict],
) -> str:
    """The README.md of the bundled directory, with the sizes of this build."""
    every = _VALID_EVERY.value
    rows = "\n".join(
        f"| {split} | `{s['file']}` | {s['documents']:,} | {s['verses']:,} | "
        f"{s['sentences']:,} | {s['raw_bytes']:,} | {s['gz_bytes']:,} |"
        for split, s in corpus_stats.items()
    )
    def kept_of(split: str, name: str) -> str:
        kept, candidates = task_stats[split]["counts"][name]
        return f"{kept:,} of {candidates:,}"

    section_rows = "\n".join(
        f"| {label} | `{name}` | {first} – {last} | {kept_of('train', name)} | "
        f"{kept_of('dev', name)} |"
        for label, (name, first, last) in enumerate(SECTIONS)
    )
    totals = {
        split: sum(n for n, _ in task_stats[split]["counts"].values()) for split in task_stats
    }
    return f"""\
# Bundled corpus and task: the King James Bible

Generated by `launch/build_bundled_corpus.py`; do not edit by hand. Read them with
`bert_jax.data.bundled` (`corpus_path`, `read_documents`, `task_path`, `task_label_names`).

## Source and licence

- Text: the King James (Authorized) Version of the Bible, {n_verses:,} verses in
  {n_chapters:,} chapters of 66 books, from the Debian package `bible-kjv-text` version
  {version}, read with the `bible` program of the package `bible-kjv` (`bible -f
  Gen1:1-Rev22:21`, one verse per line with its reference).
- Licence: the KJV text (1611) is in the public domain. In the United Kingdom only, the
  Authorized Version is subject to the Crown's perpetual letters patent, administered by
  the King's Printer (Cambridge University Press); this affects printing/reproduction in
  the UK, not use elsewhere. The Debian packaging is GPL-2+, but no packaging code is
  included here, only the text.

## Corpus

Format: one sentence per line, a blank line between documents (the format of the original
BERT pretraining data), UTF-8, gzip -9.

- A document is one chapter. A sentence is one verse, its reference removed and its
  whitespace normalised; a verse longer than {_SPLIT_WORDS.value} words is cut into
  sentences after `.`, `?` or `!` followed by a space and a capital letter.
- Split: chapters are numbered 1..{n_chapters:,} in canonical order (Genesis 1 ..
  Revelation 22); a chapter whose number is a multiple of {every} ({every}, {2 * every},
  {3 * every}, ...) is validation, the rest train. No chapter is in both.

| split | file | documents | verses | sentences | bytes (raw) | bytes (gz) |
|---|---|---:|---:|---:|---:|---:|
{rows}

## Labelled task: which section of the Bible is this verse from?

Sentence classification, 6 classes, JSON lines `{{"text": str, "label": int, "label_name":
str}}` (`kjv_task_train.jsonl.gz`, `kjv_task_dev.jsonl.gz`); `kjv_task_labels.json` lists
the label names in label order.

- Train examples come only from train chapters, dev examples only from validation chapters.
- A verse is a candidate if it has at least {_TASK_MIN_WORDS.value} words. Verses whose
  text occurs in two sections are dropped (ambiguous label), texts are de-duplicated within
  a split, and a dev verse whose text also occurs in any train chapter is dropped.
- From the candidates, up to {_TASK_TRAIN_PER_CLASS.value} per class are kept for train and up to
  {_TASK_DEV_PER_CLASS.value} for dev, chosen by the SHA-256 of `"{_SEED.value}:book:chapter:verse"`
  (seed {_SEED.value}); the kept examples are written in that hash order (classes
  interleaved).

| label | name | books | train (kept of candidates) | dev (kept of candidates) |
|---:|---|---|---:|---:|
{section_rows}
| | total | | {totals['train']:,} | {totals['dev']:,} |

## Regenerate

```
apt-get install -y bible-kjv bible-kjv-text
python -m launch.build_bundled_corpus
```

With the same package version the output is byte-identical (gzip without file name or
timestamp, deterministic split and sampling).
"""


if __name__ == "__main__":
    errors.run(main)
