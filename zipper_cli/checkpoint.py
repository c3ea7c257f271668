"""Training checkpoints: atomic, checksummed, loaded without executing code, last K + best kept.

ckpt/step-XXXXXXXX.pt    torch.save of plain tensors and numbers (loaded with weights_only=True)
ckpt/step-XXXXXXXX.json  its sha256, step and dev loss, written after the .pt: a .pt without a
                         matching .json is unfinished or corrupt and is skipped with a warning.

Resuming takes the newest checkpoint whose bytes match their recorded sha256 and that loads; a
truncated or corrupted one is reported on stderr (naming the file) and the previous one is used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .atomic import atomic_path, sha256_file, write_json
from .errors import ZipperError


def ckpt_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, dev_loss: float | None, keep_last: int) -> Path:
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / f"{ckpt_name(step)}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        digest = sha256_file(tmp)  # of the bytes written, before the rename makes them the checkpoint
    write_json(ckpt_dir / f"{ckpt_name(step)}.json", {"step": step, "sha256": digest, "dev_loss": dev_loss})
    _prune(ckpt_dir, keep_last)
    return path


def _records(ckpt_dir: Path) -> list[dict]:
    """The checksum records, oldest first; unreadable ones are skipped (they are written atomically)."""
    out = []
    for meta in sorted(Path(ckpt_dir).glob("step-*.json")):
        try:
            rec = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and the one with the best dev loss."""
    recs = _records(ckpt_dir)
    keep = {r["step"] for r in recs[-keep_last:]}
    scored = [r for r in recs if r.get("dev_loss") is not None]
    if scored:
        keep.add(min(scored, key=lambda r: r["dev_loss"])["step"])
    for r in recs:
        if r["step"] not in keep:
            (ckpt_dir / f"{ckpt_name(r['step'])}.json").unlink(missing_ok=True)  # meta first: a .pt alone is ignored
            (ckpt_dir / f"{ckpt_name(r['step'])}.pt").unlink(missing_ok=True)
    # A .pt without a record, older than the newest record: left by a kill during an earlier save or prune.
    recorded = {ckpt_name(r["step"]) for r in recs}
    newest = max((r["step"] for r in recs), default=-1)
    for orphan in ckpt_dir.glob("step-*.pt"):
        if orphan.stem not in recorded and _step_of(orphan) < newest:
            orphan.unlink(missing_ok=True)


def best_step(ckpt_dir: Path) -> int | None:
    scored = [r for r in _records(ckpt_dir) if r.get("dev_loss") is not None]
    return min(scored, key=lambda r: r["dev_loss"])["step"] if scored else None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint or any toolkit .pt without running code (no pickle of arbitrary objects)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a safe toolkit file"
        raise ZipperError(f"{path}: not a loadable zipper checkpoint ({' '.join(str(e).split())[:200]})") from None


def load_state(model: torch.nn.Module, path: Path, config: Path | None = None) -> None:
    """Load the tensors at `path` into `model`; tensors that do not fit (another size, a newer zipper) are
    one error naming both files, never a traceback."""
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as e:
        raise ZipperError(f"{path}: does not fit the model in {config or 'its config'} ({mismatch(e)}); "
                          "was it copied from another run or written by another zipper version?") from None


def restore_training(state: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, where: Path | str,
                     what: str, remedy: str, needs: tuple[str, ...] = ()) -> tuple[int, int]:
    """Load a training checkpoint's model and optimizer state -> (epoch, batch_pos). A checkpoint that does
    not fit (another size, a newer zipper, a missing key among `needs`) is one error naming `where`."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for key in needs:
            state[key]
        return int(state["epoch"]), int(state["batch_pos"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ZipperError(f"{where}: checkpoint step {step} does not fit {what} or this zipper ({mismatch(e)}); "
                          f"{remedy}") from None


def mismatch(e: Exception) -> str:
    """The first specific line of a load_state_dict error, e.g. 'size mismatch for embed.weight: ...'."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines[0] if lines else type(e).__name__)
    return detail[:200] + ("..." if len(detail) > 200 else "")


def warn(msg: str) -> None:
    """A warning on stderr (stdout is for progress and results)."""
    print(msg, file=sys.stderr, flush=True)


def latest_checkpoint(ckpt_dir: Path, log=warn) -> tuple[int, dict] | None:
    """The newest checkpoint whose checksum verifies and that loads; the others are skipped with a warning
    naming the file (a truncated or corrupted checkpoint falls back to the previous one)."""
    ckpt_dir = Path(ckpt_dir)
    recs = _records(ckpt_dir)
    recorded = {ckpt_name(r["step"]) for r in recs}
    newest = max((r["step"] for r in recs), default=-1)
    for orphan in sorted(ckpt_dir.glob("step-*.pt")):
        if orphan.stem not in recorded and _step_of(orphan) > newest:
            log(f"warning: {orphan} has no checksum record (interrupted while saving); ignored")
    for rec in reversed(recs):
        path = ckpt_dir / f"{ckpt_name(rec['step'])}.pt"
        if not path.exists():
            log(f"warning: {path} is missing; using the previous checkpoint")
            continue
        if sha256_file(path) != rec.get("sha256"):
            log(f"warning: {path} fails its checksum (truncated or corrupted); using the previous checkpoint")
            continue
        try:
            return rec["step"], load_checkpoint(path)
        except ZipperError as e:
            log(f"warning: {e}; using the previous checkpoint")
    return None


def _step_of(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1
