"""The five verbs through the CLI on a tiny corpus with tiny models: each stage consumes the previous
stage's artifacts, reruns skip finished stages, and the final report has every row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import make_small_manifest, write_wav


def zipper(*args, cwd, ok=True):
    res = subprocess.run([sys.executable, "-m", "zipper_cli.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=900)
    if ok:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_five_verbs_end_to_end(tmp_path):
    pytest.importorskip("pocketsphinx")
    manifest = make_small_manifest(tmp_path)
    run = ["--run-dir", "run"]
    train = ["--size", "tiny", "--steps", "6", "--max-tokens", "256", "--eval-every", "3", "--ckpt-every", "3"]
    zipper("tokenize", *run, "--corpus", f"manifest:{manifest}", "--units", "16", "--text-vocab", "40", cwd=tmp_path)
    zipper("pretrain", *run, "--tower", "text", *train, cwd=tmp_path)
    zipper("pretrain", *run, "--tower", "speech", *train, cwd=tmp_path)
    fusion = ["--freeze", "text", "--xattn-pos", "learned", "--xattn-prior", "8", "--gate-init", "0.5",
              "--ctc-weight", "0.3"]  # the demo's
    zipper("fuse", *run, *fusion, "--steps", "6", "--max-tokens", "512", "--eval-every", "3",
           "--ckpt-every", "3", cwd=tmp_path)
    small = ["--max-len-min", "text=4,speech=8", "--max-new-tokens", "8", "--vocoder-steps", "20"]
    joint = ["--strategy", "beam", "--beam", "2", "--ctc-weight", "0.3"]  # the demo's ASR search
    zipper("decode", *run, "--outputs", "text", "--tag", "asr", *joint, *small, cwd=tmp_path)
    zipper("decode", *run, "--outputs", "speech", "--tag", "tts", *small, cwd=tmp_path)
    res = zipper("eval", *run, "--decode", "asr", "--decode", "tts", "--tag", "all", "--judge-steps", "10", cwd=tmp_path)

    report = json.loads((tmp_path / "run" / "eval" / "all" / "report.json").read_text())
    assert set(report["decode"]["asr"]["asr"]) >= {"wer", "cer", "substitutions", "deletions", "insertions"}
    for judge in ("ctc", "pocketsphinx"):
        rows = report["decode"]["tts"]["tts"][judge]
        assert set(rows) == {"tts_vs_gold", "tts_vs_target", "oracle_vs_gold", "ground_truth_vs_gold"}
    ppl = report["perplexity"]
    assert ppl["fused/zipper-freeze-text"]["unchanged"] is True  # the frozen text tower, exactly
    assert ppl["fused/zipper-freeze-text"]["perplexity"] == ppl["text_tower"]
    assert "ASR" in res.stdout and (tmp_path / "run" / "eval" / "all" / "report.md").exists()
    tok = json.loads((tmp_path / "run" / "tokenizers" / "speech" / "tokenizer.json").read_text())
    tts_cfg = json.loads((tmp_path / "run" / "decode" / "tts" / "config.json").read_text())
    assert tts_cfg["gen"]["unit_rate"] == tok["frame_rate"]  # speech length limits follow the units' rate
    hyp = [json.loads(x) for x in (tmp_path / "run" / "decode" / "tts" / "hyp.jsonl").read_text().splitlines()]
    assert len(hyp) == 4 and all((tmp_path / "run" / "decode" / "tts" / h["wav"]).exists() for h in hyp)

    # Rerunning any stage with the same options skips it.
    again = zipper("fuse", *run, *fusion, "--steps", "6", "--max-tokens", "512", "--eval-every", "3",
                   "--ckpt-every", "3", cwd=tmp_path)
    assert "already done" in again.stdout
    again = zipper("decode", *run, "--outputs", "text", "--tag", "asr", *joint, *small, cwd=tmp_path)
    assert "already done" in again.stdout

    # A user's own WAV in, text out; a user's sentence in, WAV out.
    wav = write_wav(tmp_path / "my clip.wav", 1.0)
    zipper("decode", *run, "--wav", str(wav), "--outputs", "text", "--tag", "mine", *small, cwd=tmp_path)
    mine = json.loads((tmp_path / "run" / "decode" / "mine" / "hyp.jsonl").read_text().splitlines()[0])
    assert mine["source"] == str(wav) and isinstance(mine["text"], str)
    zipper("decode", *run, "--text", "dial one two three please", "--outputs", "speech", "--tag", "say", *small,
           cwd=tmp_path)
    say = json.loads((tmp_path / "run" / "decode" / "say" / "hyp.jsonl").read_text().splitlines()[0])
    assert (tmp_path / "run" / "decode" / "say" / say["wav"]).stat().st_size > 44
    assert say["voice"] == "bob"  # the vocoder's default voice: the manifests' most frequent speaker
    zipper("decode", *run, "--text", "dial one two three please", "--outputs", "speech", "--tag", "say-ann",
           "--voice", "ann", *small, cwd=tmp_path)
    ann = json.loads((tmp_path / "run" / "decode" / "say-ann" / "hyp.jsonl").read_text().splitlines()[0])
    assert ann["voice"] == "ann" and ann["tokens"] == say["tokens"]  # the same units, another voice
    import soundfile as sf

    wav_ann, wav_bob = (sf.read(tmp_path / "run" / "decode" / d / "wav" / "text0000.wav")[0] for d in ("say-ann", "say"))
    assert wav_ann.shape == wav_bob.shape and not (wav_ann == wav_bob).all()

    # Errors a user can meet, one line each.
    bad = zipper("decode", *run, "--model", "towers/text", "--outputs", "text", "--tag", "x", cwd=tmp_path, ok=False)
    assert bad.returncode == 2 and "is a unimodal text tower" in bad.stderr and len(bad.stderr.splitlines()) == 1
    bad = zipper("decode", *run, "--outputs", "speech", "--ctc-weight", "0.3", "--tag", "x", cwd=tmp_path, ok=False)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert "--ctc-weight scores text transcribed from speech (ASR)" in bad.stderr
    bad = zipper("decode", *run, "--text", "one", "--outputs", "speech", "--voice", "cat", cwd=tmp_path, ok=False)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert "--voice 'cat': not a speaker of this run's speech and aligned audio (known: bob, ann)" in bad.stderr
    bad = zipper("decode", *run, "--outputs", "video", cwd=tmp_path, ok=False)
    assert bad.returncode == 2 and "--outputs must be a comma list of text and speech" in bad.stderr
