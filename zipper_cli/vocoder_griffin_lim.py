"""Griffin-Lim for the unit vocoder: un-normalised 100 Hz log-mel frames -> 16 kHz waveform.

Waveform: exp(log-mel) - eps -> torchaudio InverseMelScale (driver "gelsd": the HTK filterbank of
80 mels over 201 bins has empty filters, so the system is rank deficient) -> GriffinLim, with exactly
the MelSpectrogram settings of speech_tokenizer (16 kHz, n_fft 400, hop 160, Hann, centred, power 2,
HTK mel 0-8000 Hz, no norm). len(units) units give len(units) * 16000 / frame_rate samples.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

from .speech_features import HOP, LOG_EPS, N_FFT, SAMPLE_RATE


@functools.lru_cache(maxsize=4)
def _inverse_mel(n_mels: int) -> torchaudio.transforms.InverseMelScale:
    # the same filterbank as speech_tokenizer's MelSpectrogram(sample_rate=16000, n_fft=400, n_mels=n_mels):
    # f_min 0, f_max sr/2, norm None, HTK mel scale
    return torchaudio.transforms.InverseMelScale(n_stft=N_FFT // 2 + 1, n_mels=n_mels, sample_rate=SAMPLE_RATE,
                                                 f_min=0.0, f_max=None, norm=None, mel_scale="htk", driver="gelsd")


@functools.lru_cache(maxsize=1)
def _window() -> torch.Tensor:
    return torch.hann_window(N_FFT)


@contextlib.contextmanager
def _one_thread():
    """Griffin-Lim's small FFTs gain nothing from threads, and on busy cores a second OpenMP thread
    made it 5-50x slower (threads wait at every op's barrier); one thread is 0.04-0.08 x real time."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def griffin_lim(log_mel_frames: torch.Tensor | np.ndarray, n_iter: int = 48, momentum: float = 0.99,
                seed: int = 0) -> np.ndarray:
    """Un-normalised log-mel [T, n_mels] at 100 Hz (speech_features.log_mel's scale) -> T * 160 samples
    of 16 kHz float32 audio in [-1, 1]. Deterministic: the random initial phase comes from `seed`."""
    lm = torch.as_tensor(np.asarray(log_mel_frames, dtype=np.float32) if not torch.is_tensor(log_mel_frames)
                         else log_mel_frames.detach().float().cpu())
    if lm.ndim != 2:
        raise ValueError(f"griffin_lim expects [frames, n_mels], got shape {tuple(lm.shape)}")
    t = lm.shape[0]
    if t < 2:
        return np.zeros(t * HOP, dtype=np.float32)
    with torch.no_grad(), _one_thread():
        mel_power = (lm.clamp(max=30.0).exp() - LOG_EPS).clamp_min(0.0).t().contiguous()  # [n_mels, T]
        spec = _inverse_mel(lm.shape[1])(mel_power)  # [201, T] power spectrogram
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # length (T-1)*hop: the centred STFT of that many samples has exactly T frames
            wav = torchaudio.functional.griffinlim(spec, _window(), N_FFT, HOP, N_FFT, 2.0, n_iter, momentum,
                                                   (t - 1) * HOP, True)
    wav = torch.nan_to_num(wav, nan=0.0, posinf=0.0, neginf=0.0)
    wav = F.pad(wav, (0, HOP))  # T frames stand for T * hop samples
    peak = float(wav.abs().max())
    if peak > 0.99:
        wav = wav * (0.99 / peak)
    return wav.numpy().astype(np.float32)


_MIN_PER_WORKER = 4  # fewer utterances per process than this: not worth starting processes


def _init_worker() -> None:
    torch.set_num_threads(1)  # before any torch op in a forked child (as DataLoader workers do)


def _griffin_lim_job(job: tuple[np.ndarray, int, float]) -> np.ndarray:
    frames, n_iter, momentum = job
    return griffin_lim(frames, n_iter, momentum)


def griffin_lim_many(frames_list: Sequence[torch.Tensor | np.ndarray], n_iter: int = 48, momentum: float = 0.99,
                     workers: int | None = None) -> list[np.ndarray]:
    """griffin_lim over many utterances, spread over `workers` processes (default: the CPUs this process
    may use). Griffin-Lim is single-threaded and each utterance is seeded alike, so the result is the
    same as one by one, bit for bit, in a fraction of the time."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = [(np.asarray(m.detach().float().cpu() if torch.is_tensor(m) else m, dtype=np.float32), n_iter, momentum)
            for m in frames_list]
    n = min(workers, len(jobs) // _MIN_PER_WORKER)
    if n <= 1:
        return [_griffin_lim_job(j) for j in jobs]
    # fork: no re-import of the caller (spawn would cost seconds per process where fork is missing)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))  # longest first: the workers finish together
    with ctx.Pool(n, initializer=_init_worker) as pool:
        done = pool.map(_griffin_lim_job, [jobs[i] for i in order], chunksize=1)
    out: list[np.ndarray | None] = [None] * len(jobs)
    for i, wav in zip(order, done):
        out[i] = wav
    return out  # type: ignore[return-value]
