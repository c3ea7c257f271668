"""Reading audio: whatever soundfile reads, any rate, any channel count -> 16 kHz mono float32.

Problems with one file are returned as a reject reason, never raised: the rest of the corpus goes on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class AudioLimits:
    """What audio a corpus accepts; the rest is rejected with a reason."""

    min_seconds: float = 0.3
    """Shorter audio is rejected as too_short (--min-seconds)."""
    max_seconds: float = 30.0
    """Longer audio is rejected as too_long (--max-seconds); long files would dominate length buckets."""
    silence_peak: float = 1e-3
    """Audio whose absolute peak stays below this (full scale = 1) is rejected as silent."""


class AudioReject(Exception):
    """One file's problem: `reason` is a short machine-readable code, the message is for people."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def read_audio(path: str, limits: AudioLimits = AudioLimits(), start: float | None = None,
               end: float | None = None) -> np.ndarray:
    """Read `path` (or its [start, end) seconds: Kaldi segments) as 16 kHz mono float32 in [-1, 1].

    Raises AudioReject with the reason when the file cannot be used.
    """
    if not path:
        raise AudioReject("missing_file", "no audio path given")
    if not os.path.isfile(path):
        raise AudioReject("missing_file", f"{path}: no such file")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioReject("unreadable", f"{path}: {_one_line(e)}") from None
    if info.frames == 0 or info.samplerate <= 0:
        raise AudioReject("empty_audio", f"{path}: contains no samples")
    first = 0 if start is None else int(round(start * info.samplerate))
    last = info.frames if end is None else min(info.frames, int(round(end * info.samplerate)))
    if last <= first:
        raise AudioReject("empty_audio", f"{path}: segment [{start}, {end}) holds no samples")
    if (last - first) / info.samplerate > limits.max_seconds * 1.05 + 1.0:
        # Checked from the header so a ten-minute file is never decoded.
        raise AudioReject("too_long", f"{path}: {(last - first) / info.samplerate:.1f} s > --max-seconds {limits.max_seconds}")
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True, start=first, stop=last)  # [samples, channels]
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise AudioReject("unreadable", f"{path}: {_one_line(e)}") from None
    return check_audio(wav.mean(axis=1), sr, path, limits)


def check_audio(wav: np.ndarray, sr: int, path: str, limits: AudioLimits = AudioLimits()) -> np.ndarray:
    """Resample mono `wav` to 16 kHz and apply the limits."""
    if wav.size == 0:
        raise AudioReject("empty_audio", f"{path}: contains no samples")
    if not np.isfinite(wav).all():
        raise AudioReject("nan_samples", f"{path}: contains NaN or infinite samples")
    if sr != SAMPLE_RATE:
        wav = resample(wav, sr)
    seconds = wav.size / SAMPLE_RATE
    if seconds < limits.min_seconds:
        raise AudioReject("too_short", f"{path}: {seconds:.2f} s < --min-seconds {limits.min_seconds}")
    if seconds > limits.max_seconds:
        raise AudioReject("too_long", f"{path}: {seconds:.1f} s > --max-seconds {limits.max_seconds}")
    peak = float(np.abs(wav).max())
    if peak < limits.silence_peak:
        raise AudioReject("silent", f"{path}: peak amplitude {peak:.2e} below {limits.silence_peak:g}")
    return np.clip(wav, -1.0, 1.0).astype(np.float32, copy=False)


def resample(wav: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), sr, target).numpy()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
