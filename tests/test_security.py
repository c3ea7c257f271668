"""Security: artifacts load without executing code, and nothing is fetched from the network.

Every .pt the toolkit reads goes through torch.load(weights_only=True) (zipper_cli.checkpoint.load_checkpoint,
the vocoder's loader, the SSL/EnCodec checkpoint loader), and every .npy/.npz through np.load(allow_pickle=False).
A crafted pickle whose __reduce__ runs `os.system("touch MARKER")` is put in place of each kind of artifact: it
is refused with one clear line naming the file (or, for a training checkpoint, skipped with a warning naming it
and the previous checkpoint used), and the marker file is never created.

The whole pipeline runs with sockets disabled (any connection attempt is recorded and fails).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import warm_imports, zipper
from conftest import make_small_manifest, write_wav
from zipper_cli.checkpoint import load_checkpoint
from zipper_cli.errors import ZipperError

PACKAGE = Path(__file__).resolve().parent.parent / "zipper_cli"
TRAIN = ["--size", "tiny", "--steps", "2", "--max-tokens", "256", "--eval-every", "2", "--ckpt-every", "1"]
SMALL = ["--max-len-min", "text=4,speech=8", "--max-new-tokens", "6", "--vocoder-steps", "10"]


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def evil_pt(path: Path, marker: Path) -> Path:
    torch.save({"model": Payload(marker), "step": 1}, path)
    return path


def _blocked(log: Path):
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        with open(log, "a") as f:
            f.write(f"pid {os.getpid()} connect {address!r}\n")
        raise OSError(f"network disabled by the test: connect {address!r}")

    def getaddrinfo(host, *a, **kw):
        with open(log, "a") as f:
            f.write(f"pid {os.getpid()} getaddrinfo {host!r}\n")
        raise OSError(f"network disabled by the test: getaddrinfo {host!r}")

    return connect, getaddrinfo


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Every stage of a tiny run, with the network disabled in the CLI processes. Returns (root, attempts log)."""
    warm_imports()
    root = tmp_path_factory.mktemp("offline")
    manifest = make_small_manifest(root)
    attempts = root / "network-attempts.txt"
    connect, getaddrinfo = _blocked(attempts)
    judges = "ctc,pocketsphinx"
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        judges = "ctc"
    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        run = ["--run-dir", "run"]
        for args in (["tokenize", *run, "--corpus", f"manifest:{manifest}", "--units", "16", "--text-vocab", "40"],
                     ["pretrain", *run, "--tower", "text", *TRAIN], ["pretrain", *run, "--tower", "speech", *TRAIN],
                     ["fuse", *run, "--steps", "2", "--max-tokens", "512", "--eval-every", "2", "--ckpt-every", "1"],
                     ["decode", *run, "--outputs", "text", "--tag", "asr", *SMALL],
                     ["decode", *run, "--outputs", "speech", "--tag", "tts", "--limit", "2", *SMALL],
                     ["eval", *run, "--decode", "asr", "--decode", "tts", "--judges", judges, "--judge-steps", "5"]):
            zipper(*args, cwd=root)
    finally:
        mp.undo()
    return root, attempts


def test_the_pipeline_runs_with_the_network_disabled(offline):
    root, attempts = offline
    assert (root / "run" / "stages" / "eval-asr+tts.done.json").exists()
    assert not attempts.exists(), attempts.read_text()


