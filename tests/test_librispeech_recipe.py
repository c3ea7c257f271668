"""recipes/librispeech/run.sh, stage by stage, on a tiny directory in LibriSpeech layout (plus an unlabeled
LibriLight-layout folder and an LM text file) with tiny models: each stage's artifacts exist and the next
stage consumes them. Also the unlabeled-audio (LibriLight) support of the librispeech:DIR reader."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import write_wav
from zipper_cli.corpora.sources import parse_corpus_spec, read_librispeech
from zipper_cli.errors import ZipperError

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "librispeech" / "run.sh"
WORDS = "the of and to a in he was that it his had with as you for her but is on at by said not".upper().split()


def make_librispeech(root: Path, subsets=(("train-clean-100", 6), ("dev-clean", 2), ("test-clean", 3))) -> Path:
    """SUBSET/SPK/CHAP/SPK-CHAP-NNNN.flac + SPK-CHAP.trans.txt, two speakers per subset."""
    for s, (subset, per) in enumerate(subsets):
        for k, spk in enumerate(("19", "26")):
            chap = root / subset / spk / f"{198 + s}"
            lines = []
            for i in range(per):
                uid = f"{spk}-{198 + s}-{i:04d}"
                write_wav(chap / f"{uid}.flac", 0.8 + 0.15 * i, seed=100 * s + 10 * k + i)
                words = [WORDS[(7 * s + 3 * k + 5 * i + j) % len(WORDS)] for j in range(3 + i % 3)]
                lines.append(f"{uid} {' '.join(words)} {subset.split('-')[0].upper()}")
            (chap / f"{spk}-{198 + s}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def make_librilight(root: Path) -> Path:
    """SUBSET/SPK/BOOK/*.flac with no transcripts (LibriLight), one file long enough to be cut into windows."""
    book = root / "small" / "100" / "sea_fairies_librivox_64kb_mp3"
    write_wav(book / "01_baum_sea_fairies_64kb.flac", 1.2, seed=7)
    write_wav(book / "02_baum_sea_fairies_64kb.flac", 45.0, seed=8)
    (book / "01_baum_sea_fairies_64kb.json").write_text("{}")  # LibriLight's metadata files are ignored
    write_wav(root / "small" / "203" / "other_book" / "01_baum_sea_fairies_64kb.flac", 1.0, seed=9)  # same stem
    return root


def test_unlabeled_librilight_subsets(tmp_path):
    root = make_librilight(tmp_path / "LibriLight")
    rows, rejects, summary = read_librispeech(parse_corpus_spec(f"librispeech:{root}"), {})
    assert not rejects and summary == {"small": ("speech", 5)}
    assert all(r["role"] == "speech" and r["text"] is None for r in rows)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)  # the same file name in two books gives two ids
    assert "203-other_book-01_baum_sea_fairies_64kb" in ids and rows[0]["speaker"] == "100"
    windows = [r for r in rows if "02_baum" in r["id"]]
    assert [r["id"][-6:] for r in windows] == ["_w0000", "_w0001", "_w0002"]  # 45 s -> 3 x 15 s
    assert [(r["start"], r["end"]) for r in windows] == [(0.0, 15.0), (15.0, 30.0), (30.0, None)]
    # One subset directory by itself, and a shorter window.
    rows, _, summary = read_librispeech(parse_corpus_spec(f"librispeech:{root / 'small'}"), {}, window_seconds=10)
    assert summary == {"small": ("speech", 7)}
    with pytest.raises(ZipperError, match="has no transcripts .* can only be role speech"):
        read_librispeech(parse_corpus_spec(f"librispeech:{root}"), {"small": "aligned"})
    # Labelled subsets beside it keep their transcripts and default roles.
    make_librispeech(root, subsets=(("dev-clean", 1),))
    _, _, summary = read_librispeech(parse_corpus_spec(f"librispeech:{root}"), {})
    assert summary == {"dev-clean": ("dev", 2), "small": ("speech", 5)}


def recipe(*args, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU and gloo, also on a GPU machine
    res = subprocess.run(["bash", str(RECIPE), *args], capture_output=True, text=True, timeout=900, env=env)
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def done(run: Path, name: str) -> dict:
    return json.loads((run / "stages" / f"{name}.done.json").read_text())


def test_recipe_stages_on_tiny_librispeech(tmp_path):
    ls = make_librispeech(tmp_path / "LibriSpeech")
    ll = make_librilight(tmp_path / "LibriLight")
    lm = tmp_path / "lm-norm.txt"
    lm.write_text("".join(" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(6 + i % 5)) + "\n" for i in range(120)))
    run = tmp_path / "run"
    common = ["--size", "tiny", "--run-dir", str(run), "--librispeech", str(ls), "--librilight", str(ll),
              "--lm-text", str(lm), "--lm-lines", "80", "--train-sets", "train-clean-100", "--workers", "1",
              "--steps", "4", "--aligned-fraction", "0.5", "--max-new-tokens", "6", "--vocoder-steps", "10",
              "--judges", "ctc", "--judge-steps", "10"]

    # Stage 1: every source lands in its role.
    out = recipe(*common, "--stage", "1", "--stop-stage", "1").stdout
    assert "subset small -> role speech (5 utterances)" in out
    roles = {name: [json.loads(x) for x in (run / "data" / f"{name}.jsonl").read_text().splitlines()]
             for name in ("train-text", "train-speech", "aligned", "dev", "test")}
    assert {len(v) for v in roles.values()} and len(roles["aligned"]) == 12 and len(roles["test"]) == 6
    assert len(roles["dev"]) == 4 and len(roles["train-speech"]) == 5 and len(roles["train-text"]) == 80
    assert all(r["text"] is None for r in roles["train-speech"])
    assert {r["start"] for r in roles["train-speech"]} >= {15.0, 30.0}  # the 45 s chapter, cut into windows
    for role in ("text", "speech", "aligned", "dev", "test"):
        assert (run / "tokens" / role / "index.json").exists(), role
    tok = done(run, "tokenize")

    # Stages 2-3: towers from the token shards (the text tower on LM text + aligned transcripts, the speech
    # tower on the unlabeled windows + aligned audio), each recording the tokenizer it read.
    # The text tower through torchrun (two gloo processes on CPU), the speech tower in one process.
    out = recipe(*common, "--stage", "2", "--stop-stage", "2", "--nproc-per-node", "2").stdout
    assert "2 process(es) for training" in out
    recipe(*common, "--stage", "3", "--stop-stage", "3")
    for tower in ("text", "speech"):
        assert (run / "towers" / tower / "model.pt").exists() and (run / "towers" / tower / "metrics.jsonl").exists()
        assert json.loads((run / "towers" / tower / "config.json").read_text())["tower"]["n_embd"] == 64  # tiny
        checksum = json.loads((run / "tokenizers" / tower / "tokenizer.json").read_text())["checksum"]
        marker = done(run, f"pretrain-{tower}")
        assert marker["inputs"] == {f"{tower}_tokenizer": checksum} and marker["outputs"]["steps"] == 4
    assert done(run, "pretrain-text")["outputs"]["train_sequences"] == 80 + 12
    assert done(run, "pretrain-speech")["outputs"]["train_sequences"] >= 5 + 12

    # Stage 4: the fused model reads both towers and half of the aligned pairs.
    recipe(*common, "--stage", "4", "--stop-stage", "4")
    assert (run / "fused" / "ls" / "model.pt").exists()
    fuse = done(run, "fuse-ls")
    assert fuse["config"]["aligned_fraction"] == 0.5, fuse["config"]
    assert fuse["outputs"]["aligned_utterances"] == 6
    for tower in ("text", "speech"):
        assert fuse["inputs"][f"tower_{tower}"] == hashlib.sha256((run / "towers" / tower / "model.pt").read_bytes()).hexdigest()

    # Stages 5-6: decode the test split both ways, then the report.
    recipe(*common, "--stage", "5", "--stop-stage", "6")
    for tag in ("ls-asr", "ls-tts"):
        hyp = (run / "decode" / tag / "hyp.jsonl").read_text().splitlines()
        assert len(hyp) == 6
    report = json.loads((run / "eval" / "ls" / "report.json").read_text())
    assert "wer" in report["decode"]["ls-asr"]["asr"] and "ctc" in report["decode"]["ls-tts"]["tts"]

    # Rerunning the whole recipe skips every finished stage; the tokenizer is unchanged.
    again = recipe(*common).stdout
    assert again.count("already done") >= 5, again
    assert done(run, "tokenize") == tok

    # Users' mistakes: one line, status 2.
    bad = recipe("--size", "XL", ok=False)
    assert bad.returncode == 2 and "--size must be S, L, demo or tiny" in bad.stderr
    bad = recipe(*common, "--run-dir", str(tmp_path / "other"), "--librispeech", str(tmp_path / "nope"), ok=False)
    assert bad.returncode == 2 and "not found" in bad.stderr
