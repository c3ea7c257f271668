"""Unit vocoder: speech units -> 100 Hz log-mel frames (a small trained network) -> waveform (Griffin-Lim).

Why a network and not a lookup: replacing every unit by its cluster's mean log-mel frame loses most of
the intelligibility (pocketsphinx WER 0.38 on the original audio became 0.75 for 25 Hz K=512 units),
because one unit stands for many spectra. A non-causal dilated convolution stack over the unit
sequence (context of about +-0.5 s by default) resolves much of that ambiguity from the neighbours.

Network (UnitVocoder), at the unit rate until the last step:
  unit embedding [K, C] -> `layers` pre-norm residual blocks (RMS norm over channels, GELU, dilated
  conv k, GELU, 1x1 conv; dilations cycled from cfg.dilations) -> RMS norm, GELU, 1x1 conv to
  up * n_mels, read as `up` = 100/frame_rate consecutive mel frames per unit (a transposed conv with
  kernel = stride = up: position-specific weights; 4 frames per 25 Hz unit, 2 per 50 Hz unit)
  -> `post_layers` residual postnet blocks at 100 Hz on the mel frames (conv k, GELU, conv k) that
  smooth the unit boundaries. The output is un-normalised log-mel (speech_tokenizer.log_mel's scale).
  All the heavy layers run at the unit rate, which keeps training a few minutes on two CPU cores.
  Padded positions are zeroed before every convolution, so a padded batch gives exactly the output of
  each sequence alone.

Waveform: exp(log-mel) - eps -> torchaudio InverseMelScale (driver "gelsd": the HTK filterbank of
80 mels over 201 bins has empty filters, so the system is rank deficient) -> GriffinLim, with exactly
the MelSpectrogram settings of speech_tokenizer (16 kHz, n_fft 400, hop 160, Hann, centred, power 2,
HTK mel 0-8000 Hz, no norm). len(units) units give len(units) * 16000 / frame_rate samples.

Training (train_vocoder): L1 between predicted and true log-mel (the audio's 100 Hz frames trimmed to
units * 100/frame_rate), random fixed-length segments, AdamW with warmup + cosine. Batches are a
pure function of (seed, step), so an interrupted run resumes exactly from its checkpoint.

On disk (a directory): train.pt (checkpoint while training: model, optimizer, step, loss history),
then vocoder.pt (model tensors only) and config.json (config, loss, data signature), written
atomically, config.json last; ensure_vocoder adds vocoder.json (tokenizer checksum, versions) after.
All .pt files are plain tensors loaded with weights_only=True.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from . import __version__
from .atomic import atomic_path, read_jsonl, write_json
from .console import log as console_log, progress
from .errors import Interrupted, ZipperError
from .speech_tokenizer import HOP, LOG_EPS, N_FFT, SAMPLE_RATE, log_mel

MEL_RATE = SAMPLE_RATE // HOP  # 100 Hz
FORMAT = 1  # bump when the network or the on-disk layout changes
INFERENCE_ONLY = ("gl_iters", "gl_momentum", "save_every")  # VocoderConfig fields that never change the weights
# Fields that earlier versions wrote, with the value that meant "off": stored configs holding that value
# load as before; any other value was a network this toolkit can no longer rebuild (retrain it).
# mel_floor (the target log(mel + floor)): 1e-4 gave pocketsphinx WER 0.314 vs 0.319 without on 200 demo
# test utterances (25 Hz, K=512, 2000 steps): no gain, so it went.
_RETIRED = {"mel_floor": 0.0}


@dataclass(frozen=True)
class VocoderConfig:
    """The unit vocoder: network shape, training and Griffin-Lim settings."""

    vocab_size: int = 512
    """Number of distinct units (the speech tokenizer's K); ensure_vocoder takes it from the tokenizer."""
    frame_rate: float = 25.0
    """Unit rate in Hz (the tokenizer's); 100 / frame_rate must be a whole number (100, 50, 25 Hz...)."""
    n_mels: int = 80
    """Mel bins of the predicted frames (the tokenizer's n_mels)."""
    channels: int = 256
    """Width of the convolution stack."""
    layers: int = 6
    """Residual dilated-conv blocks at the unit rate (the context)."""
    kernel_size: int = 3
    """Kernel of the unit-rate convolutions (odd)."""
    dilations: tuple[int, ...] = (1, 2, 4)
    """Dilations cycled over the unit-rate blocks. Receptive field: 1 + sum((k-1)*d) units; the default
    6 blocks x (1, 2, 4) at 25 Hz span 29 units = 1.16 s (+-0.56 s around each unit)."""
    post_layers: int = 1
    """Residual postnet blocks at 100 Hz on the mel frames (smooth the unit boundaries); 0 for none."""
    post_channels: int = 128
    """Hidden width of the postnet blocks."""
    post_kernel_size: int = 5
    """Kernel of the 100 Hz postnet convolutions (odd)."""
    steps: int = 3000
    """Optimizer steps in total (3000 x 16 x 2 s: 8-25 min on one busy CPU core, 1.9M parameters).
    Raised from 2000 together with max_utterances 3000 -> 6000: pocketsphinx WER on audio resynthesised
    from gold units 0.319 -> 0.296 (original audio 0.169; 200 demo test utterances, 25 Hz, K=512)."""
    lr: float = 2e-3
    """Peak AdamW learning rate (warmup, then cosine decay to lr/10)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices."""
    batch_size: int = 16
    """Segments per step."""
    segment_seconds: float = 2.0
    """Length of the random training segments (shorter utterances are padded and masked)."""
    save_every: int = 200
    """Steps between checkpoints (train.pt); an interrupted run resumes from the last one."""
    max_utterances: int = 6000
    """ensure_vocoder trains on at most this many (speech, aligned) utterances, a seeded sample
    (their log-mel frames are held in memory: about 75 MB per hour of audio). 6000 = all of the demo
    corpus's speech + aligned roles (3.9 h); raised from 3000 with `steps`, see there."""
    seed: int = 0
    """Initialisation, the utterance sample and the segment draws."""
    gl_iters: int = 48
    """Griffin-Lim iterations (cost grows linearly; ~0.04 real-time factor for 64 on one CPU core)."""
    gl_momentum: float = 0.99
    """Griffin-Lim momentum ("fast Griffin-Lim"; 0 is the classic algorithm)."""

    def validate(self) -> None:
        up = MEL_RATE / self.frame_rate if self.frame_rate > 0 else 0
        checks = [
            (self.vocab_size >= 1, f"vocab_size {self.vocab_size}: must be >= 1"),
            (self.frame_rate > 0 and up >= 1 and abs(up - round(up)) < 1e-6,
             f"frame_rate {self.frame_rate}: 100 / frame_rate must be a whole number (100, 50, 25, 20... Hz)"),
            (self.n_mels >= 1, f"n_mels {self.n_mels}: must be >= 1"),
            (self.channels >= 1, f"channels {self.channels}: must be >= 1"),
            (self.layers >= 0, f"layers {self.layers}: must be >= 0"),
            (self.kernel_size >= 1 and self.kernel_size % 2 == 1, f"kernel_size {self.kernel_size}: must be odd and >= 1"),
            (len(self.dilations) >= 1 and all(int(d) >= 1 for d in self.dilations),
             f"dilations {list(self.dilations)}: need at least one, each >= 1"),
            (self.post_layers >= 0, f"post_layers {self.post_layers}: must be >= 0"),
            (self.post_channels >= 1, f"post_channels {self.post_channels}: must be >= 1"),
            (self.post_kernel_size >= 1 and self.post_kernel_size % 2 == 1,
             f"post_kernel_size {self.post_kernel_size}: must be odd and >= 1"),
            (self.steps >= 1, f"steps {self.steps}: must be >= 1"),
            (self.lr > 0, f"lr {self.lr}: must be > 0"),
            (self.warmup_steps >= 0, f"warmup_steps {self.warmup_steps}: must be >= 0"),
            (self.weight_decay >= 0, f"weight_decay {self.weight_decay}: must be >= 0"),
            (self.batch_size >= 1, f"batch_size {self.batch_size}: must be >= 1"),
            (self.segment_seconds > 0 and self.segment_seconds * self.frame_rate >= 1,
             f"segment_seconds {self.segment_seconds}: must hold at least one unit"),
            (self.save_every >= 1, f"save_every {self.save_every}: must be >= 1"),
            (self.max_utterances >= 1, f"max_utterances {self.max_utterances}: must be >= 1"),
            (self.gl_iters >= 1, f"gl_iters {self.gl_iters}: must be >= 1"),
            (0 <= self.gl_momentum < 1, f"gl_momentum {self.gl_momentum}: must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ZipperError(f"vocoder config: {msg}")

    @property
    def upsample(self) -> int:
        """100 Hz mel frames per unit."""
        return int(round(MEL_RATE / self.frame_rate))

    @property
    def segment_units(self) -> int:
        return max(1, int(round(self.segment_seconds * self.frame_rate)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dilations"] = [int(x) for x in self.dilations]
        return d

    def training_dict(self) -> dict:
        """The settings that change the trained weights (Griffin-Lim and checkpoint spacing do not)."""
        return {k: v for k, v in self.to_dict().items() if k not in INFERENCE_ONLY}

    @classmethod
    def same_training(cls, stored: dict, cfg: "VocoderConfig") -> bool:
        """Whether a stored (to_dict or training_dict) config trains the same weights as cfg; stored
        configs of earlier versions are read through from_dict, so retired fields at their "off" value
        compare equal."""
        try:
            return cls.from_dict(stored).training_dict() == cfg.training_dict()
        except (ZipperError, ValueError, TypeError, AttributeError):
            return False

    @classmethod
    def from_dict(cls, d: dict) -> "VocoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for k, off in _RETIRED.items():
            if k in d and d[k] != off:
                raise ZipperError(f"vocoder config: {k}={d[k]!r} is no longer supported (only {off!r}); "
                                  "retrain the vocoder")
        d = {k: v for k, v in d.items() if k not in _RETIRED}  # their "off" value: what this version does
        unknown = sorted(set(d) - known)
        if unknown:
            raise ZipperError(f"vocoder config: unknown fields {unknown}")
        d = dict(d)
        if "dilations" in d:
            d["dilations"] = tuple(int(x) for x in d["dilations"])
        return cls(**d)


# ----------------------------------------------------------------------------- the network


class _ChannelNorm(nn.Module):
    """RMS norm over the channel axis of [B, C, T] (no transposes: cheap on CPU)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight[:, None]


class _ResBlock(nn.Module):
    """x + W2 gelu(conv_k,d(gelu(norm(x)))), with padded positions zeroed before each convolution."""

    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__()
        self.norm = _ChannelNorm(channels)
        self.conv = nn.Conv1d(channels, channels, kernel, dilation=dilation, padding=(kernel - 1) // 2 * dilation)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm(x)) * mask
        h = self.proj(F.gelu(self.conv(h)))
        return (x + h) * mask


class _PostBlock(nn.Module):
    """At 100 Hz on the mel frames: mel + conv_k(gelu(conv_k(mel))) through `channels` (a postnet)."""

    def __init__(self, n_mels: int, channels: int, kernel: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, channels, kernel, padding=(kernel - 1) // 2)
        self.conv2 = nn.Conv1d(channels, n_mels, kernel, padding=(kernel - 1) // 2)
        nn.init.zeros_(self.conv2.weight)  # starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv1(mel * mask)) * mask
        return mel + self.conv2(h)


class UnitVocoder(nn.Module):
    """Units [B, T] -> un-normalised 100 Hz log-mel [B, T * upsample, n_mels]; vocode() adds Griffin-Lim."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        c, up = cfg.channels, cfg.upsample
        self.embed = nn.Embedding(cfg.vocab_size, c)
        self.pre = nn.ModuleList(_ResBlock(c, cfg.kernel_size, int(cfg.dilations[i % len(cfg.dilations)]))
                                 for i in range(cfg.layers))
        self.norm = _ChannelNorm(c)
        # position-specific frames: unit t gives mel frames t*up .. t*up+up-1 (a transposed conv, kernel = stride)
        self.out = nn.Conv1d(c, up * cfg.n_mels, 1)
        nn.init.constant_(self.out.bias, math.log(1e-3))  # a quiet start; train_vocoder sets the data mean
        self.post = nn.ModuleList(_PostBlock(cfg.n_mels, cfg.post_channels, cfg.post_kernel_size)
                                  for _ in range(cfg.post_layers))

    def set_output_mean(self, mean_frame: torch.Tensor) -> None:
        """Start the output at this log-mel frame [n_mels] (the training data's mean)."""
        with torch.no_grad():
            self.out.bias.copy_(mean_frame.float().repeat(self.upsample))

    @property
    def upsample(self) -> int:
        return self.cfg.upsample

    @property
    def receptive_field_seconds(self) -> float:
        """Span of units that one output frame depends on (unit-rate blocks; the 100 Hz blocks add a little)."""
        units = 1 + sum((self.cfg.kernel_size - 1) * int(self.cfg.dilations[i % len(self.cfg.dilations)])
                        for i in range(self.cfg.layers))
        frames = 2 * (self.cfg.post_kernel_size - 1) * self.cfg.post_layers
        return units / self.cfg.frame_rate + frames / MEL_RATE

    def forward(self, units: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, t = units.shape
        up = self.upsample
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=units.device)
        mask = (torch.arange(t, device=units.device)[None, :] < lengths[:, None]).unsqueeze(1).float()  # [B,1,T]
        x = self.embed(units.clamp(0, self.cfg.vocab_size - 1)).transpose(1, 2) * mask  # [B, C, T]
        for block in self.pre:
            x = block(x, mask)
        y = self.out(F.gelu(self.norm(x)))  # [B, up*n_mels, T]
        mel = y.view(b, up, self.cfg.n_mels, t).permute(0, 2, 3, 1).reshape(b, self.cfg.n_mels, t * up)
        if self.post:
            up_mask = mask.repeat_interleave(up, dim=2)
            for block in self.post:
                mel = block(mel, up_mask)
        return mel.transpose(1, 2)  # [B, T*up, n_mels]

    def _check_units(self, units) -> np.ndarray:
        u = np.asarray(units)
        if u.ndim != 1:
            raise ValueError(f"vocoder expects a 1-D unit sequence, got shape {u.shape}")
        if u.size and (u.min() < 0 or u.max() >= self.cfg.vocab_size):
            raise ZipperError(f"units outside 0..{self.cfg.vocab_size - 1} (got {int(u.min())}..{int(u.max())}): "
                              "they were not made by this vocoder's speech tokenizer")
        return u.astype(np.int64)

    @torch.no_grad()
    def mels(self, units_list: Sequence[np.ndarray], batch_size: int = 16) -> list[torch.Tensor]:
        """Log-mel [len(units) * upsample, n_mels] for each unit sequence, in padded batches."""
        seqs = [self._check_units(u) for u in units_list]
        was_training = self.training
        self.eval()
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        try:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                lens = torch.tensor([len(seqs[i]) for i in idx])
                if int(lens.max()) == 0:
                    for i in idx:
                        out[i] = torch.zeros(0, self.cfg.n_mels)
                    continue
                x = torch.zeros(len(idx), int(lens.max()), dtype=torch.long)
                for j, i in enumerate(idx):
                    x[j, :len(seqs[i])] = torch.from_numpy(seqs[i])
                mel = self(x, lens)
                for j, i in enumerate(idx):
                    out[i] = mel[j, :int(lens[j]) * self.upsample].clone()
        finally:
            self.train(was_training)
        return out  # type: ignore[return-value]

    def mel(self, units: np.ndarray) -> torch.Tensor:
        return self.mels([units])[0]

    def vocode(self, units: np.ndarray) -> np.ndarray:
        """Units -> 16 kHz mono float32 audio in [-1, 1], len(units) * 16000 / frame_rate samples."""
        return self.vocode_many([units])[0]

    def vocode_many(self, units_list: Sequence[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
        """Batched network, then Griffin-Lim per utterance (its cost dominates; deterministic per utterance)."""
        return [griffin_lim(m, self.cfg.gl_iters, self.cfg.gl_momentum) for m in self.mels(units_list, batch_size)]


# ----------------------------------------------------------------------------- Griffin-Lim


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
    """Un-normalised log-mel [T, n_mels] at 100 Hz (speech_tokenizer.log_mel's scale) -> T * 160 samples
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


# ----------------------------------------------------------------------------- training


def _data_signature(pairs: list[tuple[np.ndarray, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for units, mel in pairs:
        h.update(np.ascontiguousarray(units, dtype=np.int64).tobytes())
        h.update(str(tuple(mel.shape)).encode())
        h.update(mel[:: max(1, mel.shape[0] // 4)].numpy().round(3).tobytes())  # a few frames, cheaply
    return h.hexdigest()


def prepare_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray]], cfg: VocoderConfig) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(units, 16 kHz wav) -> (units, log-mel) with units * upsample == mel frames (the shorter
    side is trimmed)."""
    up = cfg.upsample
    out = []
    for units, wav in pairs:
        u = np.asarray(units).astype(np.int64).reshape(-1)
        if u.size and (u.min() < 0 or u.max() >= cfg.vocab_size):
            raise ZipperError(f"vocoder training: units outside 0..{cfg.vocab_size - 1} "
                              f"(got {int(u.min())}..{int(u.max())}); vocab_size must be the tokenizer's K")
        mel = log_mel(np.asarray(wav, dtype=np.float32), cfg.n_mels)
        n = min(len(u), mel.shape[0] // up)
        if n >= 1:
            out.append((u[:n], mel[:n * up].contiguous()))
    return out


def _batch(data: list[tuple[np.ndarray, torch.Tensor]], weights: torch.Tensor, cfg: VocoderConfig, step: int):
    """The segments of one step: a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    seg, up = cfg.segment_units, cfg.upsample
    idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=g).tolist()
    units = torch.zeros(cfg.batch_size, seg, dtype=torch.long)
    mels = torch.zeros(cfg.batch_size, seg * up, cfg.n_mels)
    lens = torch.zeros(cfg.batch_size, dtype=torch.long)
    for j, i in enumerate(idx):
        u, m = data[i]
        n = len(u)
        start = int(torch.randint(0, max(0, n - seg) + 1, (1,), generator=g))
        k = min(seg, n - start)
        units[j, :k] = torch.from_numpy(u[start:start + k])
        mels[j, :k * up] = m[start * up:(start + k) * up]
        lens[j] = k
    return units, mels, lens


def _l1(model: UnitVocoder, units, mels, lens) -> torch.Tensor:
    """Masked L1 between predicted and true log-mel. (An added L1 on frame-to-frame differences, weight 1,
    was tried for sharper transitions: pocketsphinx WER 0.309 vs 0.296 without, on 200 demo test
    utterances; not kept.)"""
    pred = model(units, lens)
    mask = (torch.arange(mels.shape[1])[None, :] < (lens * model.upsample)[:, None]).unsqueeze(-1).float()
    return ((pred - mels).abs() * mask).sum() / (mask.sum() * mels.shape[2])


def _json_or_none(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _same_signature(stored, signature: dict) -> bool:
    """A stored training signature {format, config, data} equals this one (the config compared through
    VocoderConfig.same_training, so files of earlier versions still match)."""
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        return False
    return ({k: v for k, v in stored.items() if k != "config"} == {k: v for k, v in signature.items() if k != "config"}
            and VocoderConfig.same_training(stored["config"], VocoderConfig.from_dict(signature["config"])))


def _lr_at(cfg: VocoderConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _save_pt(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_pt(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a vocoder file"
        raise ZipperError(f"{path}: unreadable vocoder file ({' '.join(str(e).split())[:200]}); "
                          "delete it to retrain") from None


def _optimizer(model: nn.Module, cfg: VocoderConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), foreach=False, fused=False)


def train_vocoder(pairs: Iterable[tuple[np.ndarray, np.ndarray]], cfg: VocoderConfig, out_dir: str | Path,
                  log: Callable[[str], None] = console_log, *, stop_after: int | None = None) -> UnitVocoder:
    """Train a UnitVocoder on (units, 16 kHz wav) pairs and save it in out_dir; returns it in eval mode.

    `pairs` is read once (a generator keeps only the log-mel frames in memory, not the audio).
    Reruns: a finished vocoder with the same config and data is loaded, not retrained; an interrupted
    run (Ctrl-C, SIGTERM, or `stop_after` steps in this call, which raises Interrupted) resumes from
    out_dir/train.pt. A checkpoint made with another config or other data is ignored (training restarts).
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_prep = time.time()
    data = prepare_pairs(pairs, cfg)
    if not data:
        raise ZipperError("vocoder training: no usable (units, audio) pairs (empty or shorter than one unit)")
    signature = {"format": FORMAT, "config": cfg.training_dict(), "data": _data_signature(data)}
    n_units = sum(len(u) for u, _ in data)
    log(f"vocoder: {len(data)} utterances, {n_units / cfg.frame_rate / 3600:.2f} h "
        f"({n_units} units at {cfg.frame_rate:g} Hz), log-mel in {time.time() - t_prep:.1f}s")

    final_cfg = out_dir / "config.json"
    if final_cfg.exists() and (out_dir / "vocoder.pt").exists():
        try:
            meta = json.loads(final_cfg.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        if _same_signature(meta.get("signature"), signature):
            log(f"vocoder: already trained in {out_dir} with this config and data; loading it")
            return _with_griffin_lim(load_vocoder(out_dir), cfg)
        final_cfg.unlink()  # a new training run: the old result is no longer the finished one

    torch.manual_seed(cfg.seed)
    model = UnitVocoder(cfg)
    opt = _optimizer(model, cfg)
    weights = torch.tensor([float(len(u)) for u, _ in data])
    step, losses, seconds = 0, [], 0.0
    ckpt = out_dir / "train.pt"
    if ckpt.exists():
        state = _load_pt(ckpt)
        if _same_signature(_json_or_none(state.get("signature")), signature):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step, losses = int(state["step"]), [float(x) for x in state["losses"].tolist()]
            seconds = float(state.get("seconds", 0.0))
            log(f"vocoder: resuming from {ckpt} at step {step}/{cfg.steps}")
        else:
            log(f"vocoder: {ckpt} was made with another config or other data; training from scratch")
    if step == 0:
        model.set_output_mean(torch.cat([m for _, m in data]).mean(0))  # start at the corpus's mean frame
    n_params = sum(p.numel() for p in model.parameters())
    log(f"vocoder: {n_params / 1e6:.2f}M parameters, context {model.receptive_field_seconds:.2f} s, "
        f"{cfg.steps} steps x {cfg.batch_size} segments of {cfg.segment_seconds:g} s")

    def save() -> None:
        _save_pt(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "losses": torch.tensor(losses, dtype=torch.float64),
                        "seconds": seconds + time.time() - t0,
                        "signature": json.dumps(signature, sort_keys=True)})

    stop = {"signum": None}
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            stop["signum"] = signum
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    t0, first_step, recent = time.time(), step, []
    model.train()
    try:
        with progress() as bar:
            task = bar.add_task("vocoder", total=cfg.steps, completed=step)
            while step < cfg.steps:
                units, mels, lens = _batch(data, weights, cfg, step)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(cfg, step)
                loss = _l1(model, units, mels, lens)
                if not torch.isfinite(loss):
                    raise ZipperError(f"vocoder training: non-finite loss at step {step + 1}; try a lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                loss_value = loss.item()
                losses.append(loss_value)
                recent.append(loss_value)
                bar.update(task, completed=step, description=f"vocoder L1 {np.mean(recent[-50:]):.3f}")
                if step % 100 == 0 or step == cfg.steps:
                    rate = (step - first_step) / max(time.time() - t0, 1e-9)
                    log(f"vocoder: step {step}/{cfg.steps} L1 {np.mean(recent[-100:]):.4f} "
                        f"lr {_lr_at(cfg, step - 1):.2e} {rate:.1f} steps/s")
                halt = stop["signum"] is not None or (stop_after is not None and step - first_step >= stop_after)
                if step % cfg.save_every == 0 or (halt and step < cfg.steps):
                    save()
                if halt and step < cfg.steps:
                    raise Interrupted(f"vocoder training stopped at step {step}; checkpoint saved in {ckpt}; "
                                      "rerun to resume")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    model.eval()
    train_l1 = float(np.mean(losses[-max(1, min(100, len(losses) // 10)):]))
    _save_pt(out_dir / "vocoder.pt", model.state_dict())
    write_json(final_cfg, {
        "format": FORMAT, "config": cfg.to_dict(), "signature": signature, "steps": step,
        "train_l1": round(train_l1, 5), "first_l1": round(losses[0], 5) if losses else None,
        "utterances": len(data), "hours": round(n_units / cfg.frame_rate / 3600, 4),
        "parameters": n_params, "receptive_field_seconds": round(model.receptive_field_seconds, 3),
        "train_seconds": round(seconds + time.time() - t0, 1),
        "toolkit_version": __version__, "torch_version": torch.__version__,
    })
    ckpt.unlink(missing_ok=True)
    model.train_l1, model.utterances = train_l1, len(data)
    log(f"vocoder: done, L1 {train_l1:.4f} (first step {losses[0]:.4f}), saved in {out_dir}")
    return model


def _with_griffin_lim(model: UnitVocoder, cfg: VocoderConfig) -> UnitVocoder:
    """Apply cfg's inference-only settings (Griffin-Lim) to a loaded vocoder."""
    model.cfg = dataclasses.replace(model.cfg, **{k: getattr(cfg, k) for k in INFERENCE_ONLY})
    return model


def load_vocoder(directory: str | Path) -> UnitVocoder:
    """A vocoder saved by train_vocoder (config.json + vocoder.pt), in eval mode."""
    directory = Path(directory)
    meta_path = directory / "config.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        cfg = VocoderConfig.from_dict(meta["config"])
    except FileNotFoundError:
        raise ZipperError(f"{meta_path}: no trained vocoder here") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ZipperError(f"{meta_path}: corrupt vocoder config ({type(e).__name__}: {e})") from None
    except ZipperError as e:
        raise ZipperError(f"{meta_path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ZipperError(f"{meta_path}: vocoder format {meta.get('format')} but this toolkit reads {FORMAT}; retrain it")
    cfg.validate()
    model = UnitVocoder(cfg)
    state = _load_pt(directory / "vocoder.pt")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        raise ZipperError(f"{directory / 'vocoder.pt'}: does not match {meta_path} "
                          f"({' '.join(str(e).split())[:200]}); retrain the vocoder") from None
    model.train_l1 = meta.get("train_l1")
    model.utterances = meta.get("utterances")
    return model.eval()


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


def _training_pairs(run_dir: Path, checksum: str, cfg: VocoderConfig, log) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(units, wav) for a seeded sample of the run's speech + aligned utterances, read lazily."""
    from .audio import AudioLimits, AudioReject, read_audio
    from .shards import load_role

    manifests = {"speech": "train-speech.jsonl", "aligned": "aligned.jsonl"}
    items = []
    for role, name in manifests.items():
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
            yield np.asarray(u), wav
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
                return _with_griffin_lim(load_vocoder(voc_dir), cfg)
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
