"""Training, saving and loading the CTC judge (train_ctc_judge, load_ctc_judge: a judge directory).

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

Files under a judge directory: see zipper_cli.ctc_judge.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import append_jsonl, atomic_path, sha256_file, write_json
from .batching import make_batches
from .checkpoint import ckpt_name, latest_checkpoint, load_checkpoint, restore_training, save_checkpoint
from .console import log as console_log, progress
from .ctc_judge_model import (BLANK, FORMAT, VOCAB, CTCJudge, CTCJudgeConfig, CTCModel, _pad, features,
                              greedy_decode, ids_to_text, lr_at, param_count, text_to_ids)
from .errors import Interrupted, ZipperError

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


def _prepare(pairs, cfg: CTCJudgeConfig, what: str, log,
             name: str) -> tuple[list[torch.Tensor], list[list[int]], list[str], int]:
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
        log(f"[{name}] {what}: skipped {dropped} of {len(pairs)} utterances (empty transcript, no audio, "
            f"or more characters than {100 // cfg.subsample} Hz CTC frames can hold)")
    return feats, labels, texts, dropped


def train_ctc_judge(pairs: Sequence[tuple[np.ndarray, str]], dev_pairs: Sequence[tuple[np.ndarray, str]],
                    cfg: CTCJudgeConfig, out_dir: str | Path, log: Callable[[str], None] = console_log,
                    name: str = "ctc-judge") -> CTCJudge:
    """Train a CTC judge on (16 kHz wav, transcript) pairs, checkpointing under out_dir; returns it.
    `name` prefixes its log lines (the ctc-kmeans tokenizer trains its encoder here as "ctc-encoder").

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
        log(f"[{name}] already trained in {out_dir} ({judge.version}); loading it")
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
    train_feats, train_labels, _, _ = _prepare(pairs, cfg, "train", log, name)
    dev_feats, _, dev_texts, _ = _prepare(dev_pairs, cfg, "dev", log, name) if dev_pairs else ([], [], [], 0)
    if not train_feats:
        raise ZipperError("CTC judge: no usable training utterances (every transcript was empty or every "
                          "audio too short)")
    feat_seconds = time.time() - t_feat
    lengths = [f.shape[0] for f in train_feats]
    hours = sum(lengths) / 100 / 3600
    log(f"[{name}] {len(train_feats)} training utterances ({hours:.2f} h), {len(dev_feats)} dev; "
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
        epoch, batch_pos = restore_training(state, model, opt, step, f"{ckpt_dir / ckpt_name(step)}.pt",
                                            "this CTC judge model", f"delete {out_dir} to start over")
        trained_seconds = float(state.get("train_seconds", 0.0))
        log(f"[{name}] resuming from {ckpt_dir} at step {step}/{cfg.steps}")
    _truncate_metrics(metrics_path, step)  # rows past the checkpoint (or of a run that never saved one)
    log(f"[{name}] model: {cfg.layers} conv blocks x {cfg.dim}, {param_count(model) / 1e6:.2f}M parameters, "
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
            task = bar.add_task(name, total=cfg.steps, completed=step)
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
                    log(f"[{name}] step {step}/{cfg.steps} epoch {epoch} loss {loss_val:.3f}{dev_txt} "
                        f"lr {row['lr']:.2e} {rate:.0f}x real time, eta {eta:.0f}s")
                append_jsonl(metrics_path, row)  # a cut line is dropped on resume (_truncate_metrics)
                bar.update(task, completed=step, description=f"{name} loss {loss_val:.3f}")
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
    log(f"[{name}] trained {judge.version}: {dev_txt}{train_seconds:.0f} s of training")
    return judge

