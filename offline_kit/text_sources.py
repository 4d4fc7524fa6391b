"""English sentences for the synthetic corpus, read straight from Debian packages (no network).

Sources (all public domain or permissively licensed, installed by ``offline_kit/install_data_deps.sh``):

- ``harvard``: the 720 IEEE "Harvard" sentences shipped as R data inside ``r-cran-stringr``
  (``stringr::sentences``), a zlib-compressed R serialization that we decode here.
- ``wordnet``: the quoted usage examples in WordNet 3.0 glosses (``wordnet-base``).
- ``web``: the World English Bible SWORD module (``sword-text-web``): zlib blocks of OSIS markup.
- ``help``: paragraphs of the GNOME desktop help (``gnome-user-docs``, Mallard XML): present-day instructions
  ("press", "menu", "password", "volume") that the three sources above almost never use.
- ``fortunes``: the everyday-English quotation files of fortune-mod (``fortunes``), one sentence at a time.

The first three are the default (the shipped corpora were built from them); ``help`` and ``fortunes`` are asked
for by name.

``load_sentences`` cleans, filters and deduplicates them; ``split_by_text`` makes a test split that shares no
sentence (after normalisation) with train.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import random
import re
import string
import struct
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from offline_kit.data_deps import DATA_PACKAGES, debian_file

DEFAULT_SOURCES = ("harvard", "wordnet", "web")
MALLARD = "{http://projectmallard.org/1.0/}"
# fortune-mod files of plain quotations; dialogue, verse, jokes about groups and ASCII art are left out.
FORTUNE_FILES = (
    "computers", "education", "food", "kids", "law", "linux", "medicine", "miscellaneous", "news", "people",
    "pets", "platitudes", "politics", "science", "sports", "wisdom", "work",
)  # fmt: skip
HARVARD_COUNT = 720

MIN_WORDS = 4
MAX_WORDS = 30
MAX_CHARS = 200
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:?!'\-]+$")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
MIN_VOCABULARY_LETTERS = 3
# Words said alone more than running text says them: letter names (written as transcripts write them), weekdays
# and months.  ``isolated_word`` draws one of these for a quarter of its clips.
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip
CLOSED_CLASS_WORDS = tuple(string.ascii_uppercase) + WEEKDAYS + MONTHS
CLOSED_CLASS_SHARE = 0.25
_TRANSLATE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": " - "})


@dataclass(frozen=True)
class Sentence:
    """One cleaned sentence and the source package it came from."""

    text: str
    source: str


def _zlib_chunks(raw: bytes) -> Iterator[bytes]:
    """Yield the objects of an R lazy-load database: [4-byte big-endian length][zlib stream] back to back."""
    pos = 0
    while pos < len(raw):
        expected = struct.unpack(">i", raw[pos : pos + 4])[0]
        decomp = zlib.decompressobj()
        data = decomp.decompress(raw[pos + 4 :])
        if len(data) != expected:
            raise ValueError(f"corrupt R data chunk at byte {pos}: {len(data)} bytes, header says {expected}")
        pos = len(raw) - len(decomp.unused_data)
        yield data


def _r_character_vector(blob: bytes) -> list[str] | None:
    """Decode an R XDR serialization (format 3) whose top object is a character vector; None otherwise."""
    if blob[:2] != b"X\n":
        return None
    pos = 2 + 4 * 3  # format version, writer R version, minimal reader R version
    (enc_len,) = struct.unpack(">i", blob[pos : pos + 4])
    pos += 4 + enc_len
    flags, length = struct.unpack(">ii", blob[pos : pos + 8])
    if flags & 0xFF != 16:  # STRSXP
        return None
    pos += 8
    out = []
    for _ in range(length):
        _char_flags, n = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        if n < 0:  # NA_character_
            continue
        out.append(blob[pos : pos + n].decode("utf-8"))
        pos += n
    return out


def harvard_sentences() -> list[str]:
    """The 720 Harvard sentences from stringr's ``sentences`` data set."""
    path = debian_file(DATA_PACKAGES["r-cran-stringr"], "r-cran-stringr")
    raw = path.read_bytes()
    for blob in _zlib_chunks(raw):
        strings = _r_character_vector(blob)
        if strings is not None and len(strings) == HARVARD_COUNT:
            return strings
    raise ValueError(f"{path}: no character vector of {HARVARD_COUNT} Harvard sentences found")


