"""Speech tokenizer: 16 kHz audio -> discrete units, saved as a versioned artifact.

Kinds (--speech-tokenizer):
  mel-kmeans  80-bin log-mel at 100 Hz, normalised per utterance, consecutive frames stacked to reach
              --frame-rate (100, 50 or 25 Hz), then k-means (--units K). Needs no downloaded weights.
  ssl-kmeans  one transformer layer (--ssl-layer) of a torchaudio SSL model (--ssl-arch: hubert_base,
              wav2vec2_base, wavlm_base, ...) loaded from --ssl-checkpoint, at 50 Hz, then k-means.
  ctc-kmeans  the last hidden layer of a small CTC character recogniser (ctc_judge_model.CTCModel, strided
              to --frame-rate: 100, 50 or 25 Hz) that `zipper tokenize` first trains on the aligned role's
              audio and transcripts (--ctc-encoder-steps), then k-means. Supervised units, as CosyVoice's
              speech tokens: they follow the words more and the voice less than mel-kmeans units, but
              they are learned from the aligned transcripts (see README). Stored in encoder/ beside
              the centroids.
  encodec     EnCodec 24 kHz (--codec-checkpoint): the units are the codes of the first codebook
              (K=1024) at 75 Hz; codebook 0 does not depend on the bandwidth. No fitting.

On disk (one directory): centroids.npy (k-means kinds) and tokenizer.json (config, checksum, versions),
written atomically, tokenizer.json last. The checksum covers every setting that changes the units,
the centroid bytes and the model checkpoint's sha256; units record it and check_units_match compares.
The features each kind clusters, and the loading of SSL and EnCodec checkpoints, are in speech_features.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torchaudio

from zipper_cli import __version__
from zipper_cli.atomic import atomic_path, sha256_file, sha256_json, write_json
from zipper_cli.errors import ZipperError
from zipper_cli.kmeans import Reservoir, assign, kmeans
from zipper_cli.speech_features import HOP, LOG_EPS, N_FFT, SAMPLE_RATE, as_tensor, checkpoint_flag, features, load_model

KINDS = ("mel-kmeans", "ssl-kmeans", "ctc-kmeans", "encodec")
FORMAT = 1  # bump when the feature pipeline changes: it is part of the checksum
MEL_FRAME_RATES = (100, 50, 25)
SSL_FRAME_RATE = 50.0  # torchaudio's wav2vec2/HuBERT/WavLM conv front end has stride 320 at 16 kHz
CODEC_SAMPLE_RATE, CODEC_FRAME_RATE, CODEC_BINS = 24_000, 75.0, 1024
CODEC_BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    kind: str = "mel-kmeans"
    """--speech-tokenizer: mel-kmeans (offline default), ssl-kmeans or encodec."""
    k: int = 512
    """--units: number of k-means units (the speech vocabulary size). Ignored by encodec (always 1024)."""
    frame_rate: int = 25
    """--frame-rate (Hz) for mel-kmeans (100 Hz mel frames stacked by 100/frame_rate) and ctc-kmeans (the
    encoder's stride); 100, 50 or 25. ssl-kmeans units are at 50 Hz and encodec units at 75 Hz whatever
    this says."""
    n_mels: int = 80
    """Mel bins per 100 Hz frame (mel-kmeans)."""
    dedup: bool = False
    """--dedup: collapse runs of the same unit into one (shorter sequences, but durations are lost)."""
    seed: int = 0
    """Seed for frame sampling, k-means++ seeding and minibatch order."""
    max_fit_frames: int = 200_000
    """At most this many feature frames (a uniform seeded sample over the corpus) are clustered; above
    100k frames k-means switches from full-batch Lloyd to minibatch updates."""
    ssl_arch: str = "hubert_base"
    """--ssl-arch: a torchaudio.models factory callable without arguments (hubert_base, hubert_large,
    wav2vec2_base, wavlm_base, ...); the checkpoint must be a state_dict of that architecture."""
    ssl_layer: int = 6
    """--ssl-layer: which transformer layer's output (1-based) is clustered."""
    ssl_checkpoint: str | None = None
    """--ssl-checkpoint PATH: state_dict saved with torch.save; required for ssl-kmeans."""
    ctc_encoder_steps: int = 800
    """--ctc-encoder-steps: training steps of the ctc-kmeans encoder (the CTC judge's recipe otherwise)."""
    codec_checkpoint: str | None = None
    """--codec-checkpoint PATH: EnCodec 24 kHz state_dict (e.g. encodec_24khz-d7cc33bc.th); required for encodec."""
    codec_bandwidth: float = 1.5
    """--codec-bandwidth (kbps) the EnCodec model is set to; units are codebook-0 codes (K=1024, 75 Hz)."""

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ZipperError(f"--speech-tokenizer {self.kind!r}: unknown kind; choose one of {', '.join(KINDS)}")
        if self.kind != "encodec":
            if not 2 <= self.k <= 32767:  # units are stored as int16
                raise ZipperError(f"--units {self.k}: need between 2 and 32767 k-means units")
            if self.max_fit_frames < self.k:
                raise ZipperError(f"max_fit_frames {self.max_fit_frames}: must be at least --units ({self.k})")
        if self.kind in ("mel-kmeans", "ctc-kmeans"):
            if self.frame_rate not in MEL_FRAME_RATES:
                raise ZipperError(f"--frame-rate {self.frame_rate}: {self.kind} supports 100, 50 or 25 Hz")
            if self.n_mels < 1:
                raise ZipperError(f"n_mels {self.n_mels}: must be positive")
        if self.kind == "ctc-kmeans" and self.ctc_encoder_steps < 1:
            raise ZipperError(f"--ctc-encoder-steps {self.ctc_encoder_steps}: must be >= 1")
        if self.kind == "ssl-kmeans":
            if not callable(getattr(torchaudio.models, self.ssl_arch, None)):
                raise ZipperError(f"--ssl-arch {self.ssl_arch!r}: not a torchaudio.models constructor "
                                  "(e.g. hubert_base, wav2vec2_base, wavlm_base)")
            if self.ssl_layer < 1:
                raise ZipperError(f"--ssl-layer {self.ssl_layer}: layers are numbered from 1")
            if not self.ssl_checkpoint:
                raise ZipperError("--ssl-checkpoint: required for --speech-tokenizer ssl-kmeans "
                                  "(a state_dict saved with torch.save)")
        if self.kind == "encodec":
            if not self.codec_checkpoint:
                raise ZipperError("--codec-checkpoint: required for --speech-tokenizer encodec "
                                  "(an EnCodec 24 kHz state_dict)")
            if float(self.codec_bandwidth) not in CODEC_BANDWIDTHS:
                raise ZipperError(f"--codec-bandwidth {self.codec_bandwidth}: EnCodec 24 kHz supports "
                                  f"{', '.join(map(str, CODEC_BANDWIDTHS))}")


def unit_settings(cfg: SpeechTokenizerConfig) -> dict:
    """The settings that change the units of this kind (paths excluded: the checkpoint's sha stands in)."""
    s = {"format": FORMAT, "kind": cfg.kind, "dedup": cfg.dedup, "sample_rate": SAMPLE_RATE}
    if cfg.kind == "mel-kmeans":
        s |= {"k": cfg.k, "frame_rate": cfg.frame_rate, "n_mels": cfg.n_mels,
              "n_fft": N_FFT, "hop": HOP, "log_eps": LOG_EPS}
    elif cfg.kind == "ssl-kmeans":
        s |= {"k": cfg.k, "ssl_arch": cfg.ssl_arch, "ssl_layer": cfg.ssl_layer}
    elif cfg.kind == "ctc-kmeans":  # the encoder's weights checksum stands for its training
        s |= {"k": cfg.k, "frame_rate": cfg.frame_rate}
    else:
        s |= {"codec_bandwidth": float(cfg.codec_bandwidth), "codec_sample_rate": CODEC_SAMPLE_RATE}
    return s


def tokenizer_checksum(cfg: SpeechTokenizerConfig, centroids: torch.Tensor | None,
                       checkpoint_sha256: str | None) -> str:
    """sha256 over the unit settings, the centroid bytes and the model checkpoint's sha256."""
    c_sha = None if centroids is None else hashlib.sha256(centroids.float().contiguous().numpy().tobytes()).hexdigest()
    shape = None if centroids is None else list(centroids.shape)
    return sha256_json({"settings": unit_settings(cfg), "centroids": c_sha, "shape": shape,
                        "checkpoint": checkpoint_sha256})


# ----------------------------------------------------------------------------- the tokenizer


def dedup_units(units: np.ndarray) -> np.ndarray:
    """Collapse runs of the same unit: [5, 5, 2, 2, 2, 5] -> [5, 2, 5]."""
    if len(units) == 0:
        return units
    keep = np.ones(len(units), dtype=bool)
    keep[1:] = units[1:] != units[:-1]
    return units[keep]


class SpeechTokenizer:
    """Maps 16 kHz mono float32 audio to a 1-D int16 array of units in [0, vocab_size)."""

    def __init__(self, cfg: SpeechTokenizerConfig, centroids: torch.Tensor | None = None,
                 checkpoint_sha256: str | None = None, model: torch.nn.Module | None = None):
        cfg.validate()
        if (centroids is None) != (cfg.kind == "encodec"):
            raise ValueError(f"{cfg.kind} tokenizer: centroids are {'required' if centroids is None else 'not used'}")
        if cfg.kind == "ctc-kmeans" and (model is None or checkpoint_sha256 is None):
            raise ValueError("ctc-kmeans tokenizer: the trained encoder and its checksum are required")
        if checkpoint_sha256 is None and cfg.kind != "mel-kmeans":  # the checksum must cover the weights
            flag, path = checkpoint_flag(cfg)
            if not Path(path).is_file():
                raise ZipperError(f"{flag} {path}: no such file")
            checkpoint_sha256 = sha256_file(path)
        self.cfg = cfg
        self.centroids = None if centroids is None else centroids.float().contiguous()  # [K, D]
        self._c_sq = None if centroids is None else self.centroids.pow(2).sum(1)  # [K], reused by every assignment
        self.checkpoint_sha256 = checkpoint_sha256
        self._model = model
        self.checksum = tokenizer_checksum(cfg, self.centroids, checkpoint_sha256)
        self.vocab_size = CODEC_BINS if cfg.kind == "encodec" else cfg.k
        rates = {"mel-kmeans": float(cfg.frame_rate), "ssl-kmeans": SSL_FRAME_RATE, "ctc-kmeans": float(cfg.frame_rate),
                 "encodec": CODEC_FRAME_RATE}
        self.frame_rate = rates[cfg.kind]

    @property
    def model(self) -> torch.nn.Module | None:
        """The SSL / EnCodec model, loaded on first use (so reading a tokenizer's checksum needs no weights)."""
        if self._model is None and self.cfg.kind != "mel-kmeans":
            model, sha = load_model(self.cfg)
            if self.checkpoint_sha256 is not None and sha != self.checkpoint_sha256:
                flag, path = checkpoint_flag(self.cfg)
                raise ZipperError(f"{flag} {path}: file changed since the speech tokenizer was made (sha256 "
                                  f"{sha[:12]}.. vs recorded {self.checkpoint_sha256[:12]}..); "
                                  "re-run zipper tokenize --force")
            self._model = model
        return self._model

    def encode_features(self, feats: torch.Tensor) -> np.ndarray:
        """Nearest-centroid assignment of [T, D] features: [T] int16 (no dedup)."""
        if self.centroids is None:
            raise ValueError("encode_features(): encodec has no centroids")
        labels, _ = assign(feats.float(), self.centroids, self._c_sq)
        return labels.numpy().astype(np.int16)

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """16 kHz mono float32 audio -> [T] int16 units (runs collapsed when cfg.dedup)."""
        if self.cfg.kind == "encodec":
            units = self._encode_codec(as_tensor(wav))
        else:
            units = self.encode_features(features(self.cfg, wav, self.model))
        return dedup_units(units) if self.cfg.dedup else units

    def _encode_codec(self, x: torch.Tensor) -> np.ndarray:
        if x.numel() == 0:
            return np.zeros(0, dtype=np.int16)
        with torch.no_grad():
            x24 = torchaudio.functional.resample(x, SAMPLE_RATE, CODEC_SAMPLE_RATE)
            frames = self.model.encode(x24.view(1, 1, -1))  # list of (codes [1, n_q, T], scale)
            codes = torch.cat([c for c, _ in frames], dim=-1)  # [1, n_q, T] at 75 Hz
        return codes[0, 0].numpy().astype(np.int16)

    def save(self, directory: str | Path) -> None:
        """Write centroids.npy (k-means kinds) then tokenizer.json, each atomically (a ctc-kmeans encoder is
        already in directory/encoder/: it was trained there)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.centroids is not None:
            with atomic_path(directory / "centroids.npy") as tmp:
                with open(tmp, "wb") as f:  # a file object: np.save on a path would append ".npy" to the temp name
                    np.save(f, self.centroids.numpy(), allow_pickle=False)
        write_json(directory / "tokenizer.json", {
            "format": FORMAT,
            "kind": self.cfg.kind,
            "config": dataclasses.asdict(self.cfg),
            "checksum": self.checksum,
            "checkpoint_sha256": self.checkpoint_sha256,
            "vocab_size": self.vocab_size,
            "frame_rate": self.frame_rate,
            "unit_settings": unit_settings(self.cfg),
            "toolkit_version": __version__,
            "torch_version": torch.__version__,
            "torchaudio_version": torchaudio.__version__,
        })

    @classmethod
    def load(cls, directory: str | Path) -> "SpeechTokenizer":
        """Read a saved tokenizer and verify its checksum; corrupt or edited files -> ZipperError naming them."""
        directory = Path(directory)
        meta_path = directory / "tokenizer.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            cfg = SpeechTokenizerConfig(**meta["config"])
            stored, ckpt_sha = meta["checksum"], meta.get("checkpoint_sha256")
        except FileNotFoundError:
            raise ZipperError(f"{meta_path}: no speech tokenizer here; run zipper tokenize first") from None
        except (ValueError, KeyError, TypeError) as e:  # bad JSON / UTF-8, missing or unknown fields
            raise ZipperError(f"{meta_path}: corrupt speech tokenizer file ({type(e).__name__}: {e})") from None
        try:
            cfg.validate()
        except ZipperError as e:
            raise ZipperError(f"{meta_path}: invalid config: {e}") from None
        centroids = None
        if cfg.kind != "encodec":
            c_path = directory / "centroids.npy"
            try:
                arr = np.load(c_path, allow_pickle=False)
            except FileNotFoundError:
                raise ZipperError(f"{c_path}: missing; re-run zipper tokenize --force") from None
            except (ValueError, OSError, EOFError) as e:
                raise ZipperError(f"{c_path}: corrupt centroids file ({e}); re-run zipper tokenize --force") from None
            if arr.ndim != 2 or arr.shape[0] != cfg.k or arr.dtype != np.float32:
                raise ZipperError(f"{c_path}: expected float32 [{cfg.k}, D] centroids, got {arr.dtype} "
                                  f"{list(arr.shape)}; re-run zipper tokenize --force")
            centroids = torch.from_numpy(arr)
        model = None
        if cfg.kind == "ctc-kmeans":
            from .ctc_judge_train import load_ctc_judge

            encoder = load_ctc_judge(directory / "encoder")
            if encoder.version != ckpt_sha:
                raise ZipperError(f"{directory / 'encoder'}: encoder {encoder.version} is not the one these units "
                                  f"were made with ({ckpt_sha}); re-run zipper tokenize --force")
            model = encoder.model
        tok = cls(cfg, centroids, ckpt_sha, model)
        if tok.checksum != stored:
            files = f"{meta_path}" + ("" if centroids is None else f" or {directory / 'centroids.npy'}")
            raise ZipperError(f"speech tokenizer checksum mismatch: {files} changed after it was written "
                              f"(recorded {stored[:12]}.., computed {tok.checksum[:12]}..); "
                              "re-run zipper tokenize --force")
        return tok


def check_units_match(tokenizer_checksum: str, units_checksum: str, where: str) -> None:
    """Refuse units made by a different speech tokenizer than this run's."""
    if tokenizer_checksum != units_checksum:
        raise ZipperError(f"units in {where} were made by speech tokenizer {units_checksum[:12]}.. but this run's "
                          f"tokenizer is {tokenizer_checksum[:12]}..; re-run zipper tokenize --force")


# ----------------------------------------------------------------------------- fitting


def fit_speech_tokenizer(cfg: SpeechTokenizerConfig, wavs: Iterable[np.ndarray],
                         log: Callable[[str], None] = print, encoder=None) -> SpeechTokenizer:
    """Fit k-means on the features of these wavs (one pass; encodec needs no fit and reads none).
    ctc-kmeans clusters the hidden states of `encoder`, a trained CTCJudge."""
    cfg.validate()
    t0 = time.time()
    if cfg.kind == "ctc-kmeans":
        if encoder is None:
            raise ValueError("fit_speech_tokenizer: ctc-kmeans needs its trained encoder")
        if 100 // encoder.cfg.subsample != cfg.frame_rate or 100 % encoder.cfg.subsample:
            raise ValueError(f"fit_speech_tokenizer: the encoder's stride {encoder.cfg.subsample} does not give "
                             f"--frame-rate {cfg.frame_rate}")
        model, ckpt_sha = encoder.model.eval(), encoder.version
    else:
        model, ckpt_sha = (None, None) if cfg.kind == "mel-kmeans" else load_model(cfg)
    if cfg.kind == "encodec":
        log(f"speech tokenizer: encodec codebook-0 units (K={CODEC_BINS}, {CODEC_FRAME_RATE:g} Hz), no fitting")
        return SpeechTokenizer(cfg, None, ckpt_sha, model)
    sample = Reservoir(cfg.max_fit_frames, torch.Generator().manual_seed(cfg.seed))
    n_utts = 0
    for wav in wavs:
        sample.add(features(cfg, wav, model))
        n_utts += 1
    x = sample.frames()
    rate = SSL_FRAME_RATE if cfg.kind == "ssl-kmeans" else cfg.frame_rate
    if x.shape[0] < cfg.k:
        raise ZipperError(f"--units {cfg.k}: the training audio gave only {sample.seen} feature frames "
                          f"({n_utts} utterances); use fewer units or more audio")
    log(f"speech tokenizer: {n_utts} utterances, {sample.seen} frames "
        f"({sample.seen / rate / 3600:.2f} h at {rate:g} Hz), features {time.time() - t0:.1f}s; "
        f"k-means K={cfg.k} on {x.shape[0]} frames")
    t1 = time.time()
    res = kmeans(x, cfg.k, seed=cfg.seed, log=log)
    log(f"speech tokenizer: k-means {'minibatch' if res.minibatch else 'Lloyd'} {res.iterations} "
        f"{'epochs' if res.minibatch else 'iterations'}, inertia {res.inertia:.4f}, {time.time() - t1:.1f}s")
    return SpeechTokenizer(cfg, res.centroids, ckpt_sha, model)
