"""The toolkit's own ASR judge: a small character CTC model trained on the run's ground-truth audio.

TTS is scored by transcribing synthesized audio with an ASR "judge". pocketsphinx (zipper_cli.judges)
is independent of the run but weak on this kind of audio; this judge is trained on the run's own
training split (the `aligned` role, never dev or test), so it knows the domain's words and voices.
It has the PocketsphinxJudge interface: `name`, `version`, `transcribe(wav16k)`, `transcribe_many(wavs)`.

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

Training (`train_ctc_judge`): AdamW, linear warmup + cosine decay, length-bucketed batches under a
frame budget (the first epoch shortest-first), optional SpecAugment time and frequency masks, features
computed once and kept in memory, periodic dev CER/WER, checkpoints every `ckpt_every` steps under
out_dir/ckpt (atomic, checksummed), exact resume (data order, masks and dropout are functions of
(seed, step)), `judge.json` written last.

Measured with the defaults on the demo corpus (train on aligned: 2000 utterances, 1.3 h; 1600 steps,
7 epochs; scripts/measure_ctc_judge.py): test WER 0.091 / CER 0.026 on ground-truth audio, WER 0.097
on the same audio resynthesised by Griffin-Lim from its mel (pocketsphinx: 0.169 / 0.184); training
took 330 CPU-seconds, features and dev evaluations included (about 5 minutes on one free core; 10.5
minutes on one thread of a 2-core machine shared with other jobs, where 2 threads were 5x slower than
one); transcription 130-300x faster than real time on one thread.

Files under a judge directory (run_dir/judges/ctc for `ensure_ctc_judge`):
  train_config.json  config + training-data checksum of the run being trained (checked on resume)
  ckpt/step-*.pt     training checkpoints (model, optimizer, position), loaded with weights_only=True;
                     removed once judge.json is written
  metrics.jsonl      one row per step (loss, lr, grad norm), dev CER/WER at evaluation steps
  model.pt           final weights (state_dict of tensors)
  judge.json         config, version, dev WER/CER, training time, versions: the completion marker
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_path, read_jsonl, sha256_file, write_json
from .batching import make_batches
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .console import log as console_log, progress
from .errors import Interrupted, ZipperError
from .text_norm import normalize_text

SAMPLE_RATE = 16_000
FORMAT = 1  # bump when features, vocabulary or architecture code change meaning: part of the version
BLANK = 0
VOCAB = ("<blank>", " ", *"abcdefghijklmnopqrstuvwxyz", "'")
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB) if i != BLANK}
JUDGE_SUBDIR = Path("judges") / "ctc"


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
    from .speech_tokenizer import log_mel

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
        return self.out(self.drop(self.final_norm(h))), out_len


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


def load_ctc_judge(directory: str | Path) -> CTCJudge:
    """The judge saved in `directory` by train_ctc_judge (judge.json + model.pt), checksum-verified."""
    directory = Path(directory)
    meta_path = directory / "judge.json"
    if not meta_path.exists():
        raise ZipperError(f"{directory}: no trained CTC judge here (judge.json is missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZipperError(f"{meta_path}: unreadable ({e}); delete {directory} to retrain the judge") from None
    if meta.get("format") != FORMAT:
        raise ZipperError(f"{meta_path}: judge format {meta.get('format')!r}, this zipper reads format {FORMAT}; "
                          f"delete {directory} to retrain the judge")
    cfg = CTCJudgeConfig.from_dict(meta.get("config", {}), where=str(meta_path))
    weights = directory / "model.pt"
    if not weights.exists():
        raise ZipperError(f"{weights}: missing; delete {directory} to retrain the judge")
    state = load_checkpoint(weights)
    model = CTCModel(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ZipperError(f"{weights}: does not fit the config in judge.json ({' '.join(str(e).split())[:200]})") from None
    judge = CTCJudge(model, meta)
    if judge.version != meta.get("version"):
        raise ZipperError(f"{weights}: weights checksum {judge.version} differs from {meta.get('version')} "
                          f"recorded in judge.json; delete {directory} to retrain the judge")
    return judge


# ---------------------------------------------------------------------------------------------- training


def _spec_augment(x: torch.Tensor, cfg: CTCJudgeConfig, gen: torch.Generator) -> torch.Tensor:
    """Time and frequency masks on one normalised utterance [T, F] (masked values -> 0, the mean)."""
    x = x.clone()
    T, Fdim = x.shape

    def rand(n: int) -> int:  # uniform in [0, n]
        return int(torch.randint(0, n + 1, (1,), generator=gen)) if n > 0 else 0

    for _ in range(cfg.freq_masks):
        w = rand(cfg.freq_mask_width)
        f0 = rand(Fdim - w)
        x[:, f0:f0 + w] = 0
    max_t = min(cfg.time_mask_width, T // 5)
    for _ in range(cfg.time_masks):
        w = rand(max_t)
        t0 = rand(T - w)
        x[t0:t0 + w] = 0
    return x


def _epoch_batches(lengths: list[int], cfg: CTCJudgeConfig, epoch: int) -> list[list[int]]:
    """Length-bucketed batches under the frame budget, a function of (seed, epoch) for exact resume."""
    if epoch == 0 and cfg.sortagrad:
        return make_batches(lengths, cfg.max_frames, cfg.seed, epoch, shuffle=False, bucket_chunk=len(lengths))
    return make_batches(lengths, cfg.max_frames, cfg.seed, epoch)


def _step_seed(seed: int, step: int, salt: int) -> int:
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


def _data_checksum(pairs: Sequence[tuple[np.ndarray, str]]) -> str:
    h = hashlib.sha256()
    for wav, text in pairs:
        h.update(np.ascontiguousarray(wav, dtype=np.float32).tobytes())
        h.update(b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def _score(refs: list[str], hyps: list[str]) -> dict:
    from .metrics import score

    s = score(refs, hyps)
    return {"wer": round(s.wer, 5), "cer": round(s.cer, 5), "utterances": s.utterances}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop rows written after the checkpoint we continue from."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash
    with atomic_path(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in keep))


class _Stop:
    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        self.signum = signum


def _prepare(pairs, cfg: CTCJudgeConfig, what: str, log) -> tuple[list[torch.Tensor], list[list[int]], list[str], int]:
    """Features and label ids of usable pairs; drops empty texts, silent or too-short audio."""
    feats, labels, texts, dropped = [], [], [], 0
    with progress() as bar:
        task = bar.add_task(f"{what} features", total=len(pairs))
        for wav, text in pairs:
            ids = text_to_ids(text)
            f = features(wav, cfg.n_mels)
            # CTC needs at least one frame per label (plus a blank between doubled letters)
            need = len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)
            if not ids or f.shape[0] == 0 or (f.shape[0] + cfg.subsample - 1) // cfg.subsample < need:
                dropped += 1
            else:
                feats.append(f)
                labels.append(ids)
                texts.append(ids_to_text(ids))
            bar.advance(task)
    if dropped:
        log(f"[ctc-judge] {what}: skipped {dropped} of {len(pairs)} utterances (empty transcript, no audio, "
            f"or more characters than {100 // cfg.subsample} Hz CTC frames can hold)")
    return feats, labels, texts, dropped


def train_ctc_judge(pairs: Sequence[tuple[np.ndarray, str]], dev_pairs: Sequence[tuple[np.ndarray, str]],
                    cfg: CTCJudgeConfig, out_dir: str | Path, log: Callable[[str], None] = console_log) -> CTCJudge:
    """Train a CTC judge on (16 kHz wav, transcript) pairs, checkpointing under out_dir; returns it.

    Rerunning with the same pairs and config resumes from the last checkpoint (a finished judge is just
    loaded); other data or another config over unfinished checkpoints is refused. SIGINT/SIGTERM save a
    checkpoint after the current step and raise Interrupted.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    if (out_dir / "judge.json").exists():
        judge = load_ctc_judge(out_dir)
        if judge.cfg != cfg:
            from .rundir import diff_keys

            diffs = diff_keys(judge.cfg.to_dict(), cfg.to_dict())
            raise ZipperError(f"{out_dir} already holds a CTC judge trained with another config "
                              f"({'; '.join(diffs)}); delete {out_dir} to retrain it")
        log(f"[ctc-judge] already trained in {out_dir} ({judge.version}); loading it")
        return judge
    t_start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "ckpt"
    metrics_path = out_dir / "metrics.jsonl"
    data_sum = _data_checksum(pairs)
    run_cfg = {"format": FORMAT, "config": cfg.to_dict(), "train_data": data_sum, "train_utterances": len(pairs)}
    saved_path = out_dir / "train_config.json"
    if saved_path.exists() and any(ckpt_dir.glob("step-*.pt")):
        from .rundir import diff_keys

        diffs = diff_keys(json.loads(saved_path.read_text()), run_cfg)
        if diffs:
            raise ZipperError(f"{out_dir} holds checkpoints of an unfinished CTC judge trained with other settings "
                              f"({'; '.join(diffs)}); delete {out_dir} to start over")
    write_json(saved_path, run_cfg)

    t_feat = time.time()
    train_feats, train_labels, _, _ = _prepare(pairs, cfg, "train", log)
    dev_feats, _, dev_texts, _ = _prepare(dev_pairs, cfg, "dev", log) if dev_pairs else ([], [], [], 0)
    if not train_feats:
        raise ZipperError("CTC judge: no usable training utterances (every transcript was empty or every "
                          "audio too short)")
    feat_seconds = time.time() - t_feat
    lengths = [f.shape[0] for f in train_feats]
    hours = sum(lengths) / 100 / 3600
    log(f"[ctc-judge] {len(train_feats)} training utterances ({hours:.2f} h), {len(dev_feats)} dev; "
        f"features in {feat_seconds:.1f} s")

    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
        torch.manual_seed(cfg.seed)
        model = CTCModel(cfg)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, foreach=False, fused=False)
    step, epoch, batch_pos, trained_seconds = 0, 0, 0, 0.0
    resumed = latest_checkpoint(ckpt_dir, log=log)
    if resumed is not None:
        step, state = resumed
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        epoch, batch_pos = int(state["epoch"]), int(state["batch_pos"])
        trained_seconds = float(state.get("train_seconds", 0.0))
        log(f"[ctc-judge] resuming from {ckpt_dir} at step {step}/{cfg.steps}")
    _truncate_metrics(metrics_path, step)  # rows past the checkpoint (or of a run that never saved one)
    log(f"[ctc-judge] model: {cfg.layers} conv blocks x {cfg.dim}, {param_count(model) / 1e6:.2f}M parameters, "
        f"{cfg.steps} steps, lr {cfg.lr:g}, threads {torch.get_num_threads()}")

    def evaluate() -> dict | None:
        if not dev_feats:
            return None
        model.eval()
        with torch.inference_mode():
            order = sorted(range(len(dev_feats)), key=lambda i: dev_feats[i].shape[0])
            out = [""] * len(dev_feats)
            for b in range(0, len(order), 32):
                idx = order[b:b + 32]
                x, lens = _pad([dev_feats[i] for i in idx], cfg.n_mels)
                logits, out_len = model(x, lens)
                for j, i in enumerate(idx):
                    out[i] = greedy_decode(logits[j, : int(out_len[j])])
        model.train()
        return _score(dev_texts, out)

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
                 "batch_pos": batch_pos, "train_seconds": trained_seconds + (time.time() - t_loop)}
        save_checkpoint(ckpt_dir, step, state, dev_loss=None, keep_last=2)

    stop = _Stop()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    batches = _epoch_batches(lengths, cfg, epoch)
    last_dev = None
    t_loop = time.time()
    start_step = step
    frames_seen = 0
    model.train()
    try:
        with progress() as bar:
            task = bar.add_task("ctc judge", total=cfg.steps, completed=step)
            while step < cfg.steps:
                if batch_pos >= len(batches):
                    epoch, batch_pos = epoch + 1, 0
                    batches = _epoch_batches(lengths, cfg, epoch)
                batch = batches[batch_pos]
                batch_pos += 1
                gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, 1))
                feats = [_spec_augment(train_feats[i], cfg, gen) for i in batch]
                x, lens = _pad(feats, cfg.n_mels)
                targets = torch.tensor([c for i in batch for c in train_labels[i]], dtype=torch.long)
                target_lens = torch.tensor([len(train_labels[i]) for i in batch], dtype=torch.long)
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, step)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_step_seed(cfg.seed, step, 2))  # dropout: a function of the step
                    logits, out_len = model(x, lens)
                    logp = logits.log_softmax(-1).transpose(0, 1)  # [T', B, V]
                    loss = F.ctc_loss(logp, targets, out_len, target_lens, blank=BLANK, reduction="mean",
                                      zero_infinity=True)
                    if not torch.isfinite(loss):
                        raise ZipperError(f"CTC judge: non-finite training loss at step {step + 1}; "
                                          f"try a lower lr (now {cfg.lr:g})")
                    loss.backward()
                loss_val = loss.item()
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                frames_seen += int(lens.sum())
                elapsed = time.time() - t_loop
                row = {"step": step, "loss": round(loss_val, 5), "lr": lr_at(cfg, step - 1),
                       "grad_norm": round(float(gnorm), 4), "epoch": epoch,
                       "elapsed": round(trained_seconds + elapsed, 2)}
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    last_dev = evaluate()
                    if last_dev is not None:
                        row.update({"dev_wer": last_dev["wer"], "dev_cer": last_dev["cer"]})
                    rate = frames_seen / 100 / max(elapsed, 1e-9)
                    eta = (cfg.steps - step) * elapsed / max(1, step - start_step)
                    dev_txt = f" dev CER {last_dev['cer']:.3f} WER {last_dev['wer']:.3f}" if last_dev else ""
                    log(f"[ctc-judge] step {step}/{cfg.steps} epoch {epoch} loss {loss_val:.3f}{dev_txt} "
                        f"lr {row['lr']:.2e} {rate:.0f}x real time, eta {eta:.0f}s")
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                bar.update(task, completed=step, description=f"ctc judge loss {loss_val:.3f}")
                if step % cfg.ckpt_every == 0 or step == cfg.steps or stop.signum is not None:
                    save()
                if stop.signum is not None and step < cfg.steps:
                    raise Interrupted(f"CTC judge training stopped by signal at step {step}; checkpoint saved in "
                                      f"{ckpt_dir}; rerun to resume")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

    train_seconds = trained_seconds + (time.time() - t_loop)
    if last_dev is None:  # resumed from the final checkpoint: the loop had nothing left to do
        last_dev = evaluate()
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save(state, tmp)
    judge = CTCJudge(model)
    from .rundir import versions

    meta = {"name": "ctc", "format": FORMAT, "version": judge.version, "checksum": judge.checksum,
            "config": cfg.to_dict(), "vocab": list(VOCAB), "params": param_count(model),
            "dev": last_dev, "train_utterances": len(train_feats), "train_hours": round(hours, 4),
            "dev_utterances": len(dev_feats), "train_data": data_sum, "steps": cfg.steps, "epochs": epoch + 1,
            "train_seconds": round(train_seconds, 2), "feature_seconds": round(feat_seconds, 2),
            "wall_seconds": round(time.time() - t_start, 2), "threads": torch.get_num_threads(),
            "model_sha256": sha256_file(out_dir / "model.pt"), "versions": versions()}
    write_json(out_dir / "judge.json", meta)  # the completion marker: written last
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # optimizer state is only needed to resume; model.pt stays
    judge.meta = meta
    dev_txt = f"dev WER {last_dev['wer']:.3f} CER {last_dev['cer']:.3f}, " if last_dev else ""
    log(f"[ctc-judge] trained {judge.version}: {dev_txt}{train_seconds:.0f} s of training")
    return judge


