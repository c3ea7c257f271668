"""ASR judges: pocketsphinx is deterministic and order-independent, and understands Festival speech."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import speechlike, write_wav
from zipper_cli.audio import read_audio
from zipper_cli.errors import ZipperError
from zipper_cli.judges import PocketsphinxJudge, wer

pytest.importorskip("pocketsphinx")

SENTENCES = ["set an alarm for seven thirty", "call my sister", "the pin is nine eight one eight"]


@pytest.fixture(scope="module")
def judge():
    return PocketsphinxJudge()


@pytest.fixture(scope="module")
def festival(tmp_path_factory):
    """Festival renderings of SENTENCES (16 kHz mono float32), or a skip when text2wave is missing."""
    if shutil.which("text2wave") is None:
        pytest.skip("Festival (text2wave) is not installed")
    out = []
    d = tmp_path_factory.mktemp("festival")
    for i, text in enumerate(SENTENCES):
        path = d / f"{i}.wav"
        subprocess.run(["text2wave", "-o", str(path)], input=text.encode(), check=True, capture_output=True,
                       timeout=60)
        out.append(read_audio(str(path)))
    return out


def test_festival_utterance_is_understood(judge, festival):
    hyp = judge.transcribe(festival[0])
    assert hyp == hyp.lower() and "  " not in hyp
    ref = SENTENCES[0].split()
    shared = sum(1 for w in ref if w in hyp.split())
    assert shared >= 4, hyp


def test_deterministic_and_order_independent(judge, festival):
    wavs = festival + [speechlike(1.5, seed=1)]
    first = judge.transcribe_many(wavs)
    assert judge.transcribe_many(wavs) == first
    assert judge.transcribe_many(wavs[::-1])[::-1] == first
    # an utterance scores the same after a very different one (front-end state is reset per utterance)
    loud_noise = (0.5 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    judge.transcribe(loud_noise)
    assert judge.transcribe(festival[1]) == first[1]
    assert PocketsphinxJudge().transcribe(festival[2]) == first[2]


def test_worker_processes_give_the_one_by_one_transcripts(judge, festival):
    wavs = (festival + [speechlike(1.0, seed=s) for s in range(3)]) * 3  # 18: two workers of 9
    one_by_one = [judge.transcribe(w) for w in wavs]
    assert PocketsphinxJudge(workers=2).transcribe_many(wavs) == one_by_one
    assert PocketsphinxJudge(workers=1).transcribe_many(wavs) == one_by_one


def test_same_file_twice_with_batch_cmn(judge, tmp_path):
    """cmn=batch and a fresh front end: the same WAV file gives the same transcript twice in one judge, with
    another file decoded in between (a new judge gives the same too: test_deterministic_and_order_independent)."""
    assert judge._decoder.config["cmn"] == "batch" and "cmn=batch" in judge.version
    path = write_wav(tmp_path / "a.wav", 2.0, seed=3)
    first = judge.transcribe(read_audio(str(path)))
    judge.transcribe(speechlike(1.0, seed=4))
    assert judge.transcribe(read_audio(str(path))) == first


def test_edge_inputs(judge):
    assert judge.transcribe(np.zeros(0, np.float32)) == ""
    assert isinstance(judge.transcribe(np.zeros(1600, np.float32)), str)
    with pytest.raises(ValueError, match="1-D"):
        judge.transcribe(np.zeros((2, 100), np.float32))


def test_name_and_version(judge):
    assert judge.name == "pocketsphinx"
    assert "pocketsphinx" in judge.version and "en-us" in judge.version


def test_missing_package_names_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # makes `import pocketsphinx` fail
    with pytest.raises(ZipperError, match="pip install pocketsphinx"):
        PocketsphinxJudge()


def test_wer_normalises_both_sides():
    assert wer(["Set an alarm for 7:30!"], ["set an alarm for seven thirty"]) == 0.0
    assert wer(["one two three four"], ["one two four"]) == 0.25
    with pytest.raises(ValueError):
        wer(["a"], [])