def wordnet_examples() -> list[str]:
    """Quoted usage examples from WordNet glosses (``data.noun|verb|adj|adv``)."""
    directory = debian_file(DATA_PACKAGES["wordnet-base"], "wordnet-base").parent
    out = []
    for pos_name in ("noun", "verb", "adj", "adv"):
        path = directory / f"data.{pos_name}"
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:  # licence header / no gloss
                continue
            gloss = line.split(" | ", 1)[1]
            out.extend(re.findall(r'"([^"]+)"', gloss))
    return out


_OSIS_DROP = re.compile(r"<(note|title)\b[^>]*>.*?</\1>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SENTENCE_END = re.compile(r"(?<=[.?!])[\"')\]]*\s+(?=[\"'(\[]?[A-Z])")


def _sword_verses(directory: Path, testament: str) -> Iterator[str]:
    """Raw OSIS text of every verse of one testament of a SWORD zText module (zlib, BlockType=BOOK)."""
    bzs = (directory / f"{testament}.bzs").read_bytes()
    bzv = (directory / f"{testament}.bzv").read_bytes()
    bzz = (directory / f"{testament}.bzz").read_bytes()
    blocks = [struct.unpack("<III", bzs[i : i + 12]) for i in range(0, len(bzs), 12)]
    cache: dict[int, bytes] = {}
    for i in range(0, len(bzv), 10):
        block, start, size = struct.unpack("<IIH", bzv[i : i + 10])
        if size == 0:
            continue
        if block not in cache:
            offset, compressed, _ = blocks[block]
            cache = {block: zlib.decompress(bzz[offset : offset + compressed])}
        yield cache[block][start : start + size].decode("utf-8")


def web_bible_sentences() -> list[str]:
    """Sentences of the World English Bible: OSIS markup, footnotes and headings stripped, verses joined."""
    directory = debian_file(DATA_PACKAGES["sword-text-web"], "sword-text-web").parent
    out = []
    for testament in ("ot", "nt"):
        text = " ".join(_sword_verses(directory, testament))
        text = html.unescape(_TAG.sub(" ", _OSIS_DROP.sub(" ", text)))
        text = re.sub(r"\s+", " ", text.translate(_TRANSLATE))
        out.extend(_SENTENCE_END.split(text))
    return out


def gnome_help_sentences() -> list[str]:
    """Sentences of every paragraph of the GNOME help pages (markup inside a paragraph kept as its text)."""
    help_root = debian_file(DATA_PACKAGES["gnome-user-docs"], "gnome-user-docs").parent.parent
    out = []
    for page in sorted(help_root.glob("*/*.page")):
        for paragraph in ElementTree.parse(page).getroot().iter(f"{MALLARD}p"):
            out.extend(_SENTENCE_END.split(" ".join("".join(paragraph.itertext()).split())))
    return out


def fortune_sentences() -> list[str]:
    """Sentences of the quotations in ``FORTUNE_FILES``: entries end at a line of "%", attributions dropped."""
    directory = debian_file(DATA_PACKAGES["fortunes"], "fortunes").parent
    out = []
    for name in FORTUNE_FILES:
        for entry in re.split(r"^%$", (directory / name).read_text(encoding="utf-8"), flags=re.M):
            lines = [line for line in entry.splitlines() if not line.strip().startswith("--")]
            out.extend(_SENTENCE_END.split(" ".join(" ".join(lines).split())))
    return out


def clean(text: str) -> str | None:
    """Normalise quotes/space and keep only sentences a TTS engine reads unambiguously; None = reject."""
    text = re.sub(r"\s+", " ", text.translate(_TRANSLATE).replace('"', " ")).strip()
    text = re.sub(r"\s+([,.;:?!])", r"\1", text).strip(" -;:,'")
    if not text or not _ALLOWED.match(text) or len(text) > MAX_CHARS:
        return None
    if not MIN_WORDS <= len(text.split()) <= MAX_WORDS or re.search(r"\d", text):
        return None
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def text_key(text: str) -> str:
    """Identity of a sentence for deduplication and split disjointness (case, punctuation, spacing ignored)."""
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def sentence_words(text: str) -> list[str]:
    """The words of a sentence with the punctuation at their edges stripped ("don't" keeps its apostrophe)."""
    return [word for word in (w.strip(",.;:?!-'\"") for w in text.split()) if word]


def short_phrase(text: str, rng: random.Random, max_words: int) -> str:
    """A span of 1 to ``max_words`` words of a sentence, edge punctuation stripped.

    Sentences never teach a model to stop after one word or a short command; these spans do.  A single word is
    drawn from the words of four letters or more, so isolated words are content words, not "the" or "of".
    """
    words = sentence_words(text)
    if not words:
        raise ValueError(f"no words in {text!r}")
    n = rng.randint(1, min(max_words, len(words)))
    if n == 1:
        return rng.choice([w for w in words if len(w) >= 4] or words)
    start = rng.randrange(len(words) - n + 1)
    return " ".join(words[start : start + n])


def word_vocabulary(texts: Iterable[str], size: int) -> list[str]:
    """The ``size`` most frequent words of three letters or more in ``texts``, most frequent first.

    A word is spelt in lowercase unless it is only ever seen capitalised inside a sentence ("Israel"): the
    capital a sentence starts with says nothing.  Ties go alphabetically, so the list depends only on the texts.
    """
    counts: Counter[str] = Counter()
    inner_spellings: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for text in texts:
        for position, word in enumerate(sentence_words(text)):
            if len(word) >= MIN_VOCABULARY_LETTERS and _WORD.fullmatch(word):
                counts[word.lower()] += 1
                if position:
                    inner_spellings[word.lower()][word] += 1
    ranked = sorted(counts, key=lambda key: (-counts[key], key))[:size]
    only_capitalised = {key for key in ranked if inner_spellings[key] and key not in inner_spellings[key]}
    return [inner_spellings[key].most_common(1)[0][0] if key in only_capitalised else key for key in ranked]


def isolated_word(rng: random.Random, vocabulary: list[str]) -> tuple[str, str]:
    """(word, source) for a clip of one word: a letter, weekday or month name, or a frequent word.

    Frequent words of running text are rarely letters, weekdays or months, yet people say those alone all the
    time (spelling, dates), so ``CLOSED_CLASS_SHARE`` of the clips draw from those.
    """
    if rng.random() < CLOSED_CLASS_SHARE:
        return rng.choice(CLOSED_CLASS_WORDS), "closed-class"
    return rng.choice(vocabulary), "vocabulary"


def number_phrase(rng: random.Random) -> str:
    """A number written the way transcripts write it: a cardinal in digits (0-999) or an ordinal (1st-31st)."""
    if rng.random() < 0.3:
        day = rng.randint(1, 31)
        suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
        return f"{day}{suffix}"
    return str(rng.choice([rng.randint(0, 20), rng.randint(21, 99), rng.randint(100, 999)]))


READERS = {
    "harvard": harvard_sentences,
    "wordnet": wordnet_examples,
    "web": web_bible_sentences,
    "help": gnome_help_sentences,
    "fortunes": fortune_sentences,
}
SOURCES = tuple(READERS)


def load_sentences(sources: Iterable[str] = DEFAULT_SOURCES) -> list[Sentence]:
    """Cleaned, deduplicated sentences from the given sources, in a stable order (first source wins)."""
    seen: set[str] = set()
    out = []
    for source in sources:
        if source not in READERS:
            raise ValueError(f"unknown text source {source!r}; choose from {sorted(READERS)}")
        for raw in READERS[source]():
            text = clean(raw)
            if text is None or text_key(text) in seen:
                continue
            seen.add(text_key(text))
            out.append(Sentence(text, source))
    return out


def is_test_text(text: str, test_fraction: float, seed: int) -> bool:
    """Hash-based split: a sentence's split depends only on its text and the seed, never on list order."""
    digest = hashlib.sha256(f"{seed}:{text_key(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def split_by_text(
    sentences: list[Sentence], test_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Sentence], list[Sentence]]:
    """(train, test) with no normalised sentence in both."""
    train, test = [], []
    for sentence in sentences:
        (test if is_test_text(sentence.text, test_fraction, seed) else train).append(sentence)
    return train, test


def main(argv: list[str] | None = None) -> None:
    """Print how many sentences each source yields, with examples."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), choices=SOURCES)
    parser.add_argument("--examples", type=int, default=2, help="sentences to show per source")
    args = parser.parse_args(argv)
    sentences = load_sentences(args.sources)
    counts = Counter(s.source for s in sentences)
    for source in args.sources:
        print(f"{source}: {counts[source]} sentences")
        for sentence in [s for s in sentences if s.source == source][: args.examples]:
            print(f"    {sentence.text}")
    print(f"total: {len(sentences)} unique sentences")


if __name__ == "__main__":
    main()
