"""The text normaliser and the sentencepiece text tokenizer."""

from __future__ import annotations

import pytest

from zipper_cli.errors import ZipperError
from zipper_cli.text_norm import normalize_text, number_to_words, ordinal_to_words
from zipper_cli.text_tokenizer import BOS_ID, EOS_ID, PAD_ID, TextTokenizer, TextTokenizerConfig, train_text_tokenizer


@pytest.mark.parametrize("raw, norm", [
    ("Hello, World!", "hello world"),
    ("Dr. Smith's 3rd-floor office", "dr smith's third floor office"),
    ("at 12:30 or 7:05 or 9:00", "at twelve thirty or seven oh five or nine o'clock"),
    ("$1,200.50 and $1", "one thousand two hundred dollars fifty cents and one dollar"),
    ("2.5 kg, 20%", "two point five kg twenty percent"),
    ("the 1,000,000th visitor", "the one millionth visitor"),
    ("call 0123", "call zero one two three"),
    ("'quoted' don't rock'n'roll", "quoted don't rock'n'roll"),
    ("\u201cCurly\u201d it\u2019s", "curly it's"),
    ("well-known and/or under_score", "well known and or under score"),
    ("  \t ", ""),
    ("Café NAÏVE", "café naïve"),
])
def test_normalize_text(raw, norm):
    assert normalize_text(raw) == norm


def test_numbers():
    assert number_to_words(0) == "zero"
    assert number_to_words(115) == "one hundred fifteen"
    assert number_to_words(2024) == "two thousand twenty four"
    assert number_to_words(3_000_012) == "three million twelve"
    assert ordinal_to_words(21) == "twenty first"
    assert ordinal_to_words(40) == "fortieth"
    assert ordinal_to_words(12) == "twelfth"


def _sentences():
    words = "set an alarm for seven thirty call mom stop recording turn the volume up".split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)) + f" {i}" for i in range(400)]


def test_sentencepiece_deterministic_and_round_trips(tmp_path):
    cfg = TextTokenizerConfig(vocab_size=80, seed=3)
    a = train_text_tokenizer(cfg, _sentences(), tmp_path / "a")
    b = train_text_tokenizer(cfg, _sentences(), tmp_path / "b")
    assert (tmp_path / "a" / "spm.model").read_bytes() == (tmp_path / "b" / "spm.model").read_bytes()
    assert a.checksum == b.checksum
    ids = a.encode("Set an alarm for 7")
    assert a.decode(ids) == "set an alarm for seven"
    assert min(ids) > EOS_ID  # specials are never produced by encoding text
    assert (a.sp.pad_id(), a.sp.bos_id(), a.sp.eos_id()) == (PAD_ID, BOS_ID, EOS_ID)
    loaded = TextTokenizer.load(tmp_path / "a")
    assert loaded.encode("call mom") == a.encode("call mom") and loaded.checksum == a.checksum


def test_tampered_model_is_refused(tmp_path):
    train_text_tokenizer(TextTokenizerConfig(vocab_size=60), _sentences(), tmp_path)
    (tmp_path / "spm.model").write_bytes(b"garbage")
    with pytest.raises(ZipperError, match="spm.model: missing or its checksum does not match"):
        TextTokenizer.load(tmp_path)


def test_text_tokenizer_validation(tmp_path):
    with pytest.raises(ZipperError, match=r"--text-vocab must be >= 8 \(got 2\)"):
        TextTokenizerConfig(vocab_size=2).validate()
    with pytest.raises(ZipperError, match="--text-model must be one of"):
        TextTokenizerConfig(model_type="wordpiece").validate()
    with pytest.raises(ZipperError, match="text role is empty"):
        train_text_tokenizer(TextTokenizerConfig(), ["...", "!!"], tmp_path)
