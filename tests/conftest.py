"""Shared fixtures: audio and corpora the tests make themselves (nothing is downloaded)."""

from __future__ import annotations

import os

# Tiny test models gain nothing from a second thread, and two OpenMP threads contending with any other
# busy process are several times slower than one: pin the suite (and the CLIs it starts) to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


def load_script(name: str):
    """scripts/NAME.py imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def speechlike(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like signal: a few gliding harmonics under a syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 100 + 60 * rng.random() + 20 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(rng.uniform(0.2, 1) / h * np.sin(h * phase) for h in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) ** 2
    wav = wav * envelope + 0.01 * rng.standard_normal(t.size)
    return (0.3 * wav / np.abs(wav).max()).astype(np.float32)


def write_wav(path: Path, seconds: float = 1.0, sr: int = 16000, seed: int = 0, subtype: str = "PCM_16",
              channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = speechlike(seconds, sr, seed)
    if channels > 1:
        wav = np.stack([wav] * channels, axis=1)
    sf.write(path, wav, sr, subtype=subtype)
    return path


@pytest.fixture
def small_manifest(tmp_path: Path) -> Path:
    return make_small_manifest(tmp_path)


def make_small_manifest(tmp_path: Path) -> Path:
    """A good manifest corpus: 12 speech, 10 aligned, 4 dev, 4 test utterances and 40 text lines."""
    audio = tmp_path / "audio"
    words = "zero one two three four five six seven eight nine".split()
    rows = []
    rng = np.random.default_rng(0)
    for role, n in (("speech", 12), ("aligned", 10), ("dev", 4), ("test", 4)):
        for i in range(n):
            uid = f"{role}-{i:03d}"
            write_wav(audio / f"{uid}.wav", seconds=0.8 + 0.1 * (i % 5), seed=hash(uid) % 1000)
            text = "dial " + " ".join(rng.choice(words, size=3 + i % 4)) + f" please {i}"
            rows.append({"id": uid, "role": role, "audio": f"audio/{uid}.wav", "text": None if role == "speech" else text,
                         "speaker": "bob" if i % 3 else "ann"})
    for i in range(40):
        rows.append({"id": f"text-{i:03d}", "role": "text", "text": "dial " + " ".join(rng.choice(words, size=5)) + f" please {i}"})
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pytest_collection_modifyitems(items):
    """CUDA tests last: once a process has used CUDA, cli_runner can no longer fork it (see spawn)."""
    items.sort(key=lambda item: item.path.name == "test_cuda.py")  # stable: the rest keep their order
