"""Corpus specs and the adapters for users' data, on tiny directories the tests make."""

from __future__ import annotations

import json

import pytest

from conftest import write_wav
from zipper_cli.corpora.collect import clean_rows
from zipper_cli.corpora.sources import (parse_corpus_spec, parse_subset_roles, read_kaldi, read_librispeech,
                                        read_manifest)
from zipper_cli.errors import ZipperError


def make_librispeech(root, subsets=("train-clean-5", "dev-clean-2", "test-clean"), per=3):
    for s, subset in enumerate(subsets):
        for spk in ("19", "26"):
            chap = root / subset / spk / "198"
            lines = []
            for i in range(per):
                uid = f"{spk}-198-{s:02d}{i:02d}"
                write_wav(chap / f"{uid}.flac", 0.6 + 0.1 * i, seed=s * 10 + i)
                lines.append(f"{uid} HELLO WORLD NUMBER {s} {i}")
            (chap / f"{spk}-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_parse_specs(tmp_path):
    assert parse_corpus_spec("demo").kind == "demo"
    spec = parse_corpus_spec(f"kaldi:{tmp_path}@test")
    assert (spec.kind, spec.path, spec.role) == ("kaldi", str(tmp_path), "test")
    with pytest.raises(ZipperError, match="unknown corpus kind 'wav'"):
        parse_corpus_spec("wav:/x")
    with pytest.raises(ZipperError, match="unknown role 'train'"):
        parse_corpus_spec(f"kaldi:{tmp_path}@train")
    with pytest.raises(ZipperError, match="does not exist"):
        parse_corpus_spec("kaldi:/no/such/dir")
    with pytest.raises(ZipperError, match="needs a path"):
        parse_corpus_spec("manifest")
    with pytest.raises(ZipperError, match="--subset-role 'x': expected NAME=ROLE"):
        parse_subset_roles(["x"])


def test_librispeech_layout_and_roles(tmp_path):
    root = make_librispeech(tmp_path / "LibriSpeech")
    rows, rejects, summary = read_librispeech(parse_corpus_spec(f"librispeech:{root}"), {})
    assert not rejects and len(rows) == 18
    assert summary == {"dev-clean-2": ("dev", 6), "test-clean": ("test", 6), "train-clean-5": ("aligned", 6)}
    assert rows[0]["audio"].endswith(".flac") and rows[0]["speaker"] == "19"
    _, _, summary = read_librispeech(parse_corpus_spec(f"librispeech:{root}"), {"train-clean-5": "speech"})
    assert summary["train-clean-5"] == ("speech", 6)
    with pytest.raises(ZipperError, match="--subset-role names nope, not a subset"):
        read_librispeech(parse_corpus_spec(f"librispeech:{root}"), {"nope": "speech"})
    # A single subset directory works as well.
    rows, _, summary = read_librispeech(parse_corpus_spec(f"librispeech:{root / 'test-clean'}"), {})
    assert summary == {"test-clean": ("test", 6)}


def test_libritts_layout(tmp_path):
    chap = tmp_path / "LibriTTS" / "dev-clean" / "84" / "121123"
    write_wav(chap / "84_121123_000007_000001.wav", 1.0)
    (chap / "84_121123_000007_000001.normalized.txt").write_text("He hoped there would be stew.")
    rows, rejects, summary = read_librispeech(parse_corpus_spec(f"librispeech:{tmp_path / 'LibriTTS'}"), {})
    assert [r["text"] for r in rows] == ["He hoped there would be stew."] and summary["dev-clean"] == ("dev", 1)


def test_kaldi_dir(tmp_path):
    d = tmp_path / "kaldi"
    d.mkdir()
    spaced = write_wav(tmp_path / "my audio" / "rëc 1.wav", 3.0)
    write_wav(tmp_path / "b.wav", 1.0)
    (d / "wav.scp").write_text(f"rec1 {spaced}\nrec2 {tmp_path / 'b.wav'}\nrec3 sox x.wav -t wav - |\n")
    (d / "segments").write_text("u1 rec1 0.0 1.0\nu2 rec1 1.0 2.5\nu3 rec2 0 -1\nbad line\nu4 recX 0 1\n")
    (d / "text").write_bytes("u1 one two\nu2 three\nu3 four\n".encode() + b"u9 \xff\xfe bad\n")
    (d / "utt2spk").write_text("u1 spkA\nu2 spkA\nu3 spkB\n")
    rows, rejects = read_kaldi(parse_corpus_spec(f"kaldi:{d}@aligned"))
    assert [(r["id"], r["start"], r["end"], r["speaker"]) for r in rows] == [
        ("u1", 0.0, 1.0, "spkA"), ("u2", 1.0, 2.5, "spkA"), ("u3", 0.0, None, "spkB")]
    reasons = sorted((r["id"], r["reason"]) for r in rejects)
    assert reasons == [("bad", "bad_line"), ("rec3", "piped_command"), ("u4", "missing_file"), ("u9", "non_utf8_text")]
    piped = next(r for r in rejects if r["reason"] == "piped_command")
    assert "piped commands are not run" in piped["detail"] and "wav.scp:3" in piped["detail"]


def test_kaldi_needs_wav_scp_and_text(tmp_path):
    with pytest.raises(ZipperError, match="wav.scp not found"):
        read_kaldi(parse_corpus_spec(f"kaldi:{tmp_path}"))
    (tmp_path / "wav.scp").write_text(f"a {write_wav(tmp_path / 'a.wav')}\n")
    with pytest.raises(ZipperError, match="text not found .* use @speech for audio only"):
        read_kaldi(parse_corpus_spec(f"kaldi:{tmp_path}@dev"))
    rows, rejects = read_kaldi(parse_corpus_spec(f"kaldi:{tmp_path}@speech"))
    assert len(rows) == 1 and rows[0]["text"] is None and not rejects


def test_manifest_lines(tmp_path):
    write_wav(tmp_path / "a.wav")
    lines = [
        json.dumps({"id": "a", "audio": "a.wav", "text": "hi", "role": "aligned"}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"id": "b", "text": "x", "role": "train"}),
        json.dumps({"id": "c", "text": "x"}),
        json.dumps({"id": "d", "text": 5, "role": "text"}),
        json.dumps({"id": "e", "text": "fine", "role": "text"}),
    ]
    path = tmp_path / "m.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "f", "text": "\xff"}\n')
    rows, rejects = read_manifest(parse_corpus_spec(f"manifest:{path}"))
    assert [r["id"] for r in rows] == ["a", "e"]
    assert rows[0]["audio"] == str(tmp_path / "a.wav")
    assert [r["reason"] for r in rejects] == ["non_utf8_text", "bad_line", "bad_line", "unknown_role", "missing_role", "bad_line"]
    assert rejects[0]["detail"] == f"{path}:8: not valid UTF-8" and rejects[0]["id"] is None
    assert rejects[1]["detail"].startswith(f"{path}:2: not JSON")


def test_clean_rows_reasons():
    def row(uid, role, text, audio="x.wav"):
        return {"id": uid, "role": role, "text": text, "audio": audio, "source": "t"}
    rows = [row("a", "test", "Call mom"), row("b", "aligned", "call MOM!"), row("c", "aligned", "stop"),
            row("c", "dev", "again"), row("d e", "dev", "x"), row("f", "aligned", "   ...  "),
            row("g", "dev", "x", audio=None), row("h", "text", "word " * 101, audio=None),
            row("i", "speech", "transcript dropped")]
    kept, rejects = clean_rows(rows, max_text_words=100)
    assert [r["id"] for r in kept] == ["a", "c", "i"]
    assert kept[2]["text"] is None  # the speech role is audio only
    assert {r["id"]: r["reason"] for r in rejects} == {
        "b": "test_overlap", "c": "duplicate_id", "d e": "bad_id", "f": "empty_text", "g": "missing_audio",
        "h": "text_too_long"}
