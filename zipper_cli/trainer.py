"""The training loop shared by `pretrain` and `fuse`: AdamW, warmup + cosine, clipping, accumulation,
token-budget batches, periodic dev loss, atomic checkpoints with exact resume, SIGTERM/Ctrl-C saves,
a stop on non-finite loss, DistributedDataParallel under torchrun, metrics.jsonl and a loss plot.

Exact resume: a checkpoint holds the model, the optimizer, the RNG state and the data position
(epoch, batch); the learning rate is a pure function of the step. Batches are a pure function of
(seed, epoch), so four steps == two steps + resume + two steps, bitwise on CPU.

Data parallelism: every rank builds the same global batches; rank r trains on sequences r, r+W, ...
of each, and scales its loss so DDP's gradient average equals the gradient of the global token-mean
loss. One process with the same global batch computes the same update (up to float summation order).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .atomic import append_jsonl, kill_point, write_json, write_jsonl
from .batching import make_batches
from .checkpoint import latest_checkpoint, restore_training, save_checkpoint, warn
from .console import log as console_log, progress
from .devices import Dist, all_sum, autocast_for, broadcast, init_distributed, pick_device, slow_bf16_warning
from .errors import Interrupted, ZipperError
from .rundir import diff_keys, init_run_dir, open_stage


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by pretrain and fuse."""

    max_steps: int = 1000
    """--steps: optimizer steps in total."""
    lr: float = 1e-3
    """--lr: peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at max_steps."""
    warmup_steps: int = 50
    """--warmup: linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms, biases or gates)."""
    beta1: float = 0.9
    beta2: float = 0.99
    """Adam betas (the paper uses 0.9, 0.99)."""
    grad_clip: float = 1.0
    """--grad-clip: global gradient-norm clip (0 disables)."""
    grad_accum: int = 1
    """--grad-accum: batches per optimizer step."""
    max_tokens: int = 4096
    """--max-tokens: padded tokens per batch, across all ranks (the global batch)."""
    eval_every: int = 100
    """--eval-every: steps between dev-loss evaluations (and log lines)."""
    ckpt_every: int = 100
    """--ckpt-every: steps between checkpoints."""
    keep_last: int = 2
    """--keep-last: checkpoints kept besides the best one."""
    seed: int = 0
    """--seed: model initialisation, data order, dropout."""
    precision: str = "auto"
    """--precision: auto (bf16 autocast on CUDA, fp32 on CPU), fp32, or bf16 (autocast on CPU too)."""
    device: str = "auto"
    """--device: auto (CUDA when present), cpu or cuda."""
    scalar_lr_mult: float = 1.0
    """--gate-lr-mult: learning-rate multiplier for scalar parameters, i.e. Zipper's tanh gates. They start
    at zero and Adam moves a parameter by about lr per step, so at lr 1e-3 a gate needs hundreds of steps
    to open; short runs on small data learn faster with a larger multiplier."""
    tower_lr_mult: float = 1.0
    """--tower-lr-mult: learning-rate multiplier for the pretrained towers' own parameters inside a fused
    model (`zipper fuse`); the fusion modules keep --lr. At the fusion's learning rate a small aligned set
    pulls a pretrained tower away from what it learned (demo: the speech tower's dev loss 2.25 -> 2.47 in
    100 steps at lr 1e-3); a smaller multiplier keeps it close."""

    def validate(self) -> None:
        checks = [(self.max_steps >= 1, f"--steps must be >= 1 (got {self.max_steps})"),
                  (self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
                  (self.warmup_steps >= 0, f"--warmup must be >= 0 (got {self.warmup_steps})"),
                  (self.grad_accum >= 1, f"--grad-accum must be >= 1 (got {self.grad_accum})"),
                  (self.max_tokens >= 8, f"--max-tokens must be >= 8 (got {self.max_tokens})"),
                  (self.eval_every >= 1, f"--eval-every must be >= 1 (got {self.eval_every})"),
                  (self.ckpt_every >= 1, f"--ckpt-every must be >= 1 (got {self.ckpt_every})"),
                  (self.keep_last >= 1, f"--keep-last must be >= 1 (got {self.keep_last})"),
                  (self.grad_clip >= 0, f"--grad-clip must be >= 0 (got {self.grad_clip})"),
                  (self.scalar_lr_mult > 0, f"--gate-lr-mult must be > 0 (got {self.scalar_lr_mult})"),
                  (self.tower_lr_mult > 0, f"--tower-lr-mult must be > 0 (got {self.tower_lr_mult})"),
                  (self.precision in ("auto", "fp32", "bf16"), f"--precision must be auto, fp32 or bf16 (got {self.precision!r})")]
        for ok, msg in checks:
            if not ok:
                raise ZipperError(msg)
        pick_device(self.device)  # --device: the same checks and messages as every stage


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_ = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_)))


