"""The CTC judge's vocabulary, configuration (CTCJudgeConfig), features, network (CTCModel) and the
judge itself (CTCJudge: transcribes 16 kHz audio with a trained CTCModel).

Model (2.0M parameters by default; tests use ~30k):
  80 log-mel at 100 Hz (25 ms / 10 ms), per-utterance mean/variance normalisation per mel bin
  -> conv(k=3) + GELU -> conv(k=2s-1, stride s) + GELU -> LayerNorm   (s = `subsample`, 3: 33 Hz)
  -> `layers` residual blocks: LayerNorm, depthwise conv in time (`conv_kernel` frames), GELU;
     LayerNorm, feed-forward (dim -> ff_mult * dim -> dim)
  -> Linear to 29 classes: CTC blank, space, a-z, apostrophe.
Greedy CTC decoding: best class per frame, repeats collapsed, blanks dropped.

Padding never changes a transcript: padded frames are zeroed before every convolution (so a frame
near the end sees the zeros an unpadded utterance would see), and every operation is row-wise (GEMMs,
LayerNorm, depthwise convolutions), so `transcribe_many` gives every utterance bitwise the
log-probabilities `transcribe` gives it alone, whatever else is in the batch. (A bidirectional GRU was
tried: 2x slower per step on CPU, slower to learn, and packed GRUs change low bits with the batch.)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ZipperError
from .text_norm import normalize_text

SAMPLE_RATE = 16_000
FORMAT = 1  # bump when features, vocabulary or architecture code change meaning: part of the version
BLANK = 0
VOCAB = ("<blank>", " ", *"abcdefghijklmnopqrstuvwxyz", "'")
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB) if i != BLANK}


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CTCJudgeConfig:
    """Features, model size and training of the CTC judge.

    Defaults were chosen with scripts/measure_ctc_judge.py on the demo corpus (2000 aligned utterances,
    1.3 h, 8 Festival voices; ~7 epochs): test WER 0.09 / CER 0.026 on ground-truth audio.
    """

    n_mels: int = 80
    """Log-mel bins per 100 Hz frame (25 ms window, 10 ms hop), normalised per utterance and bin."""
    subsample: int = 3
    """Time stride of the front end: CTC frames at 100/subsample Hz. Characters need a frame each (and a
    blank between doubled letters); Festival speech reaches 22 characters/s. 4 (25 Hz) is 25% cheaper
    but reached twice the WER of 3 (33 Hz) in the same number of steps."""
    dim: int = 256
    """Model width (front end and blocks)."""
    layers: int = 6
    """Residual conv blocks."""
    conv_kernel: int = 15
    """Depthwise kernel of a block in CTC frames (odd); receptive field = layers * (kernel - 1) + 1 frames."""
    ff_mult: int = 2
    """Feed-forward expansion of a block (dim -> ff_mult * dim -> dim)."""
    dropout: float = 0.0
    """Dropout on the blocks' residual branches and before the output layer (training only). Off: with
    a few epochs there is little to regularise, and drawing the masks cost 10% of a step."""
    steps: int = 1600
    """Optimizer steps in total (1600 x 20 s batches = 7 epochs of the 1.3 h demo corpus)."""
    lr: float = 6e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 40
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.05
    """The cosine decays to lr * min_lr_ratio at the last step."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on biases or norms)."""
    grad_clip: float = 5.0
    """Global gradient-norm clip (0 disables)."""
    max_frames: int = 2000
    """Batch budget in padded 100 Hz input frames (2000 = 20 s of audio); batches are length-bucketed.
    Smaller batches, more steps per epoch: 20 s batches beat 40 s ones at equal compute."""
    time_masks: int = 0
    """SpecAugment: time masks per utterance (masked frames are set to the utterance mean, 0). Off by
    default: at this budget (7 epochs) masking slowed learning (test WER 0.118 with 2+2 masks vs 0.091
    without) and did not make the judge more robust to Griffin-Lim audio (0.131 vs 0.097). Worth
    turning on for longer training or more varied voices."""
    time_mask_width: int = 20
    """SpecAugment: maximum width of a time mask in 100 Hz frames (also at most 1/5 of the utterance)."""
    freq_masks: int = 0
    """SpecAugment: frequency masks per utterance (off by default, see time_masks)."""
    freq_mask_width: int = 12
    """SpecAugment: maximum width of a frequency mask in mel bins."""
    sortagrad: bool = True
    """First epoch in order of increasing length (SortaGrad, Deep Speech 2): short utterances first
    get CTC past its all-blank phase sooner (measured: a little better early, the same at the end);
    later epochs are shuffled length buckets."""
    eval_every: int = 200
    """Steps between dev CER/WER evaluations (and log lines); the last step is always evaluated."""
    ckpt_every: int = 200
    """Steps between checkpoints (also saved at the last step and when interrupted)."""
    seed: int = 0
    """Model initialisation, data order, SpecAugment masks and dropout."""

    def validate(self) -> None:
        """Raise ZipperError naming the first field that is out of range."""
        checks = [
            (self.n_mels >= 8, "n_mels", "must be >= 8"),
            (1 <= self.subsample <= 8, "subsample", "must be between 1 and 8"),
            (self.dim >= 8, "dim", "must be >= 8"),
            (self.ff_mult >= 1, "ff_mult", "must be >= 1"),
            (self.layers >= 1, "layers", "must be >= 1"),
            (self.conv_kernel >= 1 and self.conv_kernel % 2 == 1, "conv_kernel", "must be a positive odd number"),
            (0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)"),
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)"),
            (self.max_frames >= 100, "max_frames", "must be >= 100 (one second of audio)"),
            (self.time_masks >= 0, "time_masks", "must be >= 0"),
            (self.time_mask_width >= 0, "time_mask_width", "must be >= 0"),
            (self.freq_masks >= 0, "freq_masks", "must be >= 0"),
            (0 <= self.freq_mask_width < self.n_mels, "freq_mask_width", "must be >= 0 and below n_mels"),
            (isinstance(self.sortagrad, bool), "sortagrad", "must be true or false"),
            (self.eval_every >= 1, "eval_every", "must be >= 1"),
            (self.ckpt_every >= 1, "ckpt_every", "must be >= 1"),
            (self.seed >= 0, "seed", "must be >= 0"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ZipperError(f"CTC judge config: {name} = {getattr(self, name)!r} {rule}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "CTCJudgeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ZipperError(f"{where}: unknown CTC judge config keys {', '.join(unknown)} "
                              "(written by a newer zipper?)")
        cfg = cls(**d)
        cfg.validate()
        return cfg


def lr_at(cfg: CTCJudgeConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ---------------------------------------------------------------------------------------------- text


def text_to_ids(text: str) -> list[int]:
    """normalize_text, then one id per character; characters outside the vocabulary (digits cannot
    survive normalisation; accented or non-Latin letters can) are dropped."""
    norm = normalize_text(text)
    return [CHAR_TO_ID[c] for c in norm if c in CHAR_TO_ID]


def ctc_collapse(ids: Sequence[int]) -> list[int]:
    """Greedy CTC path -> labels: merge runs of the same id, then drop blanks ("aa_a" -> "aa")."""
    out, prev = [], None
    for i in ids:
        i = int(i)
        if i != prev and i != BLANK:
            out.append(i)
        prev = i
    return out


def ids_to_text(ids: Sequence[int]) -> str:
    """Labels (no blanks) -> text with single spaces and no leading/trailing space."""
    return " ".join("".join(VOCAB[i] for i in ids if 0 < i < len(VOCAB)).split())


def greedy_decode(logits: torch.Tensor | np.ndarray) -> str:
    """[T, V] scores of one utterance -> text (best class per frame, repeats collapsed, blanks dropped)."""
    x = torch.as_tensor(logits)
    if x.dim() != 2 or x.shape[-1] != len(VOCAB):
        raise ValueError(f"greedy_decode expects [T, {len(VOCAB)}] scores, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return ""
    return ids_to_text(ctc_collapse(x.argmax(-1).tolist()))


# ---------------------------------------------------------------------------------------------- features


def features(wav: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """[T, n_mels] float32: log-mel at 100 Hz, mean/variance normalised per utterance and mel bin."""
    from .speech_features import log_mel

    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"CTC judge expects 1-D mono 16 kHz audio, got shape {wav.shape}")
    wav = np.nan_to_num(np.clip(wav, -1.0, 1.0), nan=0.0)
    lm = log_mel(wav, n_mels)
    if lm.shape[0] == 0:
        return lm
    return ((lm - lm.mean(0)) / lm.std(0, unbiased=False).clamp_min(1e-3)).contiguous()


def _out_lengths(lengths: torch.Tensor, subsample: int) -> torch.Tensor:
    return (lengths + subsample - 1) // subsample  # ceil: the strided conv below has k = 2s-1, pad = s-1


# ---------------------------------------------------------------------------------------------- model


class _FrameConv(nn.Module):
    """A dense 1-D convolution in time on [B, T, C] written as frame stacking + one matmul.

    The function of nn.Conv1d(C, D, kernel, stride) with zero padding, but every output
    frame is a row of one GEMM, and GEMM rows do not depend on how many other rows there are: a padded
    batch gives bitwise the result of each utterance alone (mkldnn's Conv1d picks kernels by batch shape,
    which changed low bits between batch compositions). Padding: `stride - 1` zeros on the left when
    strided (output length ceil(T / stride) for kernel = 2 * stride - 1), kernel // 2 otherwise.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.pad = (kernel - 1) // 2 if stride == 1 else stride - 1
        self.proj = nn.Linear(c_in * kernel, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T', D]
        B, T, C = x.shape
        need = (T + 2 * self.pad - self.kernel) // self.stride + 1
        right = max(0, (need - 1) * self.stride + self.kernel - T - self.pad)
        xp = F.pad(x, (0, 0, self.pad, right))
        frames = xp.unfold(1, self.kernel, self.stride)  # [B, T', C, kernel]
        return self.proj(frames.reshape(B, frames.shape[1], C * self.kernel))


class _ConvBlock(nn.Module):
    """Pre-norm residual block: depthwise conv in time, then a pointwise feed-forward layer."""

    def __init__(self, dim: int, kernel: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dw = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ff_mult * dim)
        self.ff2 = nn.Linear(ff_mult * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [B, T, D], mask [B, T, 1]
        h = (self.norm1(x) * mask).transpose(1, 2)
        x = x + self.drop(F.gelu(self.dw(h)).transpose(1, 2))
        x = x + self.drop(self.ff2(F.gelu(self.ff1(self.norm2(x)))))
        return x * mask


class CTCModel(nn.Module):
    """log-mel [B, T, n_mels] + lengths -> CTC logits [B, ceil(T/subsample), len(VOCAB)] + lengths."""

    def __init__(self, cfg: CTCJudgeConfig):
        super().__init__()
        self.cfg = cfg
        s = cfg.subsample
        self.conv1 = _FrameConv(cfg.n_mels, cfg.dim, kernel=3, stride=1)
        self.conv2 = _FrameConv(cfg.dim, cfg.dim, kernel=2 * s - 1, stride=s)
        self.front_norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_ConvBlock(cfg.dim, cfg.conv_kernel, cfg.ff_mult, cfg.dropout)
                                    for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, len(VOCAB))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, out_len = self.hidden(x, lengths)
        return self.out(self.drop(h)), out_len

    def hidden(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden states [B, ceil(T/subsample), dim] (after the final norm; what the output layer
        reads; the ctc-kmeans speech tokenizer clusters them) + their lengths."""
        B, T, _ = x.shape
        mask_in = (torch.arange(T)[None, :] < lengths[:, None]).unsqueeze(-1).to(x.dtype)  # [B, T, 1]
        h = F.gelu(self.conv1(x * mask_in)) * mask_in  # padded frames back to zero before the next convolution
        h = F.gelu(self.conv2(h))  # [B, T', D]
        out_len = _out_lengths(lengths, self.cfg.subsample)
        T2 = h.shape[1]
        mask = (torch.arange(T2)[None, :] < out_len[:, None]).unsqueeze(-1).to(x.dtype)  # [B, T', 1]
        h = self.front_norm(h) * mask
        for block in self.blocks:
            h = block(h, mask)
        return self.final_norm(h), out_len


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pad(feats: Sequence[torch.Tensor], n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    x = torch.zeros(len(feats), int(lengths.max()) if len(feats) else 0, n_mels)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x, lengths


def _weights_checksum(state: dict, cfg: CTCJudgeConfig) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, "config": cfg.to_dict(), "vocab": VOCAB}, sort_keys=True).encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- the judge


class CTCJudge:
    """Transcribes 16 kHz mono float32 audio with a trained character CTC model (greedy decoding).

    Deterministic and order-independent: eval mode (no dropout), and padding is masked exactly, so a
    transcript depends only on that utterance's samples.
    """

    name = "ctc"

    def __init__(self, model: CTCModel, meta: dict | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        self.meta = dict(meta or {})
        self.checksum = _weights_checksum(model.state_dict(), self.cfg)
        self.version = f"ctc-{self.checksum[:16]}"

    def logits(self, wavs: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Per utterance [T', V] CTC log-probabilities (batched internally)."""
        feats = [features(w, self.cfg.n_mels) for w in wavs]
        out: list[torch.Tensor | None] = [None] * len(feats)
        order = sorted(range(len(feats)), key=lambda i: feats[i].shape[0])  # similar lengths share a batch
        batch: list[int] = []

        def flush():
            nonempty = [i for i in batch if feats[i].shape[0] > 0]
            for i in batch:
                if feats[i].shape[0] == 0:
                    out[i] = torch.zeros(0, len(VOCAB))
            if nonempty:
                x, lengths = _pad([feats[i] for i in nonempty], self.cfg.n_mels)
                with torch.inference_mode():
                    logits, out_len = self.model(x, lengths)
                    logp = logits.log_softmax(-1)
                for j, i in enumerate(nonempty):
                    out[i] = logp[j, : int(out_len[j])].clone()
            batch.clear()

        for i in order:
            if batch and feats[i].shape[0] * (len(batch) + 1) > self.cfg.max_frames:
                flush()
            batch.append(i)
        if batch:
            flush()
        return out  # type: ignore[return-value]

    def transcribe(self, wav16k: np.ndarray) -> str:
        """Lowercase words separated by single spaces ("" when nothing is recognised)."""
        return self.transcribe_many([wav16k])[0]

    def transcribe_many(self, wavs: Sequence[np.ndarray]) -> list[str]:
        """Transcripts in input order; each equals transcribe() of that utterance alone."""
        return [greedy_decode(lp) for lp in self.logits(wavs)]

    def info(self) -> dict:
        """For reports: what judged the audio."""
        return {"name": self.name, "version": self.version, "params": param_count(self.model),
                "dev": self.meta.get("dev"), "config": self.cfg.to_dict()}

