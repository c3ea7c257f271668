"""The run-directory protocol: atomic writes, markers, skip / mismatch / --force, the stage lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from zipper_cli.atomic import atomic_path, write_json
from zipper_cli.errors import ZipperError
from zipper_cli.rundir import diff_keys, init_run_dir, open_stage, read_marker, stage_lock


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_run_json_records_versions(tmp_path):
    init_run_dir(tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    for key in ("zipper", "git", "python", "torch", "created", "invocations"):
        assert key in info


def test_stage_skip_mismatch_and_force(tmp_path):
    run, logs = tmp_path / "run", []
    with open_stage(run, "s", {"a": 1, "b": {"c": 2}}, {"in": "x"}, log=logs.append) as st:
        assert st is not None
        assert read_marker(run, "s") is None  # not finished until finish()
        st.finish({"n": 3})
    assert read_marker(run, "s")["outputs"] == {"n": 3}

    with open_stage(run, "s", {"a": 1, "b": {"c": 2}}, {"in": "x"}, log=logs.append) as st:
        assert st is None
    assert "already done" in logs[-1]

    with pytest.raises(ZipperError) as e:
        with open_stage(run, "s", {"a": 1, "b": {"c": 5}}, {"in": "y"}):
            pass
    msg = str(e.value)
    assert "config.b.c: 2 -> 5" in msg and "inputs.in: 'x' -> 'y'" in msg and "--force" in msg

    with open_stage(run, "s", {"a": 1, "b": {"c": 5}}, {"in": "y"}, force=True) as st:
        assert st is not None and read_marker(run, "s") is None  # forced: unfinished until the new marker
        st.finish()
    assert read_marker(run, "s")["config"]["b"]["c"] == 5


def test_interrupted_stage_leaves_no_marker(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with open_stage(tmp_path, "s", {"a": 1}, {}) as st:
            raise KeyboardInterrupt
    assert read_marker(tmp_path, "s") is None


def test_diff_keys_names_added_and_removed():
    assert diff_keys({"a": 1}, {"b": 2}) == ["a: 1 -> '<unset>'", "b: '<unset>' -> 2"]


def test_second_process_on_same_stage_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from zipper_cli.rundir import stage_lock\n"
        f"with stage_lock(Path({str(tmp_path)!r}), 'tokenize'):\n"
        "    print('locked', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ZipperError, match=rf"stage 'tokenize' of .* is being written by pid {holder.pid}"):
            with stage_lock(tmp_path, "tokenize"):
                pass
        with stage_lock(tmp_path, "pretrain-text"):  # another stage of the same run is free
            pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 5
    while True:  # the kernel releases a killed holder's lock
        try:
            with stage_lock(tmp_path, "tokenize"):
                break
        except ZipperError:
            assert time.time() < deadline
            time.sleep(0.05)


def test_a_field_added_since_a_stage_finished_matches_at_its_default(tmp_path):
    import dataclasses

    from zipper_cli.rundir import config_defaults, config_dict, open_stage

    @dataclasses.dataclass
    class Inner:
        lr: float = 1e-3
        new_mult: float = 1.0  # added in a later version; 1.0 is what earlier versions did

    @dataclasses.dataclass
    class Cfg:
        steps: int
        inner: Inner = dataclasses.field(default_factory=Inner)

    cfg = Cfg(steps=5)
    old = config_dict(cfg)
    del old["inner"]["new_mult"]  # the marker an earlier version wrote
    with open_stage(tmp_path, "s", old, {}, log=lambda *_: None) as stage:
        stage.finish()
    assert config_defaults(cfg) == {"inner": {"lr": 1e-3, "new_mult": 1.0}}
    with open_stage(tmp_path, "s", config_dict(cfg), {}, log=lambda *_: None, defaults=config_defaults(cfg)) as stage:
        assert stage is None  # same work: skipped
    changed = Cfg(steps=5, inner=Inner(new_mult=10.0))
    refused = open_stage(tmp_path, "s", config_dict(changed), {}, log=lambda *_: None, defaults=config_defaults(changed))
    with pytest.raises(ZipperError, match=r"inner.new_mult: '<unset>' -> 10.0"):
        refused.__enter__()  # the refusal comes on entering the stage
