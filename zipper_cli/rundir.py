"""The run directory: provenance (run.json), stage completion markers, config checks and stage locks.

Every stage follows one protocol (icefall-style restartable stages):
  1. take the stage's lock (a second process on the same stage gets a clear error),
  2. if the stage's marker exists with the same config: "already done", skip;
     with a different config: refuse, naming the differing keys, unless --force,
  3. do the work, writing every artifact atomically,
  4. write the marker last: resolved config, input checksums, versions, wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from . import __version__
from .atomic import write_json
from .errors import ZipperError


def versions() -> dict:
    """Versions of everything that can change an artifact."""
    import numpy
    import torch

    return {
        "zipper": __version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }


def git_revision() -> str | None:
    """The toolkit's git revision (with '+dirty' for uncommitted changes), or None outside a checkout."""
    src = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def init_run_dir(run_dir: Path) -> Path:
    """Create the run directory and its run.json (kept from the first run; later runs are appended)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ZipperError(f"--run-dir {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.json"
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    info = {"created": now, "invocations": []}
    if path.exists():
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ZipperError(f"{path} is not valid JSON ({e}); move it away to start a fresh run") from None
    info.update(versions())
    info.setdefault("invocations", []).append({"time": now, "argv": sys.argv[1:]})
    info["invocations"] = info["invocations"][-50:]
    write_json(path, info)
    return run_dir


def config_dict(cfg) -> dict:
    """A JSON-ready dict of a config dataclass (paths as strings)."""
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(d, default=str))


def config_defaults(cfg) -> dict:
    """The default value of every field of a config dataclass that has one, nested like config_dict."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_defaults(value)
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out, default=str))


def diff_keys(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as 'key: old -> new'. A key the old
    dict lacks counts as equal when the new value is its default: an option added by a later zipper
    version defaults to what earlier versions did, so finished work stays finished after an upgrade."""
    out, defaults = [], defaults or {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            out += diff_keys(a, b, f"{prefix}{key}.", sub if isinstance(sub, dict) else None)
        elif a == "<unset>" and key in defaults and defaults[key] == b:
            continue
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


@dataclasses.dataclass
class Stage:
    """An open stage: where its marker goes and what it records."""

    run_dir: Path
    name: str
    config: dict
    inputs: dict
    started: float

    @property
    def marker(self) -> Path:
        return marker_path(self.run_dir, self.name)

    def finish(self, outputs: dict | None = None, extra: dict | None = None) -> None:
        """Write the completion marker: the last file a stage writes."""
        write_json(self.marker, {
            "stage": self.name,
            "config": self.config,
            "inputs": self.inputs,
            "outputs": outputs or {},
            "versions": versions(),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(time.time() - self.started, 3),
            **(extra or {}),
        })


def marker_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "stages" / f"{name}.done.json"


def read_marker(run_dir: Path, name: str) -> dict | None:
    path = marker_path(run_dir, name)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a marker is written atomically, so an unreadable one means tampering: redo the stage


def require_stage(run_dir: Path, name: str, needed_by: str) -> dict:
    """The marker of an earlier stage that `needed_by` builds on, or a clear error saying what to run."""
    marker = read_marker(run_dir, name)
    if marker is None:
        raise ZipperError(f"{needed_by} needs stage '{name}' finished in {run_dir}; run `zipper {name.split('-')[0]}` first")
    return marker


@contextlib.contextmanager
def stage_lock(run_dir: Path, name: str) -> Iterator[None]:
    """An exclusive, non-blocking lock on one stage of one run; released on exit, crash or SIGKILL."""
    path = Path(run_dir) / "stages" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise ZipperError(f"stage '{name}' of {run_dir} is being written by pid {holder} "
                              f"(lock {path}); wait for it or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def open_stage(run_dir: Path, name: str, config: dict, inputs: dict, force: bool = False,
               log=print, defaults: dict | None = None) -> Iterator[Stage | None]:
    """Lock the stage and decide whether it must run.

    Yields None when the stage already finished with this exact config (the caller skips; `defaults`,
    from config_defaults, lets a config field added since then match when it has its default),
    else a Stage whose `finish()` the caller calls after writing every artifact.
    """
    run_dir = Path(run_dir)
    with stage_lock(run_dir, name):
        marker = read_marker(run_dir, name)
        if marker is not None and not force:
            old = {"config": marker.get("config", {}), "inputs": marker.get("inputs", {})}
            new = {"config": config, "inputs": inputs}
            diffs = diff_keys(old, new, defaults={"config": defaults or {}})
            if not diffs:
                log(f"[{name}] already done in {run_dir} (same config); skipping")
                yield None
                return
            raise ZipperError(f"stage '{name}' already finished in {run_dir} with a different config "
                              f"({'; '.join(diffs)}); rerun with --force to redo it, or use another --run-dir")
        if marker is not None:
            marker_path(run_dir, name).unlink()  # --force: the stage is unfinished until it writes a new marker
        yield Stage(run_dir, name, config, inputs, time.time())