def resolve_device(cfg: TrainConfig) -> str:
    return pick_device(cfg.device)


@contextlib.contextmanager
def training_stage(run_dir: Path, name: str, stage_cfg: dict, inputs: dict, out: Path, force: bool, d: Dist,
                   defaults: dict | None = None):
    """Open a training stage. Rank 0 owns the run directory (lock, marker, files) and every rank follows
    its decision: yields the Stage on rank 0 ("follower" on the others) when the stage must run, None
    when it is already done; rank 0's error is raised on every rank."""
    error, ctx = None, contextlib.nullcontext("follower")
    if d.main:
        init_run_dir(run_dir)
        ctx = open_stage(run_dir, name, stage_cfg, inputs, force=force, log=console_log, defaults=defaults)
    with contextlib.ExitStack() as stack:
        stage = None
        try:
            stage = stack.enter_context(ctx)
            if d.main and stage is not None:
                _check_unfinished(out, stage_cfg, force, defaults)
        except ZipperError as e:
            error = str(e)
        decision = broadcast({"error": error, "run": stage is not None}, d)
        if decision["error"]:
            raise ZipperError(decision["error"])
        yield stage if decision["run"] else None


def _check_unfinished(out: Path, stage_cfg: dict, force: bool, defaults: dict | None = None) -> None:
    """Checkpoints of an unfinished run with another config are not silently mixed with this one."""
    saved = out / "stage_config.json"
    if saved.exists() and any((out / "ckpt").glob("step-*.pt")):
        diffs = diff_keys(json.loads(saved.read_text()), stage_cfg, defaults=defaults)
        if diffs and not force:
            raise ZipperError(f"{out} holds checkpoints of an unfinished run with a different config "
                              f"({'; '.join(diffs)}); rerun with --force to start over")
    if force and out.exists():
        shutil.rmtree(out)
    write_json(saved, stage_cfg)


# ---------------------------------------------------------------------------------------------- the loop


LossFn = Callable[[torch.nn.Module, list, str], tuple[torch.Tensor, int]]
"""loss_fn(model, examples, device) -> (sum of token losses, number of target tokens)."""


