"""Bad input battery: each malformed input with its documented behaviour (docs/reliability.md).

Two kinds of behaviour:
  reject   one entry of a corpus is refused: a row in data/rejects.jsonl with its reason, the rest goes on
  accept   an unusual but valid entry is read (and resampled / mixed / normalised as documented)
  error    the whole command is refused: exit status 2 and one line on stderr, `error: ...`, naming the
           file or flag and the problem, never a traceback

Every entry-level case sits in one corpus (a JSONL manifest plus a Kaldi directory) tokenized once through
the CLI; every command-level case runs the CLI on a copy of one tiny finished run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf

from cli_runner import warm_imports, zipper
from conftest import make_small_manifest, write_wav
from zipper_cli.atomic import read_jsonl
from zipper_cli.shards import read_shard, write_shard

# ---------------------------------------------------------------------------------------------- entry level


def _bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _samples(path: Path, wav: np.ndarray, sr: int = 16000, subtype: str = "FLOAT") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav, sr, subtype=subtype)
    return path


def _nan(path: Path, value: float) -> Path:
    wav = np.full(16000, 0.1, np.float32)
    wav[100] = value
    return _samples(path, wav)


def _ten_minutes(path: Path) -> Path:
    rng = np.random.default_rng(0)
    return _samples(path, (0.1 * rng.standard_normal(600 * 16000)).astype(np.float32), subtype="PCM_16")


# (case, manifest entry, expected): the entry's audio is made by the function (given the audio dir);
# expected is ("reject", reason) or ("accept", seconds after resampling).
ENTRIES = [
    ("truncated WAV header", {"audio": lambda d: _bytes(d / "trunc.wav", write_wav(d / "t0.wav").read_bytes()[:40])},
     ("reject", "unreadable")),
    ("random bytes named .flac", {"audio": lambda d: _bytes(d / "noise.flac", np.random.default_rng(0).bytes(5000))},
     ("reject", "unreadable")),
    ("empty file named .wav", {"audio": lambda d: _bytes(d / "zero-bytes.wav", b"")}, ("reject", "unreadable")),
    ("8-bit WAV", {"audio": lambda d: write_wav(d / "u8.wav", 1.0, subtype="PCM_U8")}, ("accept", 1.0)),
    ("24-bit WAV", {"audio": lambda d: write_wav(d / "s24.wav", 1.0, subtype="PCM_24")}, ("accept", 1.0)),
    ("32-bit float WAV", {"audio": lambda d: write_wav(d / "f32.wav", 1.0, subtype="FLOAT")}, ("accept", 1.0)),
    ("48 kHz stereo WAV", {"audio": lambda d: write_wav(d / "st48.wav", 1.5, sr=48000, channels=2)}, ("accept", 1.5)),
    ("8 kHz FLAC", {"audio": lambda d: write_wav(d / "nb.flac", 1.2, sr=8000)}, ("accept", 1.2)),
    ("WAV content named .ogg", {"audio": lambda d: _bytes(d / "named.ogg", write_wav(d / "t1.wav", 1.0).read_bytes())},
     ("accept", 1.0)),
    ("zero-length audio", {"audio": lambda d: _samples(d / "empty.wav", np.zeros(0, np.float32))},
     ("reject", "empty_audio")),
    ("ten-minute file", {"audio": lambda d: _ten_minutes(d / "ten minutes.wav")}, ("reject", "too_long")),
    ("0.1 s file", {"audio": lambda d: write_wav(d / "short.wav", 0.1)}, ("reject", "too_short")),
    ("NaN samples", {"audio": lambda d: _nan(d / "nan.wav", np.nan)}, ("reject", "nan_samples")),
    ("infinite samples", {"audio": lambda d: _nan(d / "inf.wav", np.inf)}, ("reject", "nan_samples")),
    ("digital silence", {"audio": lambda d: _samples(d / "silent.wav", np.zeros(16000, np.float32))},
     ("reject", "silent")),
    ("missing audio file", {"audio": lambda d: d / "no-such.wav"}, ("reject", "missing_file")),
    ("a directory named .wav", {"audio": lambda d: (d / "dir.wav").mkdir(parents=True) or d / "dir.wav"},
     ("reject", "missing_file")),
    ("path with spaces and non-ASCII", {"audio": lambda d: write_wav(d / "dossier été" / "clip n° 1.wav", 1.0)},
     ("accept", 1.0)),
    ("empty transcript", {"text": ""}, ("reject", "empty_text")),
    ("punctuation-only transcript", {"text": " ?! ... "}, ("reject", "empty_text")),
    ("very long transcript (150 words)", {"text": " ".join(["seven"] * 150)}, ("reject", "text_too_long")),
    ("numbers and symbols in transcript", {"text": "Call 911 at 7:30, $5!"}, ("accept", 1.0)),
    ("id with a space", {"id": "two words"}, ("reject", "bad_id")),
    ("id with a slash", {"id": "../escape"}, ("reject", "bad_id")),
    ("duplicate id", {"id": "good-00"}, ("reject", "duplicate_id")),
    ("unknown role", {"role": "training"}, ("reject", "unknown_role")),
    ("no role", {"role": None}, ("reject", "missing_role")),
    ("aligned entry without audio", {"audio": None}, ("reject", "missing_audio")),
    ("audio given as a number", {"audio": 5}, ("reject", "bad_line")),
    ("test sentence repeated in aligned", {"text": "dial nine nine nine please"}, ("reject", "test_overlap")),
    ("speech-role entry with a transcript", {"role": "speech", "text": "dropped"}, ("accept", 1.0)),
]

# Raw manifest lines (not produced from an entry dict): (case, line bytes, reason).
RAW_LINES = [
    ("malformed JSON line", b'{"id": "broken", "text": ', "bad_line"),
    ("JSON line that is a list", b'["a", "list"]', "bad_line"),
    ("JSON object without an id", b'{"text": "hello", "role": "text"}', "bad_line"),
    ("non-UTF-8 transcript", b'{"id": "latin1", "text": "caf\xe9", "role": "text"}', "non_utf8_text"),
]

# Kaldi directory lines: (case, id, reason).
KALDI = [
    ("piped wav.scp entry", "piped", "piped_command"),
    ("wav.scp line without a path", "nopath", "bad_line"),
    ("segments line with a non-number", "segbad", "bad_line"),
    ("segment of an unknown recording", "segorphan", "missing_file"),
    ("Kaldi utterance without a transcript", "notext", "missing_text"),
]


def entry_id(i: int) -> str:
    return f"case-{i:02d}"


def build_corpus(root: Path) -> tuple[Path, Path]:
    """The battery's manifest (good entries + every case) and Kaldi directory."""
    audio = root / "audio"
    rows = []
    for i in range(8):
        rows.append(json.dumps({"id": f"good-{i:02d}", "role": "aligned", "audio": str(write_wav(audio / f"g{i}.wav", 1.0, seed=i)),
                                "text": f"dial {i} two three please"}))
    rows.append(json.dumps({"id": "test-00", "role": "test", "audio": str(write_wav(audio / "t.wav", 1.0, seed=50)),
                            "text": "Dial nine nine nine, please!"}))
    for i in range(12):
        rows.append(json.dumps({"id": f"text-{i:02d}", "role": "text", "text": f"call {i} now please"}))
    for i, (_, entry, _) in enumerate(ENTRIES):
        row = {"id": entry_id(i), "role": "aligned", "text": "dial one two three please"}
        row |= {k: v for k, v in entry.items() if not callable(v)}
        if callable(entry.get("audio")):
            row["audio"] = str(entry["audio"](audio / f"c{i}"))
        elif "audio" not in entry:
            row["audio"] = str(write_wav(audio / f"c{i}" / "ok.wav", 1.0, seed=100 + i))
        if row.get("role") is None:
            row.pop("role")
        rows.append(json.dumps(row, ensure_ascii=False))
    manifest = root / "battery.jsonl"
    manifest.write_bytes("\n".join(rows).encode() + b"\n" + b"\n".join(line for _, line, _ in RAW_LINES) + b"\n")

    kaldi = root / "kaldi"
    kaldi.mkdir()
    rec = write_wav(root / "kaldi audio" / "réc 1.wav", 3.0, seed=7)
    (kaldi / "wav.scp").write_text(f"rec1 {rec}\npiped sox in.wav -t wav - |\nnopath\n", encoding="utf-8")
    (kaldi / "segments").write_text("k1 rec1 0.0 1.2\nk2 rec1 1.2 2.6\nsegbad rec1 zero 1\nsegorphan recX 0 1\n"
                                    "notext rec1 0.5 1.5\n")
    (kaldi / "text").write_text("k1 dial four please\nk2 dial five please\nsegbad x\nsegorphan y\n")
    return manifest, kaldi


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """Tokenize the battery once through the CLI: (rejects by id, kept ids with durations, stdout)."""
    warm_imports()
    root = tmp_path_factory.mktemp("battery")
    manifest, kaldi = build_corpus(root)
    res = zipper("tokenize", "--run-dir", "run", "--corpus", f"manifest:{manifest}", "--corpus", f"kaldi:{kaldi}@aligned",
                 "--units", "8", "--text-vocab", "30", cwd=root)
    rejects = read_jsonl(root / "run" / "data" / "rejects.jsonl")
    kept = {}
    for name in ("aligned", "train-text", "train-speech", "test"):
        kept |= {r["id"]: r for r in read_jsonl(root / "run" / "data" / f"{name}.jsonl")}
    return rejects, kept, res


