"""Run the `zipper` CLI in a child process, optionally SIGKILLed at a named point, for the reliability tests.

`zipper(args, cwd, kill_at=...)` forks this (already warm) interpreter and runs `zipper_cli.cli.main()`
with `sys.argv = ["zipper", *args]` in the child: the same entry point and the same code as the installed
command, without paying the torch import for each of the many runs these tests make. `kill_at` sets
ZIPPER_TEST_KILL_AT in the child (see zipper_cli.atomic.kill_point): the child SIGKILLs itself at that
point, exactly as `kill -9` would. `subprocess=True` runs a real `python -m zipper_cli.cli` instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


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


_seq = [0]


def _forked(args: list[str], cwd: Path, env: dict) -> Result:
    _seq[0] += 1
    out_dir = cwd / f".cli-out-{os.getpid()}-{_seq[0]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    out, err = out_dir / "stdout", out_dir / "stderr"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.chdir(cwd)
            os.environ.update(env)
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
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    result = Result(args, code, out.read_text(errors="replace"), err.read_text(errors="replace"))
    out.unlink()
    err.unlink()
    out_dir.rmdir()
    return result
