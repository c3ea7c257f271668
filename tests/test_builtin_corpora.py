"""Built-in corpora: deterministic text, disjoint roles, a tiny real synthesis, the cache, config errors."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from zipper_cli.corpora import demo_text, english_text, synth
from zipper_cli.corpora.builtin import ROLES, BuiltinCorpusConfig, build_builtin_corpus, plan_sentences
from zipper_cli.errors import ZipperError
from zipper_cli.text_norm import normalize_text

HAVE_FESTIVAL = shutil.which("festival") is not None
HAVE_WORDNET = any(Path(d, "data.noun").is_file() for d in english_text.WORDNET_DIRS) and bool(shutil.which("bible"))
SMALL = dict(n_text=300, n_speech=200, n_aligned=100, n_dev=50, n_test=50)


def _disjoint(plan: dict[str, list[str]]) -> None:
    for role, sents in plan.items():
        assert len(set(sents)) == len(sents), f"duplicates inside {role}"
    for role in ROLES:
        if role != "test":
            assert not set(plan["test"]) & set(plan[role]), f"test sentence in {role}"
        if role not in ("dev", "test"):
            assert not set(plan["dev"]) & set(plan[role]), f"dev sentence in {role}"


def test_demo_text_is_deterministic_from_seed():
    a = plan_sentences(BuiltinCorpusConfig("demo", seed=0, **SMALL))
    b = plan_sentences(BuiltinCorpusConfig("demo", seed=0, **SMALL))
    c = plan_sentences(BuiltinCorpusConfig("demo", seed=1, **SMALL))
    assert a == b
    assert a["test"] != c["test"] and a["text"] != c["text"]


def test_demo_roles_disjoint_and_counts_match():
    cfg = BuiltinCorpusConfig("demo", seed=3, **SMALL)
    plan = plan_sentences(cfg)
    assert {r: len(plan[r]) for r in ROLES} == {r: SMALL[f"n_{r}"] for r in ROLES}
    _disjoint(plan)


def test_demo_test_set_does_not_depend_on_other_sizes():
    a = plan_sentences(BuiltinCorpusConfig("demo", seed=0, **SMALL))
    b = plan_sentences(BuiltinCorpusConfig("demo", seed=0, **{**SMALL, "n_text": 10, "n_speech": 7}))
    assert a["test"] == b["test"] and a["dev"] == b["dev"]


def test_demo_defaults_and_sentence_form():
    cfg = BuiltinCorpusConfig("demo")
    assert cfg.sizes() == {"text": 30000, "speech": 4000, "aligned": 2000, "dev": 200, "test": 200}
    rng = random.Random(0)
    sents = [demo_text.demo_sentence(rng) for _ in range(5000)]
    vocab = {w for s in sents for w in s.split()}
    assert 150 <= len(vocab) <= 260
    assert len(set(sents)) > 3000  # plenty of variety
    for s in sents:
        assert 3 <= len(s.split()) <= 12
        assert normalize_text(s) == s, s  # already in the shared normal form
    assert demo_text.speakable("spell a b c at seven a m") == "spell A B C at seven A M"


def test_number_words():
    nw = demo_text.number_words
    assert nw(0) == "zero" and nw(15) == "fifteen" and nw(40) == "forty" and nw(99) == "ninety nine"
    assert nw(312) == "three hundred and twelve"
    assert nw(1005) == "one thousand and five"
    assert nw(2024) == "two thousand and twenty four"
    assert demo_text.year_words(2024) == "twenty twenty four"
    assert demo_text.ordinal_words(3) == "third" and demo_text.ordinal_words(22) == "twenty second"
    assert demo_text.ordinal_words(30) == "thirtieth"


def test_validate_names_the_flag():
    with pytest.raises(ZipperError, match=r"--n-test must be >= 1 \(got 0\)"):
        BuiltinCorpusConfig("demo", n_test=0).validate()
    with pytest.raises(ZipperError, match="--n-dev"):
        BuiltinCorpusConfig("demo", n_dev=-1).validate()
    with pytest.raises(ZipperError, match="--n-text"):
        BuiltinCorpusConfig("demo", n_text=-5).validate()
    with pytest.raises(ZipperError, match="--corpus"):
        BuiltinCorpusConfig("klingon").validate()
    with pytest.raises(ZipperError, match="--corpus-seed"):
        BuiltinCorpusConfig("demo", seed=-1).validate()
    with pytest.raises(ZipperError, match="--voices"):
        BuiltinCorpusConfig("demo", voices="kal,robot").validate()
    with pytest.raises(ZipperError, match="--voices"):
        BuiltinCorpusConfig("demo", voices="kal@5").validate()
    BuiltinCorpusConfig("demo", n_text=0, n_speech=0, voices="kal@0.9^+2, slt, espeak:en+f3").validate()
    with pytest.raises(ZipperError, match="--workers"):
        build_builtin_corpus(BuiltinCorpusConfig("demo"), Path("/nonexistent"), workers=0)


def test_voice_specs():
    v = synth.parse_voice("kal@1.1^-2")
    assert (v.engine, v.name, v.stretch, v.semitones, v.spec) == ("festival", "kal", 1.1, -2.0, "kal@1.1^-2")
    assert synth.parse_voice("espeak:en+f3").spec == "espeak:en+f3"
    assert synth.parse_voice("slt^+2").spec == "slt^+2"
    assert synth.parse_voice("slt@1.0").spec == "slt"
    script = synth._festival_script([synth.Job("x", 'say "hi" \\ there', v, Path("/t/x.wav"))])
    assert '"say \\"hi\\" \\\\ there"' in script and "Duration_Stretch 1.1" in script


@pytest.mark.skipif(not HAVE_WORDNET, reason="wordnet-base / bible-kjv not installed")
def test_english_sentences():
    norm = english_text.normalize
    assert norm("The Yankees scored 3 runs in the 9th!") == "the yankees scored three runs in the ninth"
    assert norm("caf\u00e9 `moo-cow' is a child's term") == "cafe moo cow is a child's term"
    audio, extra = english_text.english_pools()
    assert len(audio) > 20000 and len(extra) > 50000
    assert not set(audio) & set(extra)
    for s in audio[:2000]:
        assert 4 <= len(s.split()) <= 14 and normalize_text(s) == s
    sizes = dict(n_text=2000, n_speech=300, n_aligned=200, n_dev=50, n_test=50)
    plan = plan_sentences(BuiltinCorpusConfig("english", seed=0, **sizes))
    assert plan == plan_sentences(BuiltinCorpusConfig("english", seed=0, **sizes))
    assert plan["test"] != plan_sentences(BuiltinCorpusConfig("english", seed=1, **sizes))["test"]
    assert {r: len(plan[r]) for r in ROLES} == {r: sizes[f"n_{r}"] for r in ROLES}
    _disjoint(plan)


@pytest.mark.skipif(not HAVE_FESTIVAL, reason="festival not installed")
def test_tiny_build_and_cache(tmp_path):
    cfg = BuiltinCorpusConfig("demo", seed=0, n_text=20, n_speech=4, n_aligned=4, n_dev=2, n_test=2,
                              voices="kal,slt@1.1,kal^+2")
    logs: list[str] = []
    out = build_builtin_corpus(cfg, tmp_path, workers=2, log=logs.append)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    counts = {r: sum(row["role"] == r for row in rows) for r in ROLES}
    assert counts == {"text": 20, "speech": 4, "aligned": 4, "dev": 2, "test": 2}, logs
    for row in rows:
        assert set(row) >= {"id", "role", "text", "audio", "speaker"}
        if row["role"] == "text":
            assert row["audio"] is None and row["text"]
            continue
        assert (row["text"] is None) == (row["role"] == "speech")
        assert Path(row["audio"]).is_absolute() and row["speaker"] in ("kal", "slt@1.1", "kal^+2")
        audio, sr = sf.read(row["audio"], dtype="int16")
        info = sf.info(row["audio"])
        assert sr == 16000 and info.channels == 1 and info.subtype == "PCM_16"
        assert 0.3 < len(audio) / sr < 10 and abs(audio).max() > 1000
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["counts"] == counts and meta["hours"]["aligned"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    # Same config again: the cached directory, no synthesis.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "wav").iterdir()}
    logs2: list[str] = []
    assert build_builtin_corpus(cfg, tmp_path, workers=2, log=logs2.append) == out
    assert any("reusing cached corpus" in m for m in logs2) and not any("synthesized" in m for m in logs2)
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "wav").iterdir()}

    # Rebuilt from scratch: byte-identical manifest and audio (sox runs without dither).
    old = out.rename(tmp_path / "first")
    assert build_builtin_corpus(cfg, tmp_path, workers=2, log=logs.append) == out
    assert (old / "manifest.jsonl").read_bytes() == (out / "manifest.jsonl").read_bytes()
    for wav in (old / "wav").iterdir():
        assert wav.read_bytes() == (out / "wav" / wav.name).read_bytes(), wav.name


@pytest.mark.skipif(not HAVE_FESTIVAL, reason="festival not installed")
def test_unfinished_build_is_not_reused(tmp_path):
    cfg = BuiltinCorpusConfig("demo", n_text=3, n_speech=0, n_aligned=0, n_dev=1, n_test=1, voices="kal")
    from zipper_cli.corpora.builtin import corpus_dir_for

    final = corpus_dir_for(cfg, tmp_path)
    (final / "wav").mkdir(parents=True)  # looks like a corpus, but has no corpus.json marker
    stale = final.with_name(f".{final.name}.tmp-999999999")  # temp dir of a process that died
    stale.mkdir()
    logs: list[str] = []
    assert build_builtin_corpus(cfg, tmp_path, workers=1, log=logs.append) == final
    assert not any("reusing" in m for m in logs) and (final / "corpus.json").is_file()
    assert not stale.exists()
    assert len((final / "manifest.jsonl").read_text().splitlines()) == 5


def test_failed_synthesis_is_skipped(tmp_path):
    # A job festival cannot write (its directory does not exist) is skipped with a warning, the rest go on.
    if not HAVE_FESTIVAL:
        pytest.skip("festival not installed")
    kal = synth.parse_voice("kal")
    jobs = [synth.Job("ok1", "one two three", kal, tmp_path / "ok1.wav"),
            synth.Job("bad", "four five six", kal, tmp_path / "missing" / "bad.wav"),
            synth.Job("ok2", "seven eight nine", kal, tmp_path / "ok2.wav")]
    logs: list[str] = []
    got = synth.synthesize(jobs, workers=1, log=logs.append)
    assert set(got) == {"ok1", "ok2"} and any("bad" in m and "warning" in m for m in logs)
    assert os.path.exists(tmp_path / "ok2.wav")


def test_missing_tools_say_what_to_install(monkeypatch):
    kal = [synth.parse_voice("kal")]
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(ZipperError, match="apt-get install -y festival festvox-kallpc16k"):
        synth.check_voices(kal)
    monkeypatch.undo()
    if HAVE_FESTIVAL:  # festival present but the voice is not
        monkeypatch.setitem(synth.FESTIVAL_VOICES, "kal", ("voice_not_installed", "x", "festvox-kallpc16k"))
        with pytest.raises(ZipperError, match="apt-get install -y .*festvox-kallpc16k"):
            synth.check_voices(kal)
    monkeypatch.setattr(english_text, "WORDNET_DIRS", ("/nonexistent",))
    with pytest.raises(ZipperError, match="apt-get install -y wordnet-base bible-kjv-text"):
        english_text.check_installed()
