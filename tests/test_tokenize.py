"""`zipper tokenize` end to end on corpora the tests make: outputs, rejects, reruns, resume, workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import write_wav
from test_sources import make_librispeech
from zipper_cli.atomic import read_jsonl
from zipper_cli.errors import ZipperError
from zipper_cli.shards import load_role
from zipper_cli.speech_tokenizer import SpeechTokenizer, SpeechTokenizerConfig
from zipper_cli.stages.tokenize import TokenizeConfig, tokenize
from zipper_cli.text_tokenizer import TextTokenizer, TextTokenizerConfig


def small_cfg(corpus: str, **kw) -> TokenizeConfig:
    return TokenizeConfig(corpus=(corpus,), text=TextTokenizerConfig(vocab_size=40),
                          speech=SpeechTokenizerConfig(k=16), **kw)


def shard_bytes(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "tokens").rglob("*.npz"))}


def test_manifest_corpus_end_to_end(tmp_path, small_manifest):
    run = tmp_path / "run"
    summary = tokenize(run, small_cfg(f"manifest:{small_manifest}"))
    assert {r: s["utterances"] for r, s in summary["roles"].items()} == {
        "text": 40, "speech": 12, "aligned": 10, "dev": 4, "test": 4}
    assert summary["rejects"] == {}
    text_tok = TextTokenizer.load(run / "tokenizers" / "text")
    speech_tok = SpeechTokenizer.load(run / "tokenizers" / "speech")
    aligned = load_role(run, "aligned", text_tok.checksum, speech_tok.checksum)
    manifest = read_jsonl(run / "data" / "aligned.jsonl")
    assert [u["id"] for u in aligned] == [m["id"] for m in manifest]
    for u, m in zip(aligned, manifest):
        assert text_tok.decode(u["text"]) == m["norm"]
        assert u["speech"].min() >= 0 and u["speech"].max() < 16
        assert len(u["speech"]) == int(m["duration"] * 25)  # 25 Hz units keep durations
    speech = load_role(run, "speech")
    assert all(u["text"] is None and u["speech"] is not None for u in speech)
    text = load_role(run, "text")
    assert all(u["speech"] is None and u["text"] is not None for u in text)
    marker = json.loads((run / "stages" / "tokenize.done.json").read_text())
    assert marker["config"]["speech"]["k"] == 16 and f"manifest:{small_manifest}" in marker["inputs"]
    with pytest.raises(ZipperError, match="speech tokens were made by tokenizer .* but this run's speech tokenizer is"):
        load_role(run, "aligned", speech_tok="0" * 64)


def test_deterministic_and_workers_do_not_change_outputs(tmp_path, small_manifest):
    cfg = small_cfg(f"manifest:{small_manifest}", shard_size=7)
    tokenize(tmp_path / "a", cfg)
    tokenize(tmp_path / "b", replace(cfg, workers=2))
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    for name in ("tokenizers/speech/centroids.npy", "tokenizers/text/spm.model", "data/aligned.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_resume_reuses_finished_shards(tmp_path, small_manifest):
    cfg = small_cfg(f"manifest:{small_manifest}", shard_size=3)
    tokenize(tmp_path / "full", cfg)
    run = tmp_path / "run"
    tokenize(run, cfg)
    # Simulate an interruption: no marker, one shard missing, another half-written.
    (run / "stages" / "tokenize.done.json").unlink()
    (run / "tokens" / "speech" / "shard-00002.npz").unlink()
    (run / "tokens" / "aligned" / "shard-00001.npz").write_bytes(b"\x00truncated")
    kept = run / "tokens" / "speech" / "shard-00000.npz"
    os.utime(kept, (1, 1))
    tokenize(run, cfg)
    assert kept.stat().st_mtime == 1  # a finished shard was reused, not redone
    assert shard_bytes(run) == shard_bytes(tmp_path / "full")


def test_ctc_kmeans_trains_its_encoder_on_the_aligned_role(tmp_path, small_manifest, capsys):
    ctc = SpeechTokenizerConfig(kind="ctc-kmeans", k=16, frame_rate=50, ctc_encoder_steps=4)  # ~30 chars/s
    cfg = replace(small_cfg(f"manifest:{small_manifest}"), speech=ctc)
    run = tmp_path / "run"
    tokenize(run, cfg)
    out = capsys.readouterr().out  # the encoder's training lines are its own, not the CTC judge's
    assert "[ctc-encoder] model:" in out and "[ctc-encoder] trained" in out and "[ctc-judge]" not in out
    enc = run / "tokenizers" / "speech" / "encoder"
    meta = json.loads((enc / "judge.json").read_text())
    # the aligned role (one of its 10 transcripts has more characters than 50 Hz frames can hold), 50 Hz
    assert meta["train_utterances"] == 9 and meta["config"]["subsample"] == 2
    tok = SpeechTokenizer.load(run / "tokenizers" / "speech")
    assert tok.cfg.kind == "ctc-kmeans" and tok.checkpoint_sha256 == meta["version"]
    for u, m in zip(load_role(run, "aligned", speech_tok=tok.checksum), read_jsonl(run / "data" / "aligned.jsonl")):
        assert len(u["speech"]) == -(-(1 + int(m["duration"] * 16000) // 160) // 2)  # ceil(100 Hz frames / 2)
    # A different encoder budget is another tokenizer: --force retrains the encoder, not reuses it.
    tokenize(run, replace(cfg, speech=replace(ctc, ctc_encoder_steps=5)), force=True)
    assert json.loads((enc / "judge.json").read_text())["config"]["steps"] == 5
    assert SpeechTokenizer.load(run / "tokenizers" / "speech").checksum != tok.checksum


def test_ctc_kmeans_needs_aligned_audio(tmp_path):
    rows = [{"id": f"s{i}", "role": "speech", "audio": f"a{i}.wav", "text": None} for i in range(3)]
    rows += [{"id": "t0", "role": "text", "text": "one two"}]
    for r in rows[:3]:
        write_wav(tmp_path / r["audio"], seconds=1.0, seed=1)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = replace(small_cfg(f"manifest:{tmp_path / 'c.jsonl'}"), speech=SpeechTokenizerConfig(kind="ctc-kmeans", k=4))
    with pytest.raises(ZipperError, match="^--speech-tokenizer ctc-kmeans: its encoder learns from the aligned role"):
        tokenize(tmp_path / "run", cfg)


def test_bad_inputs_are_rejected_and_the_rest_goes_on(tmp_path):
    a = tmp_path / "audio dir ü"
    rows = []

    def add(uid, audio=None, text="one two three", role="aligned"):
        rows.append(json.dumps({"id": uid, "audio": str(audio) if audio else None, "text": text, "role": role}))

    for i in range(6):
        add(f"good{i}", write_wav(a / f"good {i}.wav", 1.0, seed=i))
    add("u8", write_wav(a / "u8.wav", 1.0, subtype="PCM_U8"))
    add("s24", write_wav(a / "s24.wav", 1.0, subtype="PCM_24"))
    add("f32", write_wav(a / "f32.wav", 1.0, subtype="FLOAT"))
    add("stereo48k", write_wav(a / "st.wav", 1.0, sr=48000, channels=2))
    add("spaced ü", write_wav(a / "x.wav"))
    (a / "trunc.wav").write_bytes((a / "u8.wav").read_bytes()[:40])
    add("trunc", a / "trunc.wav")
    (a / "noise.flac").write_bytes(np.random.default_rng(0).bytes(3000))
    add("noise", a / "noise.flac")
    sf.write(a / "empty.wav", np.zeros(0, np.float32), 16000)
    add("empty", a / "empty.wav")
    sf.write(a / "silent.wav", np.zeros(16000, np.float32), 16000)
    add("silent", a / "silent.wav")
    nan = np.full(16000, 0.1, np.float32)
    nan[5] = np.nan
    sf.write(a / "nan.wav", nan, 16000, subtype="FLOAT")
    add("nan", a / "nan.wav")
    add("short", write_wav(a / "short.wav", 0.1))
    add("long", write_wav(a / "long.wav", 31.0))
    add("missing", a / "missing.wav")
    add("emptytext", write_wav(a / "e.wav"), text=" ?! ")
    add("good0", write_wav(a / "dup.wav"))
    add("t1", write_wav(a / "t1.wav", seed=9), text="One two three four", role="test")
    add("leak", write_wav(a / "leak.wav"), text="one two three FOUR")
    add("noaudio", None)
    rows.append("{broken json")
    rows.append(json.dumps({"id": "r", "text": "x", "role": "training"}))
    path = tmp_path / "m.jsonl"
    path.write_bytes(("\n".join(rows) + "\n").encode() + b'{"id": "bin", "text": "\xff\xfe"}\n')
    summary = tokenize(tmp_path / "run", small_cfg(f"manifest:{path}"))
    rejects = read_jsonl(tmp_path / "run" / "data" / "rejects.jsonl")
    got = sorted((str(r["id"]), r["reason"]) for r in rejects)
    assert got == sorted([
        ("trunc", "unreadable"), ("noise", "unreadable"), ("empty", "empty_audio"), ("silent", "silent"),
        ("nan", "nan_samples"), ("short", "too_short"), ("long", "too_long"), ("missing", "missing_file"),
        ("emptytext", "empty_text"), ("good0", "duplicate_id"), ("leak", "test_overlap"),
        ("noaudio", "missing_audio"), ("None", "bad_line"), ("r", "unknown_role"), ("None", "non_utf8_text"),
        ("spaced ü", "bad_id")])
    assert all("\n" not in r["detail"] for r in rejects)
    assert summary["roles"]["aligned"]["utterances"] == 10 and summary["roles"]["test"]["utterances"] == 1


def test_librispeech_directory(tmp_path):
    root = make_librispeech(tmp_path / "LibriSpeech")
    summary = tokenize(tmp_path / "run", small_cfg(f"librispeech:{root}", subset_roles=("train-clean-5=aligned",)))
    assert {r: s["utterances"] for r, s in summary["roles"].items()} == {
        "text": 0, "speech": 0, "aligned": 6, "dev": 6, "test": 6}
    assert read_jsonl(tmp_path / "run" / "data" / "test.jsonl")[0]["norm"].startswith("hello world number")


def _zipper(*args, cwd):
    return subprocess.run([sys.executable, "-m", "zipper_cli.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_rerun_skip_mismatch_force(tmp_path, small_manifest):
    base = ["tokenize", "--run-dir", "run", "--corpus", f"manifest:{small_manifest}", "--text-vocab", "40"]
    first = _zipper(*base, "--units", "16", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "aligned" in first.stdout and "no rejects" in first.stdout
    again = _zipper(*base, "--units", "16", cwd=tmp_path)
    assert again.returncode == 0 and "already done" in again.stdout
    other = _zipper(*base, "--units", "8", cwd=tmp_path)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines() == [
        "error: stage 'tokenize' already finished in run with a different config (config.speech.k: 16 -> 8); "
        "rerun with --force to redo it, or use another --run-dir"]
    forced = _zipper(*base, "--units", "8", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((tmp_path / "run" / "stages" / "tokenize.done.json").read_text())["config"]["speech"]["k"] == 8


@pytest.mark.parametrize("args, message", [
    (["tokenize", "--corpus", "wav:/x"], "error: --corpus wav:/x: unknown corpus kind 'wav'"),
    (["tokenize", "--corpus", "kaldi:/no/such"], "error: --corpus kaldi:/no/such: /no/such does not exist"),
    (["tokenize", "--corpus", "demo", "--workers", "0"], "error: --workers must be >= 1 (got 0)"),
    (["tokenize", "--corpus", "demo", "--units", "1"], "error: --units"),
    (["pretrain", "--tower", "text", "--run-dir", "nowhere"],
     "error: zipper pretrain --tower text needs stage 'tokenize' finished in nowhere; run `zipper tokenize` first"),
    (["pretrain", "--tower", "both"], "error: --tower must be text or speech (got 'both')"),
    (["fuse", "--run-dir", "nowhere"],
     "error: zipper fuse needs stage 'tokenize' finished in nowhere; run `zipper tokenize` first"),
    (["fuse", "--arch", "two-decoders"], "error: --arch must be one of zipper, single-decoder"),
    (["decode", "--outputs", "video"], "error: --outputs must be a comma list of text and speech"),
    (["decode", "--run-dir", "nowhere"], "error: zipper decode needs stage 'tokenize' finished in nowhere"),
    (["eval"], "error: --decode TAG is required"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    res = _zipper(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith(message), res.stderr


def test_cli_help_lists_the_five_verbs(tmp_path):
    res = _zipper("--help", cwd=tmp_path)
    assert res.returncode == 0
    for verb in ("tokenize", "pretrain", "fuse", "decode", "eval"):
        assert verb in res.stdout
