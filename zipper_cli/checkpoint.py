"""Training checkpoints: atomic, checksummed, loaded without executing code, last K + best kept.

ckpt/step-XXXXXXXX.pt    torch.save of plain tensors and numbers (loaded with weights_only=True)
ckpt/step-XXXXXXXX.json  its sha256, step and dev loss, written after the .pt: a .pt without a
                         matching .json is unfinished or corrupt and is skipped with a warning.
"""

from __future__ import annotations

import json
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
    write_json(ckpt_dir / f"{ckpt_name(step)}.json", {"step": step, "sha256": sha256_file(path), "dev_loss": dev_loss})
    _prune(ckpt_dir, keep_last)
    return path


def _records(ckpt_dir: Path) -> list[dict]:
    out = []
    for meta in sorted(Path(ckpt_dir).glob("step-*.json")):
        try:
            out.append(json.loads(meta.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
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


def best_step(ckpt_dir: Path) -> int | None:
    scored = [r for r in _records(ckpt_dir) if r.get("dev_loss") is not None]
    return min(scored, key=lambda r: r["dev_loss"])["step"] if scored else None


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint or any toolkit .pt without running code (no pickle of arbitrary objects)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a safe toolkit file"
        raise ZipperError(f"{path}: not a loadable zipper checkpoint ({' '.join(str(e).split())[:200]})") from None


def latest_checkpoint(ckpt_dir: Path, log=print) -> tuple[int, dict] | None:
    """The newest checkpoint whose checksum verifies; corrupt ones are skipped with a warning."""
    for rec in reversed(_records(ckpt_dir)):
        path = Path(ckpt_dir) / f"{ckpt_name(rec['step'])}.pt"
        if not path.exists() or sha256_file(path) != rec.get("sha256"):
            log(f"warning: {path} is missing or fails its checksum; using the previous checkpoint")
            continue
        return rec["step"], load_checkpoint(path)
    return None
