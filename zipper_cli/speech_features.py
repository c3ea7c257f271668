"""What the speech tokenizer clusters: the shared 16 kHz log-mel (100 Hz frames; the vocoder predicts it,
Griffin-Lim inverts it, the CTC judge reads it), per-utterance normalised and stacked mel frames
(mel-kmeans), a layer of an SSL model (ssl-kmeans) or of the run's CTC encoder (ctc-kmeans), and the
loading of SSL and EnCodec checkpoints from local files."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchaudio

from zipper_cli.atomic import sha256_file
from zipper_cli.errors import ZipperError

if TYPE_CHECKING:
    from zipper_cli.speech_tokenizer import SpeechTokenizerConfig

SAMPLE_RATE = 16_000
N_FFT, HOP = 400, 160  # 25 ms windows, 10 ms hop -> 100 Hz mel frames
LOG_EPS = 1e-6


def as_tensor(wav: np.ndarray) -> torch.Tensor:
    """1-D audio as a float32 tensor (ValueError for anything else: stereo is mixed down before this)."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"speech tokenizer expects 1-D mono 16 kHz audio, got shape {wav.shape}")
    return torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))


@functools.lru_cache(maxsize=4)
def _mel_transform(n_mels: int) -> torch.nn.Module:
    # built once per process: the mel filterbank and window are the expensive part of construction
    return torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=n_mels)


def log_mel(wav: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """Un-normalised log-mel at 100 Hz: [T, n_mels] float32, T = 1 + len(wav) // 160 (0 if too short)."""
    x = as_tensor(wav)
    if x.numel() <= N_FFT // 2:  # centred STFT pads by reflection, which needs more than n_fft/2 samples
        return torch.zeros(0, n_mels)
    with torch.no_grad():
        mel = _mel_transform(n_mels)(x)  # [n_mels, T]
    return (mel + LOG_EPS).log_().t().contiguous()  # [T, n_mels]


def _ssl_features(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    dim = model.encoder.feature_projection.projection.out_features
    if x.numel() < 400:  # the conv front end's receptive field: shorter input gives no frame
        return torch.zeros(0, dim)
    with torch.no_grad():
        layers, _ = model.extract_features(x.unsqueeze(0), num_layers=layer)  # list of [1, T, D]
    return layers[-1][0].float()  # [T, D] at 50 Hz


def _ctc_features(model: torch.nn.Module, wav: np.ndarray) -> torch.Tensor:
    from .ctc_judge_model import features as ctc_input

    x = ctc_input(wav, model.cfg.n_mels)  # [T, n_mels] at 100 Hz
    if x.shape[0] == 0:
        return torch.zeros(0, model.cfg.dim)
    with torch.no_grad():
        h, _ = model.hidden(x.unsqueeze(0), torch.tensor([x.shape[0]]))
    return h[0]  # [ceil(T / subsample), dim]


def normalise_and_stack(frames: torch.Tensor, stack: int) -> torch.Tensor:
    """[T, D] 100 Hz frames of one utterance -> [T // stack, stack * D]: mean/variance normalisation per
    column over the utterance (removes channel and loudness), then `stack` consecutive frames side by side,
    in time order (the remainder frames dropped)."""
    x = (frames - frames.mean(0)) / frames.std(0, unbiased=False).clamp_min(1e-5)
    t = x.shape[0] // stack * stack
    return x[:t].reshape(t // stack, stack * x.shape[1])


def features(cfg: SpeechTokenizerConfig, wav: np.ndarray, model: torch.nn.Module | None = None) -> torch.Tensor:
    """[T, D] float32 features that k-means clusters (mel-kmeans: D = n_mels * 100/frame_rate)."""
    if cfg.kind == "mel-kmeans":
        stack = 100 // cfg.frame_rate
        lm = log_mel(wav, cfg.n_mels)  # [T, n_mels]
        if lm.shape[0] < stack:
            return torch.zeros(0, stack * cfg.n_mels)
        return normalise_and_stack(lm, stack)
    if cfg.kind == "ssl-kmeans":
        return _ssl_features(model if model is not None else load_model(cfg)[0], as_tensor(wav), cfg.ssl_layer)
    if cfg.kind == "ctc-kmeans":
        if model is None:
            raise ValueError("features(): ctc-kmeans needs its trained encoder (SpeechTokenizer.load gives it)")
        return _ctc_features(model, wav)
    raise ValueError("features(): encodec units are codec codes, there are no k-means features")


# ----------------------------------------------------------------------------- pretrained models

_MODEL_CACHE: dict = {}  # one model per process: a new key evicts the old one (models can be GBs)


def checkpoint_flag(cfg: SpeechTokenizerConfig) -> tuple[str, str | None]:
    """The flag that names the SSL or EnCodec checkpoint, and its value: error messages quote both."""
    if cfg.kind == "ssl-kmeans":
        return "--ssl-checkpoint", cfg.ssl_checkpoint
    return "--codec-checkpoint", cfg.codec_checkpoint


def load_model(cfg: SpeechTokenizerConfig) -> tuple[torch.nn.Module, str]:
    """Build the SSL or EnCodec model from its checkpoint (once per process): (model in eval mode, file sha256)."""
    ssl = cfg.kind == "ssl-kmeans"
    flag, path = checkpoint_flag(cfg)
    if not path or not Path(path).is_file():
        raise ZipperError(f"{flag} {path}: no such file")
    st = Path(path).stat()
    key = (cfg.kind, cfg.ssl_arch if ssl else float(cfg.codec_bandwidth), str(Path(path).resolve()),
           st.st_size, st.st_mtime_ns)
    if key in _MODEL_CACHE:
        model, sha = _MODEL_CACHE[key]
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a non-checkpoint file
            first = str(e).splitlines()[0] if str(e) else ""
            raise ZipperError(f"{flag} {path}: cannot read as a torch state_dict ({type(e).__name__}: {first})") from e
        if not isinstance(state, dict):
            raise ZipperError(f"{flag} {path}: expected a state_dict (dict of tensors), got {type(state).__name__}")
        arch = f"torchaudio.models.{cfg.ssl_arch}" if ssl else "EnCodec 24 kHz"
        with warnings.catch_warnings():  # encodec uses the deprecated torch.nn.utils.weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            if ssl:
                model = getattr(torchaudio.models, cfg.ssl_arch)()
            else:
                from encodec import EncodecModel

                model = EncodecModel.encodec_model_24khz(pretrained=False)  # builds offline; weights come next
        _load_state(model, state, f"{flag} {path}", arch)
        if not ssl:
            model.set_target_bandwidth(float(cfg.codec_bandwidth))
        model.eval().requires_grad_(False)
        sha = sha256_file(path)
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = (model, sha)
    if ssl:
        n_layers = len(model.encoder.transformer.layers)
        if not 1 <= cfg.ssl_layer <= n_layers:
            raise ZipperError(f"--ssl-layer {cfg.ssl_layer}: {cfg.ssl_arch} has layers 1..{n_layers}")
    return model, sha


def _load_state(model: torch.nn.Module, state: dict, where: str, arch: str) -> None:
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ZipperError(
            f"{where}: keys do not match {arch}: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    bad = [n for n, t in want.items() if tuple(getattr(state[n], "shape", ())) != tuple(t.shape)]
    if bad:
        got, need = tuple(state[bad[0]].shape), tuple(want[bad[0]].shape)
        raise ZipperError(f"{where}: tensor shapes do not match {arch} (e.g. {bad[0]}: {got} vs {need})")
    model.load_state_dict(state)
