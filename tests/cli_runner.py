"""Run the `zipper` CLI in a child process, optionally SIGKILLed at a named point, for the reliability tests.

`zipper(args, cwd, kill_at=...)` forks this (already warm) interpreter and runs `zipper_cli.cli.main()`
with `sys.argv = ["zipper", *args]` in the child: the same entry point and the same code as the installed
command, without paying the torch import for each of the many runs these tests make. `kill_at` sets
ZIPPER_TEST_KILL_AT in the child (see zipper_cli.atomic.kill_point): the child SIGKILLs itself at that
point, exactly as `kill -9` would. `subprocess=True` runs a real `python -m zipper_cli.cli` instead.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path


def in_process_patches_reach_the_child() -> bool:
    """A monkeypatch made in the test process reaches the CLI only through fork: on a GPU machine spawn
    starts a real process instead, which sees none of it."""
    import torch

    return not torch.cuda.is_available()


def warm_imports() -> None:
    """Import what the stages import, once, in the parent: forked children then start instantly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import zipper_cli.cli  # noqa: F401
    import zipper_cli.ctc_judge  # noqa: F401
    import zipper_cli.stages.decode  # noqa: F401
    import zipper_cli.stages.evaluate  # noqa: F401
    import zipper_cli.stages.fuse  # noqa: F401
    import zipper_cli.stages.pretrain  # noqa: F401
    import zipper_cli.stages.tokenize  # noqa: F401
    import zipper_cli.vocoder  # noqa: F401


@dataclass
class Result:
    args: list
    returncode: int  # the exit status, or -SIGNAL when killed by a signal (as subprocess reports it)
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def __str__(self) -> str:
        return f"zipper {' '.join(map(str, self.args))} -> {self.returncode}\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"


