"""scripts/bench.py: the tokenize benchmark makes its own audio where none is cached."""

from __future__ import annotations

import shutil

import pytest
from conftest import load_script

from zipper_cli.audio import read_audio
from zipper_cli.corpora.demo_text import MIN_WORDS


@pytest.mark.skipif(not shutil.which("festival"), reason="festival is not installed")
def test_tokenize_bench_synthesizes_demo_sentences_into_an_empty_cache(tmp_path):
    bench = load_script("bench")
    files = bench.festival_audio(tmp_path / "audio", seconds=5.0)
    assert [f.name for f in files] == ["b00000.wav", "b00001.wav", "b00002.wav", "b00003.wav"]
    for f in files:  # each a sentence of at least MIN_WORDS words: well over 0.5 s of 16 kHz audio
        assert read_audio(str(f)).size > 0.1 * MIN_WORDS * 16000
    assert bench.festival_audio(tmp_path / "audio", seconds=5.0) == files  # the cache is reused
