"""The one text normaliser, used for the text tokenizer, the built-in corpora and (later) WER.

normalize_text("Dr. Smith's 3rd-floor office, 12:30!") -> "dr smith's third floor office twelve thirty"

Rules, in order:
  1. Unicode NFKC; lowercase; curly quotes and apostrophes -> ASCII.
  2. Numbers as words: ordinals ("3rd" -> "third"), times ("12:30" -> "twelve thirty"),
     decimals ("2.5" -> "two point five"), thousands separators ("1,200" -> "one thousand two hundred"),
     plain integers ("42" -> "forty two"), "%" -> "percent", "$5.25" -> "five dollars twenty five cents".
  3. Hyphens, slashes and underscores -> spaces.
  4. Apostrophes are kept inside words ("don't", "smith's") and dropped elsewhere.
  5. Every other character that is not a letter or digit -> space; whitespace collapsed.
"""

from __future__ import annotations

import re
import unicodedata

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}


def number_to_words(n: int) -> str:
    """Cardinal English words for a non-negative integer: 312 -> 'three hundred twelve'."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for value, name in _SCALES:
        if n >= value:
            rest = n % value
            return number_to_words(n // value) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


def ordinal_to_words(n: int) -> str:
    """23 -> 'twenty third'."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _digits_to_words(digits: str) -> str:
    # Very long digit strings (ids, phone numbers) read digit by digit, as people say them.
    if len(digits) > 15 or (len(digits) > 1 and digits.startswith("0")):
        return " ".join(_ONES[int(d)] for d in digits)
    return number_to_words(int(digits))


_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u201c": '"', "\u201d": '"'})
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b")
_TIME = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_MONEY = re.compile(r"\$(\d+)(?:\.(\d\d))?\b")
_GROUPED = re.compile(r"\b\d{1,3}(?:,\d{3})+(?!\d)")
_DECIMAL = re.compile(r"\b(\d+)\.(\d+)\b")
_INTEGER = re.compile(r"\d+")


def _time(m: re.Match) -> str:
    hours, minutes = int(m.group(1)), int(m.group(2))
    if minutes == 0:
        return number_to_words(hours) + " o'clock"
    return number_to_words(hours) + (" oh " if minutes < 10 else " ") + number_to_words(minutes)


def _money(m: re.Match) -> str:
    dollars = int(m.group(1))
    words = number_to_words(dollars) + (" dollar" if dollars == 1 else " dollars")
    if m.group(2) and int(m.group(2)):
        cents = int(m.group(2))
        words += " " + number_to_words(cents) + (" cent" if cents == 1 else " cents")
    return " " + words + " "


def normalize_text(text: str) -> str:
    """Normalise one transcript or sentence to lowercase spoken-form words (see the module docstring)."""
    s = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    s = _GROUPED.sub(lambda m: m.group(0).replace(",", ""), s)
    s = _ORDINAL.sub(lambda m: " " + ordinal_to_words(int(m.group(1))) + " ", s)
    s = _TIME.sub(lambda m: " " + _time(m) + " ", s)
    s = _MONEY.sub(_money, s)
    s = _DECIMAL.sub(lambda m: f" {_digits_to_words(m.group(1))} point {' '.join(_ONES[int(d)] for d in m.group(2))} ", s)
    s = s.replace("%", " percent ")
    s = _INTEGER.sub(lambda m: " " + _digits_to_words(m.group(0)) + " ", s)
    s = re.sub(r"[-_/\u2010-\u2015]", " ", s)
    s = re.sub(r"(?<![^\W\d_])'|'(?![^\W\d_])", " ", s)  # apostrophes only between letters survive
    s = re.sub(r"[^\w']+", " ", s)
    s = s.replace("_", " ")
    return " ".join(s.split())