@pytest.mark.parametrize("i", range(len(ENTRIES)), ids=[c for c, _, _ in ENTRIES])
def test_entry(battery, i):
    rejects, kept, _ = battery
    case, entry, (behaviour, value) = ENTRIES[i]
    uid = entry.get("id", entry_id(i))
    mine = [r for r in rejects if r["id"] == uid and (uid != "good-00" or r["reason"] == "duplicate_id")]
    if behaviour == "reject":
        assert [r["reason"] for r in mine] == [value], f"{case}: {mine}"
        assert mine[0]["detail"] and "\n" not in mine[0]["detail"]
        if uid == "good-00":
            assert "good-00" in kept  # the first of two is kept
    else:
        assert not mine and uid in kept, f"{case}: {mine}"
        if kept[uid]["duration"]:
            assert kept[uid]["duration"] == pytest.approx(value, abs=0.02)


@pytest.mark.parametrize("i", range(len(RAW_LINES)), ids=[c for c, _, _ in RAW_LINES])
def test_manifest_line(battery, i):
    rejects, _, _ = battery
    case, line, reason = RAW_LINES[i]
    n = len(ENTRIES) + 21 + i + 1  # its line number in the manifest
    mine = [r for r in rejects if r["detail"].split(": ", 1)[0].endswith(f"battery.jsonl:{n}")]
    assert [r["reason"] for r in mine] == [reason], (case, mine)


