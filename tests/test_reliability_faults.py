"""Faults: a full disk, and two processes at once.

Full disk: simulated by an OSError(ENOSPC) at chosen writes (monkeypatched before the CLI child is
forked, so only that child sees it), and for real on a small tmpfs where one can be mounted. Each gives
one `error: ...` line naming the file, exit status 2, a consistent run directory (no marker, no temporary
files, every checkpoint left verifies), and the rerun after space is freed completes with the same
result as a run that never failed.

Two processes: a second process on a stage that is running is refused with one line naming the holder;
other stages of the same run and stages of other runs run side by side. The first process is paused
deterministically (ZIPPER_TEST_KILL_SIGNAL=STOP at a kill point), holding its lock.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from cli_runner import (assert_same_files, files, in_process_patches_reach_the_child, metric_rows, spawn,
                        warm_imports, zipper)
from conftest import make_small_manifest
from test_reliability_kill import pretrain_args, tokenize_args
from zipper_cli.checkpoint import latest_checkpoint
from zipper_cli.shards import read_shard

PRETRAIN = pretrain_args("text")
# The simulated full disks below are monkeypatches in this process: they need the forked child.
simulated = pytest.mark.skipif(not in_process_patches_reach_the_child(),
                               reason="a GPU machine runs the CLI as a real process, which in-process patches miss")


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """root/corpus.jsonl and root/ref/run: tokenized, text tower pretrained, never failed."""
    warm_imports()
    root = tmp_path_factory.mktemp("faults")
    make_small_manifest(root)
    (root / "ref").mkdir()
    zipper(*tokenize_args(root / "corpus.jsonl"), cwd=root / "ref")
    zipper(*PRETRAIN, cwd=root / "ref")
    return root


def tokenized_copy(root: Path, name: str) -> Path:
    cwd = root / name
    shutil.copytree(root / "ref", cwd, ignore=shutil.ignore_patterns("towers", "pretrain-*"))
    return cwd


def full_disk_at(monkeypatch, pattern: str) -> None:
    """Every fsync of a file whose name matches `pattern` fails with ENOSPC, as on a full disk."""
    real = os.fsync

    def fsync(fd):
        if fnmatch.fnmatchcase(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), pattern):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def assert_one_line_disk_full(res, name: str) -> None:
    assert res.returncode == 2, str(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}: no space left on device"), res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def assert_consistent(run: Path, marker: str) -> None:
    assert not (run / "stages" / marker).exists()
    assert not list(run.rglob("*.tmp-*")), "a temporary file was left behind"


@simulated
def test_disk_full_while_writing_a_token_shard(ref, monkeypatch):
    cwd = ref / "tok"
    cwd.mkdir()
    args = tokenize_args(ref / "corpus.jsonl")
    with monkeypatch.context() as m:
        full_disk_at(m, ".shard-00001.npz.tmp-*")
        res = zipper(*args, cwd=cwd, ok=False)
    assert_one_line_disk_full(res, "run/tokens/text/shard-00001.npz")
    run = cwd / "run"
    assert_consistent(run, "tokenize.done.json")
    assert not (run / "tokens" / "text" / "shard-00001.npz").exists()
    for shard in run.rglob("shard-*.npz"):  # what was written is complete
        read_shard(shard)
    zipper(*args, cwd=cwd)  # space freed: the rerun completes, reusing the finished shards
    made = ("data", "tokens", "tokenizers")
    assert_same_files(files(ref / "ref" / "run", *made), files(run, *made))


@simulated
def test_disk_full_while_saving_a_checkpoint(ref, monkeypatch):
    cwd = tokenized_copy(ref, "ckpt")
    with monkeypatch.context() as m:
        full_disk_at(m, ".step-00000004.pt.tmp-*")
        res = zipper(*PRETRAIN, cwd=cwd, ok=False)
    assert_one_line_disk_full(res, "run/towers/text/ckpt/step-00000004.pt")
    run = cwd / "run"
    assert_consistent(run, "pretrain-text.done.json")
    ckpt = run / "towers" / "text" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002.json", "step-00000002.pt"]
    warnings = []
    assert latest_checkpoint(ckpt, log=warnings.append)[0] == 2 and not warnings
    zipper(*PRETRAIN, cwd=cwd)
    assert_same_files(files(ref / "ref" / "run", "towers/text"), files(run, "towers/text"))


@simulated
def test_disk_full_while_appending_metrics_leaves_a_cut_line_that_the_rerun_drops(ref, monkeypatch):
    cwd = tokenized_copy(ref, "metrics")
    real_open = builtins.open

    def open_(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if str(file).endswith("metrics.jsonl") and "a" in mode and sum(1 for _ in real_open(file)) == 4:
            f.write('{"step": 5, "lo')  # the disk filled in the middle of the fifth row
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return f

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", open_)
        res = zipper(*PRETRAIN, cwd=cwd, ok=False)
    assert_one_line_disk_full(res, "run/towers/text/metrics.jsonl")
    run = cwd / "run"
    assert_consistent(run, "pretrain-text.done.json")
    assert (run / "towers/text/metrics.jsonl").read_text().endswith('{"step": 5, "lo')
    zipper(*PRETRAIN, cwd=cwd)
    a, b = ref / "ref" / "run", run
    assert_same_files(files(a, "towers/text"), files(b, "towers/text"))
    assert metric_rows(a / "towers/text/metrics.jsonl") == metric_rows(b / "towers/text/metrics.jsonl")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def test_a_really_full_small_filesystem(ref):
    """Where a tmpfs can be mounted (root in a container that allows it): a filesystem with about 2 MB free
    under a pretraining run whose checkpoints are 1.3 MB each."""
    mnt = ref / f"small-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(mnt, "24m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        shutil.copytree(ref / "ref", mnt / "w", ignore=shutil.ignore_patterns("towers", "pretrain-*"))
        st = os.statvfs(mnt)
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - (2 << 20)))
        res = zipper(*PRETRAIN, cwd=mnt / "w", ok=False)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, str(res)
        assert "no space left on device" in res.stderr and "Traceback" not in res.stderr
        run = mnt / "w" / "run"
        assert_consistent(run, "pretrain-text.done.json")
        warnings = []
        latest_checkpoint(run / "towers/text/ckpt", log=warnings.append)
        assert not warnings  # every checkpoint left verifies
        filler.unlink()
        zipper(*PRETRAIN, cwd=mnt / "w")
        assert_same_files(files(ref / "ref" / "run", "towers/text"), files(run, "towers/text"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_second_process_on_a_running_stage_is_refused_others_run_side_by_side(ref):
    cwd = tokenized_copy(ref, "lock")
    other = tokenized_copy(ref, "other")
    first = spawn(*PRETRAIN, cwd=cwd, env={"ZIPPER_TEST_KILL_AT": "step:3", "ZIPPER_TEST_KILL_SIGNAL": "STOP"})
    try:
        first.wait_stopped()  # paused in the middle of training, holding the stage's lock
        second = zipper(*PRETRAIN, cwd=cwd, ok=False)
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, str(second)
        assert second.stderr.startswith(f"error: stage 'pretrain-text' of run is being written by pid {first.pid} "
                                        "(lock run/stages/pretrain-text.lock); wait for it or use another --run-dir")
        # Another stage of the same run, and the same stage of another run, go ahead meanwhile.
        zipper(*pretrain_args("speech"), cwd=cwd)
        zipper(*PRETRAIN, cwd=other)
    finally:
        first.resume()
    res = first.wait()
    assert res.returncode == 0, str(res)
    assert_same_files(files(ref / "ref" / "run", "towers/text"), files(cwd / "run", "towers/text"))
    assert_same_files(files(ref / "ref" / "run", "towers/text"), files(other / "run", "towers/text"))
    assert "already done" in zipper(*PRETRAIN, cwd=cwd).stdout