class _Stop:
    """Set by SIGTERM / SIGINT; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        self.signum = signum


def optimizer_groups(model: torch.nn.Module, weight_decay: float, scalar_lr_mult: float = 1.0,
                     tower_lr_mult: float = 1.0) -> list[dict]:
    """Decay matrices only; scalars (gates) get their own learning-rate multiplier, and so do the
    parameters of a fused model's towers (`model.towers`, a Zipper's); frozen parameters are never
    handed to the optimizer."""
    towers = getattr(model, "towers", None)
    in_tower = {id(p) for p in towers.parameters()} if isinstance(towers, torch.nn.ModuleDict) else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for mult, ps in ((tower_lr_mult, [p for p in params if id(p) in in_tower]),
                     (1.0, [p for p in params if id(p) not in in_tower])):
        groups += [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay, "lr_mult": mult},
                   {"params": [p for p in ps if p.dim() == 1], "weight_decay": 0.0, "lr_mult": mult},
                   {"params": [p for p in ps if p.dim() == 0], "weight_decay": 0.0, "lr_mult": mult * scalar_lr_mult}]
    return [g for g in groups if g["params"]]


def train(out_dir: Path, model: torch.nn.Module, train_examples: Sequence, dev_examples: Sequence,
          lengths: list[int], loss_fn: LossFn, cfg: TrainConfig, log=console_log,
          extra_metrics: Callable[[torch.nn.Module], dict] | None = None, groups: list[int] | None = None) -> dict:
    """Train `model` in place, checkpointing under out_dir/ckpt; returns the final summary.

    `lengths[i]` is the padded-cost length of train_examples[i] (for the token budget); batches never
    mix examples of different `groups` (fusion keeps ASR and TTS apart to skip masked-out compute).
    """
    cfg.validate()
    device = resolve_device(cfg)
    d = init_distributed(device)
    if d.main and (slow := slow_bf16_warning(cfg, device)):
        warn(slow)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "ckpt"
    model.to(device)
    opt = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay, cfg.scalar_lr_mult, cfg.tower_lr_mult), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=False, foreach=False)  # the plain loop: bitwise reproducible on CPU
    ddp = model
    if d.world > 1:
        # Models that skip work per batch (Zipper skips cross-attention pairs no query can use) leave some
        # parameters without gradients in some steps; DDP must be told to look for them.
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if device == "cuda" else None,
                                                        find_unused_parameters=getattr(model, "skips_parameters", False))

    step, epoch, batch_pos = 0, 0, 0
    loss, last_dev = float("nan"), None
    resumed = latest_checkpoint(ckpt_dir, log=warn if d.main else (lambda *_: None))
    if resumed is not None:
        step, state = resumed
        epoch, batch_pos = restore_training(state, model, opt, step, ckpt_dir, "this model",
                                            "rerun with --force to start over", needs=("rng_cpu",))
        rng = state["rng_cpu"]
        torch.set_rng_state(rng[d.rank % rng.shape[0]] if rng.dim() > 1 else rng)
        if device == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        loss = float(state.get("loss", float("nan")))  # what the summary reports if no step is left to run
        last_dev = float(state["last_dev"]) if state.get("last_dev") is not None else None
        if d.main:
            log(f"resuming from {ckpt_dir} at step {step}")
    else:
        torch.manual_seed(cfg.seed + d.rank)  # dropout differs per rank, as each sees other data
    if d.main:  # rows logged after the checkpoint (or by a run killed before its first one) are redone
        _truncate_metrics(out_dir / "metrics.jsonl", step)

    stop = _Stop()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    metrics_path = out_dir / "metrics.jsonl"
    batches = make_batches(lengths, cfg.max_tokens, cfg.seed, epoch, groups=groups)
    if not batches:
        raise ZipperError("no training examples")
    t_start, tokens_seen = time.time(), 0
    try:
        with progress() as bar:
            task = bar.add_task("train", total=cfg.max_steps, completed=step) if d.main else None
            while step < cfg.max_steps:
                # The step's batches, advancing epochs as they run out.
                step_batches = []
                while len(step_batches) < cfg.grad_accum:
                    if batch_pos >= len(batches):
                        epoch, batch_pos = epoch + 1, 0
                        batches = make_batches(lengths, cfg.max_tokens, cfg.seed, epoch, groups=groups)
                    step_batches.append(batches[batch_pos])
                    batch_pos += 1
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, step) * group["lr_mult"]
                model.train()
                t0 = time.time()
                n_total = sum(_count_targets(train_examples, b, loss_fn) for b in step_batches)
                loss_sum = torch.zeros((), device=device)
                for i, batch in enumerate(step_batches):
                    local = batch[d.rank::d.world]
                    weight = 1.0
                    if not local:  # fewer sequences than ranks: take part in the all-reduce with zero weight
                        local, weight = batch[:1], 0.0
                    sync = i == len(step_batches) - 1 or d.world == 1
                    with (nullcontext() if sync else ddp.no_sync()), autocast_for(cfg, device):
                        s, _ = loss_fn(ddp, [train_examples[j] for j in local], device)
                        s = s.float() * weight
                    (s * d.world / n_total).backward()
                    loss_sum += s.detach()
                loss = (all_sum(loss_sum, d) / n_total).item()
                if not math.isfinite(loss):
                    opt.zero_grad(set_to_none=True)
                    last = latest_checkpoint(ckpt_dir, log=lambda *_: None)
                    kept = f"the last good checkpoint (step {last[0]}) is kept in {ckpt_dir}" if last else "no checkpoint was written"
                    raise ZipperError(f"non-finite training loss ({loss}) at step {step + 1}; stopped before the update; "
                                      f"{kept}; try a lower --lr")
                gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += n_total
                dt = max(time.time() - t0, 1e-9)
                row = {"step": step, "loss": round(loss, 6), "lr": lr_at(cfg, step - 1), "grad_norm": round(float(gnorm), 4),
                       "tokens": n_total, "tokens_per_s": round(n_total / dt, 1), "elapsed": round(time.time() - t_start, 2)}
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    last_dev = evaluate(ddp if d.world > 1 else model, dev_examples, loss_fn, cfg, device, d)
                    if last_dev is not None:
                        row["dev_loss"] = round(last_dev, 6)
                        row["dev_ppl"] = round(math.exp(min(last_dev, 50)), 4)
                    if extra_metrics is not None:
                        row.update(extra_metrics(model))
                    if d.main:
                        rate = tokens_seen / max(time.time() - t_start, 1e-9)
                        eta = (cfg.max_steps - step) * (time.time() - t_start) / max(1, step - (resumed[0] if resumed else 0))
                        dev_txt = f" dev {last_dev:.4f} (ppl {math.exp(min(last_dev, 50)):.2f})" if last_dev is not None else ""
                        log(f"step {step}/{cfg.max_steps} loss {loss:.4f}{dev_txt} lr {row['lr']:.2e} "
                            f"{rate:,.0f} tok/s eta {eta:,.0f}s")
                if d.main:
                    append_jsonl(metrics_path, row)  # a cut line is dropped on resume (_truncate_metrics)
                    bar.update(task, completed=step, description=f"step {step} loss {loss:.3f} {row['tokens_per_s']:,.0f} tok/s")
                kill_point(f"step:{step}")
                stop_now = torch.tensor(float(stop.signum is not None))
                if d.world > 1:
                    dist.all_reduce(stop_now, op=dist.ReduceOp.MAX)
                if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop_now.item():
                    _save(ckpt_dir, model, opt, step, epoch, batch_pos, last_dev, cfg, device, d, loss)
                if stop_now.item() and step < cfg.max_steps:
                    raise Interrupted(f"stopped by signal at step {step}; checkpoint saved in {ckpt_dir}; "
                                            "rerun the same command to resume")
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return {"steps": step, "final_loss": loss, "dev_loss": last_dev,
            "dev_ppl": math.exp(min(last_dev, 50)) if last_dev is not None else None}


def _count_targets(examples: Sequence, batch: list[int], loss_fn) -> int:
    count = getattr(loss_fn, "count_targets", None)
    return sum(count(examples[j]) for j in batch) if count else sum(len(examples[j]) - 1 for j in batch)


@torch.no_grad()
def evaluate(model, examples: Sequence, loss_fn: LossFn, cfg: TrainConfig, device: str, d: Dist = Dist()) -> float | None:
    """Token-weighted mean loss over `examples`, split across ranks."""
    if not examples:
        return None
    model.eval()
    lengths = [len(e) if hasattr(e, "__len__") else 1 for e in examples]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = list(range(d.rank, len(examples), d.world))
    tasks = [getattr(examples[i], "task", "") for i in mine]  # keep fusion tasks apart, as in training
    groups = [sorted(set(tasks)).index(t) for t in tasks]
    for batch in make_batches([lengths[i] for i in mine], cfg.max_tokens, 0, 0, shuffle=False, groups=groups):
        with autocast_for(cfg, device):
            s, n = loss_fn(model.module if hasattr(model, "module") else model, [examples[mine[j]] for j in batch], device)
        total[0] += s.double()
        total[1] += n
    total = all_sum(total, d)
    model.train()
    return (total[0] / total[1]).item()


def _save(ckpt_dir, model, opt, step, epoch, batch_pos, dev_loss, cfg, device, d: Dist, loss: float) -> None:
    rng = torch.get_rng_state()
    if d.world > 1:  # every rank's dropout RNG, so a resumed DDP run continues exactly too
        gathered = [None] * d.world
        dist.all_gather_object(gathered, rng)
        rng = torch.stack(gathered)
    if d.main:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
                 "batch_pos": batch_pos, "rng_cpu": rng, "loss": loss, "last_dev": dev_loss}
        if device == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(ckpt_dir, step, state, dev_loss, cfg.keep_last)
    if d.world > 1:
        dist.barrier()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows logged after the checkpoint so the log matches the run; a line cut
    short by a kill is dropped too."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            rows.append(row)
    write_jsonl(path, rows)