@pytest.mark.parametrize("i", range(len(KALDI)), ids=[c for c, _, _ in KALDI])
def test_kaldi_entry(battery, i):
    rejects, kept, _ = battery
    case, uid, reason = KALDI[i]
    assert [r["reason"] for r in rejects if r["id"] == uid] == [reason], case
    assert {"k1", "k2"} <= set(kept)  # the rest of the directory goes on


def test_the_rest_goes_on_and_the_summary_counts_rejects(battery):
    rejects, kept, res = battery
    assert {f"good-{i:02d}" for i in range(8)} <= set(kept) and "test-00" in kept
    assert "rejects" in res.stdout and "unreadable" in res.stdout and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------- command level


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny run with every training stage finished: tokenize, both towers, one fused model."""
    warm_imports()
    root = tmp_path_factory.mktemp("finished")
    manifest = make_small_manifest(root)
    train = ["--size", "tiny", "--steps", "2", "--max-tokens", "256", "--eval-every", "2", "--ckpt-every", "2"]
    zipper("tokenize", "--run-dir", "run", "--corpus", f"manifest:{manifest}", "--units", "16", "--text-vocab", "40",
           cwd=root)
    zipper("pretrain", "--run-dir", "run", "--tower", "text", *train, cwd=root)
    zipper("pretrain", "--run-dir", "run", "--tower", "speech", *train, cwd=root)
    zipper("fuse", "--run-dir", "run", "--steps", "2", "--max-tokens", "512", "--eval-every", "2", "--ckpt-every", "2",
           cwd=root)
    return root


FUSE2 = ["fuse", "--run-dir", "run", "--tag", "again", "--steps", "2", "--max-tokens", "512", "--eval-every", "2"]
DECODE = ["decode", "--run-dir", "run", "--max-new-tokens", "4"]


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _foreign_units(run: Path) -> None:
    shard_path = run / "tokens" / "aligned" / "shard-00000.npz"
    shard = read_shard(shard_path)
    shard.speech_tok = "f" * 64  # made by another speech tokenizer
    write_shard(shard_path, shard)


def _shape_mismatch(run: Path) -> None:
    import torch

    shutil.copy(run / "towers" / "speech" / "model.pt", run / "towers" / "text" / "model.pt")
    assert torch.load(run / "towers" / "text" / "model.pt", weights_only=True)


@dataclass
class Command:
    case: str
    args: list
    message: str  # what stderr starts with (after "error: ")
    setup: Callable[[Path], None] | None = None  # damages a copy of the finished run first


def _no_tokenize(run: Path) -> None:
    shutil.rmtree(run)


COMMANDS = [
    Command("corpus path that does not exist", ["tokenize", "--run-dir", "new", "--corpus", "manifest:nope.jsonl"],
            "--corpus manifest:nope.jsonl: nope.jsonl does not exist"),
    Command("unknown corpus kind", ["tokenize", "--run-dir", "new", "--corpus", "wav:x"], "--corpus wav:x: unknown corpus kind 'wav'"),
    Command("unknown role after @", ["tokenize", "--run-dir", "new", "--corpus", "manifest:corpus.jsonl@train"],
            "--corpus manifest:corpus.jsonl@train: unknown role 'train'"),
    Command("Kaldi directory without wav.scp", ["tokenize", "--run-dir", "new", "--corpus", "kaldi:audio"],
            "--corpus kaldi:audio: audio/wav.scp not found"),
    Command("a corpus whose every entry is bad", ["tokenize", "--run-dir", "new", "--corpus", "manifest:bad.jsonl"],
            "no usable utterances in manifest:bad.jsonl; see the reasons in new/data/rejects.jsonl",
            lambda run: (run.parent / "bad.jsonl").write_text('{"id": "a", "role": "aligned", "text": "x"}\n')),
    Command("--text-file that does not exist", ["tokenize", "--run-dir", "new", "--corpus", "manifest:corpus.jsonl",
                                                "--text-file", "nope.txt"], "--text-file nope.txt: no such file"),
    Command("--run-dir that is a file", ["tokenize", "--run-dir", "corpus.jsonl"], "--run-dir corpus.jsonl exists and is not a directory"),
    Command("corrupt run.json", ["pretrain", "--run-dir", "run", "--tower", "text", "--steps", "3"], "run/run.json is not valid JSON",
            lambda run: (run / "run.json").write_text("{half")),
    Command("pretrain before tokenize", ["pretrain", "--run-dir", "run", "--tower", "text"],
            "zipper pretrain --tower text needs stage 'tokenize' finished in run; run `zipper tokenize` first", _no_tokenize),
    Command("fuse before pretrain", FUSE2, "zipper fuse needs stage 'pretrain-speech' finished in run; run `zipper pretrain` first",
            lambda run: (run / "stages" / "pretrain-speech.done.json").unlink()),
    Command("units from a different tokenizer", FUSE2, "run/tokens/aligned/shard-00000.npz: speech tokens were made by "
            "tokenizer ffffffffffff but this run's speech tokenizer is", _foreign_units),
    Command("a truncated token shard", FUSE2, "run/tokens/aligned/shard-00000.npz: unreadable token shard",
            lambda run: (run / "tokens/aligned/shard-00000.npz").write_bytes(b"PK\x03\x04")),
    Command("a tower config from a newer zipper", FUSE2,
            "run/towers/text/config.json: checkpoint config has unknown key 'attention_sinks' (made by a newer zipper?)",
            lambda run: _edit_json(run / "towers/text/config.json", lambda c: c["tower"].update(attention_sinks=4))),
    Command("tower weights that do not fit its config", FUSE2, "run/towers/text/model.pt: does not fit the model in "
            "run/towers/text/config.json", _shape_mismatch),
    Command("a fused model config from a newer zipper", [*DECODE, "--outputs", "text"],
            "--model fused/zipper-freeze-text: run/fused/zipper-freeze-text/config.json: zipper config has unknown key 'routing'",
            lambda run: _edit_json(run / "fused/zipper-freeze-text/config.json", lambda c: c["zipper"].update(routing="top2"))),
    Command("decode given a tower instead of a fused model", [*DECODE, "--model", "towers/text", "--outputs", "text"],
            "--model towers/text is a unimodal text tower"),
    Command("decode of a model that does not exist", [*DECODE, "--model", "fused/nope"], "--model fused/nope: no finished model"),
    Command("unknown --outputs", [*DECODE, "--outputs", "video"], "--outputs must be a comma list of text and speech"),
    Command("unreadable --wav", [*DECODE, "--wav", "corpus.jsonl", "--outputs", "text"], "--wav corpus.jsonl: "),
    Command("missing --wav", [*DECODE, "--wav", "nope.wav", "--outputs", "text"], "--wav nope.wav: no such file (missing_file)"),
    Command("--text empty after normalisation", [*DECODE, "--text", "?!", "--outputs", "speech"],
            "--text '?!' is empty after normalisation"),
    Command("--wav and --text together", [*DECODE, "--wav", "a.wav", "--text", "hi"], "give --wav (speech in) or --text"),
    Command("--best-of with beam search", [*DECODE, "--text", "hi", "--outputs", "speech", "--best-of", "2"],
            "--best-of picks among sampled outputs: it needs --strategy sample"),
    Command("--best-of with a model that has no CTC head",
            [*DECODE, "--text", "hi", "--outputs", "speech", "--strategy", "sample", "--best-of", "2"],
            "--best-of needs a Zipper fused with --ctc-weight (its CTC head reads the speech); this model has none"),
    Command("--voice of no speaker in the run", [*DECODE, "--text", "hi", "--outputs", "speech", "--voice", "cat"],
            "--voice 'cat': not a speaker of this run's speech and aligned audio (known: bob, ann)"),
    Command("--voice without speech outputs", [*DECODE, "--text", "hi", "--outputs", "text", "--voice", "bob"],
            "--voice chooses the voice of speech outputs: add speech to --outputs"),
    Command("negative --guidance", [*DECODE, "--text", "hi", "--outputs", "speech", "--guidance", "-1"],
            "--guidance (-1.0) must be >= 0"),
    Command("--rehearsal with the speech tower frozen", [*FUSE2, "--freeze", "text,speech", "--rehearsal", "1"],
            "--rehearsal trains the speech tower of a Zipper: it needs --arch zipper and a --freeze that leaves"),
    Command("--speech-input-noise of 1", [*FUSE2, "--speech-input-noise", "1"],
            "--speech-input-noise must be in [0, 1) (got 1.0)"),
    Command("--clock-align-weight without a CTC head", [*FUSE2, "--xattn-pos", "learned", "--clock-align-weight", "1"],
            "--clock-align-weight needs --xattn-pos learned (the clock it trains) and --ctc-weight"),
    Command("eval of a decode that never ran", ["eval", "--run-dir", "run", "--decode", "nope"],
            "zipper eval needs stage 'decode-nope' finished in run"),
    Command("a finished stage rerun with another config",
            ["fuse", "--run-dir", "run", "--steps", "4", "--max-tokens", "512", "--eval-every", "2", "--ckpt-every", "2"],
            "stage 'fuse-zipper-freeze-text' already finished in run with a different config (config.train.max_steps: 2 -> 4)"),
]
NEWER = ["fuse", "--run-dir", "run", "--tag", "again", "--steps", "3", "--max-tokens", "512", "--eval-every", "2",
         "--ckpt-every", "1"]


def _newer_checkpoint(run: Path) -> None:
    """fused/again has an unfinished run whose checkpoint lacks what this version needs."""
    import torch

    from zipper_cli.checkpoint import save_checkpoint

    out = run / "fused" / "again"
    assert zipper(*NEWER, cwd=run.parent, kill_at="step:2").killed
    for p in (out / "ckpt").glob("step-*"):
        p.unlink()
    save_checkpoint(out / "ckpt", 1, {"model": {"future.weight": torch.zeros(2)}, "format": 99}, None, 2)


COMMANDS.append(Command("a training checkpoint written by a newer zipper", NEWER,
                        "run/fused/again/ckpt: checkpoint step 1 does not fit this model or this zipper", _newer_checkpoint))


@pytest.mark.parametrize("i", range(len(COMMANDS)), ids=[c.case for c in COMMANDS])
def test_command(finished, tmp_path, i):
    cmd = COMMANDS[i]
    cwd = finished
    if cmd.setup is not None:
        cwd = tmp_path / "w"
        shutil.copytree(finished, cwd, ignore=shutil.ignore_patterns("audio"))
        (cwd / "audio").symlink_to(finished / "audio")
        cmd.setup(cwd / "run")
    res = zipper(*cmd.args, cwd=cwd, ok=False)
    assert res.returncode == 2, str(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("error: " + cmd.message), lines[0]
