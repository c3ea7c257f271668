"""Unit vocoder: speech units -> 100 Hz log-mel frames (a small trained network) -> waveform (Griffin-Lim).

Modules:
  vocoder_model.py        VocoderConfig and the network (UnitVocoder): units -> log-mel frames
  vocoder_griffin_lim.py  griffin_lim(_many): log-mel frames -> waveform
  vocoder_train.py        train_vocoder, load_vocoder (a vocoder directory)
  vocoder.py              the run directory's vocoder (ensure_vocoder, run_vocoder); every public name
                          above is importable from here

On disk (a directory): train.pt (checkpoint while training: model, optimizer, step, loss history),
then vocoder.pt (model tensors only) and config.json (config, loss, data signature), written
atomically, config.json last; ensure_vocoder adds vocoder.json (tokenizer checksum, versions) after.
All .pt files are plain tensors loaded with weights_only=True.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path
from collections import Counter
from typing import Callable, Iterable, Iterator

import numpy as np
import torchaudio

from .atomic import read_jsonl, write_json
from .console import log as console_log, progress
from .errors import ZipperError
from .vocoder_griffin_lim import griffin_lim, griffin_lim_many
from .vocoder_model import FORMAT, INFERENCE_ONLY, MEL_RATE, UnitVocoder, VocoderConfig
from .vocoder_train import load_vocoder, prepare_pairs, train_vocoder, with_inference_settings

__all__ = ["FORMAT", "INFERENCE_ONLY", "MEL_RATE", "UnitVocoder", "VocoderConfig", "ensure_vocoder", "griffin_lim",
           "griffin_lim_many", "load_vocoder", "prepare_pairs", "rank_speakers", "run_vocoder", "train_vocoder",
           "training_speakers"]


# ----------------------------------------------------------------------------- run directory


@contextlib.contextmanager
def _dir_lock(path: Path, log):
    """A blocking exclusive lock: a second process needing the vocoder waits for the first to train it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"vocoder: another process is training it ({path}); waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


MANIFESTS = {"speech": "train-speech.jsonl", "aligned": "aligned.jsonl"}  # the roles the vocoder trains on


def rank_speakers(labels: Iterable) -> tuple[str, ...]:
    """Distinct speaker labels (None skipped), most frequent first (ties by name): VocoderConfig.speakers.
    Empty when fewer than two are labelled (nothing to tell apart)."""
    counts = Counter(str(x) for x in labels if x is not None)
    ranked = tuple(sorted(counts, key=lambda k: (-counts[k], k)))
    return ranked if len(ranked) >= 2 else ()


def training_speakers(run_dir: Path) -> tuple[str, ...]:
    """rank_speakers over the run's speech + aligned manifest rows with audio."""
    labels = []
    for role, name in MANIFESTS.items():
        path = run_dir / "data" / name
        if (run_dir / "tokens" / role / "index.json").exists() and path.exists():
            labels += [row.get("speaker") for row in read_jsonl(path) if row.get("audio")]
    return rank_speakers(labels)


def _training_pairs(run_dir: Path, checksum: str, cfg: VocoderConfig, log) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """(units, wav, speaker) for a seeded sample of the run's speech + aligned utterances, read lazily."""
    from .audio import AudioLimits, AudioReject, read_audio
    from .shards import load_role

    items = []
    for role, name in MANIFESTS.items():
        if not (run_dir / "tokens" / role / "index.json").exists():
            continue
        units = {r["id"]: r["speech"] for r in load_role(run_dir, role, speech_tok=checksum)
                 if r["speech"] is not None and len(r["speech"])}
        path = run_dir / "data" / name
        if not path.exists():
            raise ZipperError(f"{path} not found: the run's manifests are incomplete; rerun zipper tokenize")
        for row in read_jsonl(path):
            if row.get("id") in units and row.get("audio"):
                items.append((row, units[row["id"]]))
    if not items:
        raise ZipperError(f"{run_dir}: no speech or aligned utterances with units and audio to train the vocoder on; "
                          "run zipper tokenize with speech audio first")
    items.sort(key=lambda x: x[0]["id"])
    perm = np.random.default_rng(cfg.seed).permutation(len(items))[:cfg.max_utterances]
    limits = AudioLimits(min_seconds=0.0, max_seconds=1e9, silence_peak=0.0)  # rows already passed tokenize
    log(f"vocoder: reading {len(perm)} of {len(items)} speech + aligned utterances")
    skipped = 0
    with progress() as bar:
        task = bar.add_task("vocoder: reading audio", total=len(perm))
        for i in perm:
            row, u = items[int(i)]
            try:
                wav = read_audio(row["audio"], limits, row.get("start"), row.get("end"))
            except AudioReject as e:
                skipped += 1
                if skipped <= 3:
                    log(f"vocoder: skipping {row['id']}: {e.detail}")
                continue
            finally:
                bar.advance(task)
            yield np.asarray(u), wav, row.get("speaker")
    if skipped:
        log(f"vocoder: {skipped} unreadable utterances skipped")