def zipper(*args, cwd: Path, kill_at: str | None = None, env: dict | None = None, subprocess_: bool = False,
           ok: bool | None = None, timeout: float = 600) -> Result:
    """Run `zipper ARGS` in `cwd`. ok=True asserts success; the default asserts success unless kill_at is given."""
    args = [str(a) for a in args]
    child_env = dict(env or {})
    if kill_at:
        child_env["ZIPPER_TEST_KILL_AT"] = kill_at
    cwd = Path(cwd)
    if subprocess_:
        res = subprocess.run([sys.executable, "-m", "zipper_cli.cli", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1"} | child_env)
        result = Result(args, res.returncode, res.stdout, res.stderr)
    else:
        result = _forked(args, cwd, child_env)
    if ok is None:
        ok = kill_at is None
    if ok:
        assert result.returncode == 0, str(result)
    return result


class Child:
    """A forked `zipper` run in progress (see spawn)."""

    def __init__(self, pid: int, args: list, out: Path, err: Path):
        self.pid, self.args, self.out, self.err = pid, args, out, err

    def wait_stopped(self) -> None:
        """Wait until the child paused itself (ZIPPER_TEST_KILL_SIGNAL=STOP) at its kill point."""
        _, status = os.waitpid(self.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"zipper {self.args} ended instead of pausing: {self.result(status)}"

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def wait(self) -> Result:
        _, status = os.waitpid(self.pid, 0)
        return self.result(status)

    def result(self, status: int) -> Result:
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        result = Result(self.args, code, self.out.read_text(errors="replace"), self.err.read_text(errors="replace"))
        self.out.unlink()
        self.err.unlink()
        self.out.parent.rmdir()
        return result


def spawn(*args, cwd: Path, env: dict | None = None) -> Child:
    """Start `zipper ARGS` in a forked child and return without waiting."""
    args = [str(a) for a in args]
    cwd = Path(cwd)
    import torch

    # fork() copies only the calling thread: a child of a process whose OpenMP pool has workers hangs in
    # its first parallel torch op (seen: torchaudio's window in tokenize). The suite pins one thread
    # (conftest); a module that raises it at import would break every forked run, so say so here.
    assert torch.get_num_threads() == 1, (f"cli_runner forks: torch has {torch.get_num_threads()} threads in the "
                                          "test process; keep OMP_NUM_THREADS=1 (conftest) and no set_num_threads(>1)")
    out_dir = Path(tempfile.mkdtemp(prefix="zipper-cli-"))  # not under cwd: that may be a full disk
    out, err = out_dir / "stdout", out_dir / "stderr"
    if torch.cuda.is_available():
        # A forked child cannot use CUDA once this process has even counted the devices (torch refuses): on
        # a GPU machine the child is a real process instead (same entry point, slower to start).
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen([sys.executable, "-m", "zipper_cli.cli", *args], cwd=cwd, stdout=fo, stderr=fe,
                                    env=os.environ | (env or {}))
        child = Child(proc.pid, args, out, err)
        child.proc = proc  # kept alive: subprocess would otherwise reap the pid itself, before Child.wait
        return child
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.chdir(cwd)
            os.environ.update(env or {})
            fo, fe = open(out, "w", buffering=1), open(err, "w", buffering=1)
            os.dup2(fo.fileno(), 1)
            os.dup2(fe.fileno(), 2)
            sys.stdout, sys.stderr = fo, fe
            sys.argv = ["zipper", *args]
            from zipper_cli.cli import main

            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return Child(pid, args, out, err)


def _forked(args: list[str], cwd: Path, env: dict) -> Result:
    return spawn(*args, cwd=cwd, env=env).wait()


# ---------------------------------------------------------------------------------------------- comparing runs

TIMING = ("seconds", "per_s", "elapsed", "wall", "finished")


def files(run: Path, *subdirs: str, skip=("metrics.jsonl", "loss.png", "gates.png", "wer_by_length.png")) -> dict:
    out = {}
    for sub in subdirs:
        base = run / sub
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in paths:
            if p.name not in skip and ".lock" not in p.name:
                out[str(p.relative_to(run))] = p.read_bytes()
    assert out, f"nothing under {subdirs} in {run}"
    return out


def assert_same_files(a: dict, b: dict) -> None:
    """Same files with the same bytes, except: .pt files hold the same tensors bitwise (torch.save's bytes
    also depend on pickle memo order, which a resumed optimizer changes), a checkpoint's record holds
    the same step and dev loss (its sha256 is of those bytes), and JSON records may differ in wall-clock
    times and versions (git revision) only."""
    assert sorted(a) == sorted(b)
    differ = []
    for k in a:
        if a[k] == b[k]:
            continue
        if k.endswith(".pt"):
            same = same_state(_load(a[k]), _load(b[k]))
        elif "/ckpt/step-" in k and k.endswith(".json"):
            same = ({**json.loads(a[k]), "sha256": None} == {**json.loads(b[k]), "sha256": None})
        elif k.endswith(".json"):  # a record of how long it took may differ, nothing else
            same = untimed(json.loads(a[k])) == untimed(json.loads(b[k]))
        else:
            same = False
        if not same:
            differ.append(k)
    assert not differ, f"differ from the uninterrupted run: {differ}"


def _load(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def same_state(x, y) -> bool:
    if isinstance(x, dict):
        return isinstance(y, dict) and list(x) == list(y) and all(same_state(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(same_state(i, j) for i, j in zip(x, y))
    import torch

    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, float) and math.isnan(x):
        return isinstance(y, float) and math.isnan(y)
    return x == y


def untimed(obj):
    """A marker or summary without its wall-clock fields."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if not any(t in k for t in TIMING) and k != "versions"}
    return obj


def assert_same_marker(a: Path, b: Path, name: str) -> None:
    ma, mb = (json.loads((r / "stages" / name).read_text()) for r in (a, b))
    assert untimed(ma) == untimed(mb)


def metric_rows(path: Path) -> list[dict]:
    keep = ("step", "loss", "lr", "grad_norm", "tokens", "dev_loss", "dev_ppl")
    return [{k: v for k, v in json.loads(x).items() if k in keep or k.startswith(("dev_", "gate/"))}
            for x in path.read_text().splitlines()]