# ---------------------------------------------------------------------------------------------- run directories


def _read_pairs(manifest: Path, log) -> list[tuple[np.ndarray, str]]:
    from .audio import AudioReject, read_audio

    pairs, bad = [], 0
    for r in read_jsonl(manifest):
        text = r.get("norm") or normalize_text(r.get("text") or "")
        if not text:
            continue
        try:
            wav = read_audio(r["audio"], start=r.get("start"), end=r.get("end"))
        except AudioReject as e:
            bad += 1
            if bad <= 3:
                log(f"[ctc-judge] skipping {r.get('id')}: {e.detail}")
            continue
        pairs.append((wav, text))
    if bad:
        log(f"[ctc-judge] {manifest}: {bad} utterances with unreadable audio skipped")
    return pairs


def ensure_ctc_judge(run_dir: str | Path, log: Callable[[str], None] = console_log,
                     cfg: CTCJudgeConfig | None = None) -> CTCJudge:
    """The run's CTC judge: loaded from run_dir/judges/ctc when trained, else trained now on the
    `aligned` role (data/aligned.jsonl) with data/dev.jsonl as dev (never test), and stored there.

    `cfg` None means the stored judge whatever its config (the defaults when training); a given cfg
    that differs from a stored judge's is refused (delete the directory to retrain).
    """
    from .rundir import stage_lock

    run_dir = Path(run_dir)
    out_dir = run_dir / JUDGE_SUBDIR

    def stored() -> CTCJudge | None:
        if not (out_dir / "judge.json").exists():
            return None
        judge = load_ctc_judge(out_dir)
        if cfg is not None and judge.cfg != cfg:
            from .rundir import diff_keys

            diffs = diff_keys(judge.cfg.to_dict(), cfg.to_dict())
            raise ZipperError(f"{out_dir} holds a CTC judge trained with another config ({'; '.join(diffs)}); "
                              f"delete {out_dir} to retrain it")
        return judge

    judge = stored()
    if judge is not None:
        return judge
    aligned = run_dir / "data" / "aligned.jsonl"
    if not aligned.exists():
        raise ZipperError(f"the CTC judge trains on {aligned}, which is missing; run `zipper tokenize` first")
    with stage_lock(run_dir, "judge-ctc"):
        judge = stored()  # another process may have finished it while we waited for nothing
        if judge is not None:
            return judge
        log(f"[ctc-judge] training the CTC judge on {aligned} (ground-truth audio of the training split)")
        pairs = _read_pairs(aligned, log)
        if not pairs:
            raise ZipperError(f"{aligned}: no utterances with a transcript and readable audio to train the CTC judge")
        dev = run_dir / "data" / "dev.jsonl"
        dev_pairs = _read_pairs(dev, log) if dev.exists() else []
        return train_ctc_judge(pairs, dev_pairs, cfg or CTCJudgeConfig(), out_dir, log)
