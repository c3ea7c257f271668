"""The `english` text: WordNet example sentences and King James Bible verses, in the ASR normal form.

WordNet glosses carry short example sentences in double quotes ("the soldiers were fired"); those of
4-14 words are read aloud for the audio roles. The remaining quotes plus the Bible (split at sentence
and clause punctuation) are the text-only role. Both come from Debian packages, so this works offline.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

from ..errors import ZipperError
from ..text_norm import normalize_text

INSTALL_HINT = "install with: apt-get install -y wordnet-base bible-kjv-text bible-kjv"
WORDNET_DIRS = ("/usr/share/wordnet", "/usr/share/wordnet/dict", "/usr/local/WordNet-3.0/dict")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
AUDIO_WORDS = (4, 14)  # quotes read aloud: long enough to carry context, short enough to synthesize fast
TEXT_WORDS = (3, 30)  # text-only sentences


def normalize(text: str) -> str | None:
    """The shared normal form (zipper_cli.text_norm), restricted to plain ASCII words; None if unusable."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    s = normalize_text(ascii_text)
    return s if s and re.fullmatch(r"[a-z' ]+", s) else None


def n_words(s: str) -> int:
    return s.count(" ") + 1


def find_wordnet() -> Path:
    for d in WORDNET_DIRS:
        if all((Path(d) / f).is_file() for f in WORDNET_FILES):
            return Path(d)
    raise ZipperError(f"the english corpus needs WordNet's data files (data.noun ...), none found in "
                      f"{', '.join(WORDNET_DIRS)}; {INSTALL_HINT}")


def check_installed() -> None:
    """Raise a one-line ZipperError saying what to install when WordNet or the Bible is missing."""
    find_wordnet()
    if shutil.which("bible") is None or not Path("/usr/lib/bible.data").exists():
        raise ZipperError(f"the english corpus needs the King James Bible text and its reader `bible`; {INSTALL_HINT}")


def wordnet_quotes(wordnet_dir: Path | None = None) -> list[str]:
    """Every distinct example sentence in the WordNet glosses, normalised, sorted (stable across runs)."""
    wordnet_dir = wordnet_dir or find_wordnet()
    quotes = set()
    for name in WORDNET_FILES:
        with open(wordnet_dir / name, encoding="latin-1") as f:
            for line in f:
                # Lines starting with spaces are the licence header; the gloss follows " | ".
                if line.startswith("  ") or " | " not in line:
                    continue
                for q in re.findall(r'"([^"]*)"', line.split(" | ", 1)[1]):
                    if (s := normalize(q)) is not None:
                        quotes.add(s)
    return sorted(quotes)


def bible_sentences() -> list[str]:
    """KJV verses split at . ? ! ; : into normalised sentences of TEXT_WORDS words, distinct, sorted."""
    try:
        out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True,
                             check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ZipperError(f"could not read the King James Bible with `bible` ({e}); {INSTALL_HINT}") from None
    lo, hi = TEXT_WORDS
    sentences = set()
    for line in out.splitlines():
        verse = line.partition(" ")[2]  # "Ge1:1 In the beginning ..." -> drop the reference
        for piece in re.split(r"[.?!;:]", verse):
            if (s := normalize(piece)) is not None and lo + 1 <= n_words(s) <= hi:
                sentences.add(s)
    if len(sentences) < 1000:
        raise ZipperError(f"`bible` printed only {len(sentences)} usable sentences; {INSTALL_HINT}")
    return sorted(sentences)


@functools.lru_cache(maxsize=1)  # a few seconds of parsing; the packages do not change within a process
def english_pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sentences to read aloud, extra text-only sentences), each distinct and sorted; disjoint."""
    check_installed()
    quotes = wordnet_quotes()
    audio = [q for q in quotes if AUDIO_WORDS[0] <= n_words(q) <= AUDIO_WORDS[1]]
    chosen = set(audio)
    other_quotes = [q for q in quotes if q not in chosen and TEXT_WORDS[0] <= n_words(q) <= TEXT_WORDS[1]]
    extra = sorted(set(other_quotes).union(bible_sentences()) - chosen)
    return tuple(audio), tuple(extra)