def ensure_vocoder(run_dir: str | Path, log: Callable[[str], None] = console_log,
                   cfg: VocoderConfig | None = None) -> UnitVocoder:
    """The run's unit vocoder, trained on first need.

    Loads run_dir/tokenizers/speech/vocoder/ when its vocoder.json records this run's speech-tokenizer
    checksum (and the same config); otherwise trains one on the run's speech + aligned roles (units
    from the token shards, audio from data/train-speech.jsonl and data/aligned.jsonl) and writes
    vocoder.json last. `cfg` defaults to VocoderConfig(); its vocab_size, frame_rate and n_mels are
    always taken from the speech tokenizer.
    """
    from .rundir import versions

    run_dir = Path(run_dir)
    tok_dir = run_dir / "tokenizers" / "speech"
    tok_json = tok_dir / "tokenizer.json"
    try:
        tok = json.loads(tok_json.read_text(encoding="utf-8"))
        checksum, kind = tok["checksum"], tok["kind"]
        frame_rate, vocab, tok_cfg = float(tok["frame_rate"]), int(tok["vocab_size"]), tok["config"]
    except FileNotFoundError:
        raise ZipperError(f"{tok_json}: no speech tokenizer in this run; run zipper tokenize first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ZipperError(f"{tok_json}: corrupt speech tokenizer file ({type(e).__name__}: {e})") from None
    if kind == "encodec":
        raise ZipperError("the unit vocoder is for k-means units; encodec units are decoded by EnCodec's own decoder")
    if tok_cfg.get("dedup"):
        raise ZipperError(f"{tok_json}: units are deduplicated (--dedup), so they carry no durations and the "
                          "unit vocoder cannot time its frames; re-tokenize without --dedup")
    n_mels = int(tok_cfg.get("n_mels", 80)) if kind == "mel-kmeans" else 80
    cfg = dataclasses.replace(cfg or VocoderConfig(), vocab_size=vocab, frame_rate=frame_rate, n_mels=n_mels)
    cfg = dataclasses.replace(cfg, speakers=training_speakers(run_dir) if cfg.by_speaker else ())
    cfg.validate()
    voc_dir = tok_dir / "vocoder"
    marker = voc_dir / "vocoder.json"
    with _dir_lock(voc_dir / ".lock", log):
        if marker.exists():
            try:
                m = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                m = {}
            if m.get("tokenizer_checksum") == checksum and VocoderConfig.same_training(m.get("training_config"), cfg):
                return with_inference_settings(load_vocoder(voc_dir), cfg)
            log(f"vocoder: {voc_dir} was trained for another speech tokenizer or config; retraining")
            marker.unlink()
        log(f"vocoder: training the unit vocoder for speech tokenizer {checksum[:12]} (first use)")
        t0 = time.time()
        model = train_vocoder(_training_pairs(run_dir, checksum, cfg, log), cfg, voc_dir, log)
        write_json(marker, {
            "format": FORMAT, "tokenizer_checksum": checksum, "config": cfg.to_dict(),
            "training_config": cfg.training_dict(),
            "train_l1": model.train_l1, "utterances": model.utterances, "wall_seconds": round(time.time() - t0, 1),
            "versions": versions() | {"torchaudio": torchaudio.__version__},
        })
    return model


def run_vocoder(run_dir: str | Path, steps: int | None = None, log: Callable[[str], None] = console_log) -> UnitVocoder:
    """The vocoder a stage should use: the run's trained one whatever its config, else one trained now
    with the default config (or `steps` training steps)."""
    marker = Path(run_dir) / "tokenizers" / "speech" / "vocoder" / "vocoder.json"
    cfg = VocoderConfig(steps=steps) if steps else None
    if marker.exists() and steps is None:
        try:
            cfg = VocoderConfig.from_dict(json.loads(marker.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError, ZipperError):
            cfg = None  # unreadable, or a retired setting: ensure_vocoder retrains
    return ensure_vocoder(run_dir, log=log, cfg=cfg)