def test_no_network_code_in_the_package():
    """No module of the toolkit imports a network client or a model hub."""
    banned = {"urllib.request", "urllib3", "requests", "http.client", "httpx", "aiohttp", "socket", "ftplib",
              "huggingface_hub", "torch.hub", "wget"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                if getattr(node.value.value, "id", None) == "torch" and node.value.attr == "hub":
                    names = ["torch.hub"]
            found += [f"{path.name}: {n}" for n in names if n in banned]
    assert not found


def test_load_checkpoint_refuses_a_crafted_pickle_in_both_formats(tmp_path):
    marker = tmp_path / "pwned"
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"model": Payload(marker)}, f)
    for path in (evil_pt(tmp_path / "zip.pt", marker), legacy):
        with pytest.raises(ZipperError) as e:
            load_checkpoint(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: not a loadable zipper checkpoint") and "\n" not in msg
        assert not marker.exists()
    # The same payload does run when unpickled without protection: the test would see it.
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def _evil_npy(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, np.array([Payload(marker)], dtype=object), allow_pickle=True)


def _evil_shard(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, ids=np.array([Payload(marker)], dtype=object), text=np.zeros(0, np.int32))


def _evil_ckpt(run: Path, marker: Path) -> None:
    """The newest training checkpoint of an unfinished pretrain is a crafted pickle with a valid checksum record."""
    from zipper_cli.atomic import sha256_file, write_json

    (run / "stages" / "pretrain-text.done.json").unlink()
    ckpt = run / "towers" / "text" / "ckpt"
    newest = sorted(ckpt.glob("step-*.pt"))[-1]
    evil_pt(newest, marker)
    meta = ckpt / f"{newest.stem}.json"
    write_json(meta, json.loads(meta.read_text()) | {"sha256": sha256_file(newest)})


FUSE = ["fuse", "--run-dir", "run", "--tag", "again", "--steps", "2", "--max-tokens", "512", "--eval-every", "2"]

# (artifact, file it replaces, command, what stderr's one line starts with; None: exit 0 with a warning)
ARTIFACTS = [
    ("tower weights", "towers/text/model.pt", FUSE, "error: run/towers/text/model.pt: not a loadable zipper checkpoint"),
    ("fused model weights", "fused/zipper-freeze-text/model.pt",
     ["decode", "--run-dir", "run", "--outputs", "text", "--tag", "x", "--max-new-tokens", "4"],
     "error: --model fused/zipper-freeze-text: run/fused/zipper-freeze-text/model.pt: not a loadable zipper checkpoint"),
    ("unit vocoder weights", "tokenizers/speech/vocoder/vocoder.pt",
     ["decode", "--run-dir", "run", "--outputs", "speech", "--tag", "y", *SMALL[:-2]],
     "error: run/tokenizers/speech/vocoder/vocoder.pt: "),
    ("CTC judge weights", "judges/ctc/model.pt",
     ["eval", "--run-dir", "run", "--decode", "tts", "--judges", "ctc", "--tag", "z", "--no-perplexity"],
     "error: run/judges/ctc/model.pt: not a loadable zipper checkpoint"),
    ("k-means centroids (.npy)", "tokenizers/speech/centroids.npy",
     ["decode", "--run-dir", "run", "--wav", "clip.wav", "--outputs", "text", "--tag", "w"],
     "error: run/tokenizers/speech/centroids.npy: corrupt centroids file"),
    ("token shard (.npz)", "tokens/aligned/shard-00000.npz", FUSE,
     "error: run/tokens/aligned/shard-00000.npz: unreadable token shard"),
    ("newest training checkpoint", "towers/text/ckpt", ["pretrain", "--run-dir", "run", "--tower", "text", *TRAIN], None),
]


@pytest.mark.parametrize("i", range(len(ARTIFACTS)), ids=[a[0] for a in ARTIFACTS])
def test_crafted_pickle_artifact_is_refused_and_never_run(offline, tmp_path, i):
    name, rel, args, message = ARTIFACTS[i]
    root, _ = offline
    cwd = tmp_path / "w"
    shutil.copytree(root, cwd, ignore=shutil.ignore_patterns("audio"))
    (cwd / "audio").symlink_to(root / "audio")
    write_wav(cwd / "clip.wav", 1.0)
    run = cwd / "run"
    marker = tmp_path / "pwned"
    target = run / rel
    if rel.endswith("/ckpt"):
        _evil_ckpt(run, marker)
    elif rel.endswith(".npy"):
        _evil_npy(target, marker)
    elif rel.endswith(".npz"):
        _evil_shard(target, marker)
    else:
        assert target.exists(), f"no {rel} in the finished run"
        evil_pt(target, marker)
    res = zipper(*args, cwd=cwd, ok=False)
    assert not marker.exists(), f"{name}: the payload ran"
    assert "Traceback" not in res.stderr
    if message is None:
        assert res.returncode == 0, str(res)
        newest = sorted((run / "towers/text/ckpt").glob("step-*.json"))[-1].stem
        assert f"warning: run/towers/text/ckpt/{newest}.pt: not a loadable zipper checkpoint" in res.stderr
        assert "using the previous checkpoint" in res.stderr
    else:
        assert res.returncode == 2, str(res)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), res.stderr
