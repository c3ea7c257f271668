"""Atomic file writes and checksums: an artifact is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Iterator

from .errors import ZipperError

KILL_ENV = "ZIPPER_TEST_KILL_AT"
_kill_hits: dict[str, int] = {}


def kill_point(label: str) -> None:
    """Test hook: SIGKILL this process at a named point, so tests interrupt stages deterministically.

    ZIPPER_TEST_KILL_AT=PATTERN[#N] kills at the N-th (default first) point whose label matches the
    shell-style PATTERN. Labels: 'write:NAME' (a file's temporary copy is complete, not yet renamed),
    'wrote:NAME' (renamed into place), 'step:N' (a training step is logged, its checkpoint maybe not).
    ZIPPER_TEST_KILL_SIGNAL=STOP sends SIGSTOP instead (the process pauses there, holding its locks,
    until a SIGCONT). Unset (always, outside tests) it costs one dictionary lookup.
    """
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition("#")
    if fnmatch.fnmatchcase(label, pattern):
        _kill_hits[pattern] = _kill_hits.get(pattern, 0) + 1
        if _kill_hits[pattern] == int(nth or 1):
            sig = signal.SIGSTOP if os.environ.get("ZIPPER_TEST_KILL_SIGNAL") == "STOP" else signal.SIGKILL
            os.kill(os.getpid(), sig)


def _remove_stale_temps(path: Path) -> None:
    """Temporary files left beside `path` by a killed writer (its pid is gone) are removed."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`.

    On any exception the temporary file is removed and `path` keeps its previous content. A full disk
    (ENOSPC) while writing is the same: the old content stays, and the error names the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(path) from None
        raise
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno in DISK_FULL:
                raise disk_full_error(path) from None
            raise
        except RuntimeError:  # torch.save reports a failed write as a RuntimeError ("unexpected pos ...")
            if _low_space(tmp):
                raise disk_full_error(path) from None
            raise
        kill_point(f"write:{path.name}")
        os.replace(tmp, path)
        kill_point(f"wrote:{path.name}")
    finally:
        if tmp.exists():
            tmp.unlink()


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(path: Path) -> ZipperError:
    return ZipperError(f"{path}: no space left on device while writing it; the previous content (if any) is kept "
                       "and nothing was marked finished; free some space and rerun the same command")


def _low_space(tmp: Path) -> bool:
    """Whether the filesystem holding `tmp` is nearly full (under 64 MiB available): how a torch.save
    that failed for want of space is told apart from its other errors."""
    try:
        st = os.statvfs(tmp.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 20)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line (metrics logs). Not atomic: a line cut short by a crash or a full disk is
    dropped by the reader on resume; a full disk is one error naming the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(path) from None
        raise


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
