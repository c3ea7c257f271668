"""Training, saving and loading the unit vocoder.

Training (train_vocoder): L1 between predicted and true log-mel (the audio's 100 Hz frames trimmed to
units * 100/frame_rate), random fixed-length segments, AdamW with warmup + cosine. Batches are a
pure function of (seed, step), so an interrupted run resumes exactly from its checkpoint.

On disk (a directory): train.pt (checkpoint while training: model, optimizer, step, loss history),
then vocoder.pt (model tensors only) and config.json (config, loss, data signature), written
atomically, config.json last; vocoder.ensure_vocoder adds vocoder.json (tokenizer checksum, versions)
after. All .pt files are plain tensors loaded with weights_only=True.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from . import __version__
from .atomic import atomic_path, write_json
from .console import log as console_log, progress
from .errors import Interrupted, ZipperError
from .speech_features import log_mel
from .vocoder_model import FORMAT, INFERENCE_ONLY, UnitVocoder, VocoderConfig


def _data_signature(pairs: list[tuple[np.ndarray, torch.Tensor, int]]) -> str:
    h = hashlib.sha256()
    for units, mel, speaker in pairs:
        h.update(np.ascontiguousarray(units, dtype=np.int64).tobytes())
        if speaker:  # the default voice (0) hashes as before speakers existed
            h.update(f"speaker {speaker}".encode())
        h.update(str(tuple(mel.shape)).encode())
        h.update(mel[:: max(1, mel.shape[0] // 4)].numpy().round(3).tobytes())  # a few frames, cheaply
    return h.hexdigest()


def prepare_pairs(pairs: Iterable[tuple], cfg: VocoderConfig) -> list[tuple[np.ndarray, torch.Tensor, int]]:
    """(units, 16 kHz wav[, speaker label]) -> (units, log-mel, speaker row) with units * upsample == mel
    frames (the shorter side is trimmed); a missing or unknown speaker is the default voice, row 0."""
    up = cfg.upsample
    out = []
    for units, wav, *speaker in pairs:
        u = np.asarray(units).astype(np.int64).reshape(-1)
        if u.size and (u.min() < 0 or u.max() >= cfg.vocab_size):
            raise ZipperError(f"vocoder training: units outside 0..{cfg.vocab_size - 1} "
                              f"(got {int(u.min())}..{int(u.max())}); vocab_size must be the tokenizer's K")
        mel = log_mel(np.asarray(wav, dtype=np.float32), cfg.n_mels)
        n = min(len(u), mel.shape[0] // up)
        if n >= 1:
            out.append((u[:n], mel[:n * up].contiguous(), cfg.speaker_index(speaker[0] if speaker else None)))
    return out


def _batch(data: list[tuple[np.ndarray, torch.Tensor, int]], weights: torch.Tensor, cfg: VocoderConfig, step: int):
    """The segments of one step (units, mels, lengths, speaker rows): a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    seg, up = cfg.segment_units, cfg.upsample
    idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=g).tolist()
    units = torch.zeros(cfg.batch_size, seg, dtype=torch.long)
    mels = torch.zeros(cfg.batch_size, seg * up, cfg.n_mels)
    lens = torch.zeros(cfg.batch_size, dtype=torch.long)
    speakers = torch.tensor([data[i][2] for i in idx], dtype=torch.long)
    for j, i in enumerate(idx):
        u, m, _ = data[i]
        n = len(u)
        start = int(torch.randint(0, max(0, n - seg) + 1, (1,), generator=g))
        k = min(seg, n - start)
        units[j, :k] = torch.from_numpy(u[start:start + k])
        mels[j, :k * up] = m[start * up:(start + k) * up]
        lens[j] = k
    return units, mels, lens, speakers


@functools.lru_cache(maxsize=8)
def mel_cepstrum_basis(n_mels: int, cepstra: int) -> torch.Tensor:
    """[n_mels, cepstra]: log-mel frames @ this = their first `cepstra` mel-cepstral coefficients (an
    orthonormal DCT-II over the mel axis, as in MFCCs): the spectral envelope, without the fine structure.
    Cached (every training step uses it): callers must not modify it in place."""
    k = torch.arange(cepstra, dtype=torch.float64)[:, None]
    j = torch.arange(n_mels, dtype=torch.float64)[None, :]
    dct = torch.cos(math.pi / n_mels * (j + 0.5) * k) * math.sqrt(2.0 / n_mels)  # [cepstra, n_mels]
    dct[0] /= math.sqrt(2.0)
    return dct.t().float().contiguous()


def _loss(model: UnitVocoder, units, mels, lens, speakers) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, plain L1): masked L1 between predicted and true log-mel, plus envelope_weight times
    the masked L1 between their first envelope_cepstra mel-cepstral coefficients. The plain L1 is what
    logs and train_l1 report, so configs compare. (An added L1 on frame-to-frame differences, weight 1, was
    tried for sharper transitions: pocketsphinx WER 0.309 vs 0.296 without, on 200 demo test utterances;
    not kept.)"""
    cfg = model.cfg
    pred = model(units, lens, speakers)
    mask = (torch.arange(mels.shape[1])[None, :] < (lens * model.upsample)[:, None]).unsqueeze(-1).float()
    err = pred - mels  # [B, T, n_mels]
    l1 = (err.abs() * mask).sum() / (mask.sum() * mels.shape[2])
    if cfg.envelope_weight == 0:
        return l1, l1
    cep = err @ mel_cepstrum_basis(cfg.n_mels, cfg.envelope_cepstra)  # [B, T, cepstra]
    env = (cep.abs() * mask).sum() / (mask.sum() * cfg.envelope_cepstra)
    return l1 + cfg.envelope_weight * env, l1


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


def train_vocoder(pairs: Iterable[tuple], cfg: VocoderConfig, out_dir: str | Path,
                  log: Callable[[str], None] = console_log, *, stop_after: int | None = None) -> UnitVocoder:
    """Train a UnitVocoder on (units, 16 kHz wav[, speaker label]) pairs and save it in out_dir; returns it in eval mode.

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
    n_units = sum(len(u) for u, _, _ in data)
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
            return with_inference_settings(load_vocoder(out_dir), cfg)
        final_cfg.unlink()  # a new training run: the old result is no longer the finished one

    torch.manual_seed(cfg.seed)
    model = UnitVocoder(cfg)
    opt = _optimizer(model, cfg)
    weights = torch.tensor([float(len(u)) for u, _, _ in data])
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
        model.set_output_mean(torch.cat([m for _, m, _ in data]).mean(0))  # start at the corpus's mean frame
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
                batch = _batch(data, weights, cfg, step)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(cfg, step)
                loss, l1 = _loss(model, *batch)
                if not torch.isfinite(loss):
                    raise ZipperError(f"vocoder training: non-finite loss at step {step + 1}; try a lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                loss_value = l1.item()
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


def with_inference_settings(model: UnitVocoder, cfg: VocoderConfig) -> UnitVocoder:
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
