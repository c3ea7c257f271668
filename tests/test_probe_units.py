"""scripts/probe_units.py: the information measures and feature kinds it reports units by."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("probe_units", ROOT / "scripts" / "probe_units.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mutual_information_bounds(probe):
    rng = np.random.default_rng(0)
    chars = rng.integers(0, 8, size=4000)
    # a unit that names the character (here: two units per character) carries all of H(char)
    units = chars * 2 + rng.integers(0, 2, size=chars.size)
    h = probe._entropy(np.bincount(chars))
    assert probe._mutual_info(units, chars) == pytest.approx(h, abs=1e-9)
    # one unit for everything carries nothing
    assert probe._mutual_info(np.zeros_like(chars), chars) == pytest.approx(0.0, abs=1e-12)
    # uniform over 8 symbols: 3 bits
    assert probe._entropy(np.full(8, 5)) == pytest.approx(3.0)
    # independent draws: close to 0 bits, never negative beyond rounding
    noise = probe._mutual_info(rng.integers(0, 8, size=chars.size), chars)
    assert -1e-9 <= noise < 0.05


def test_feature_kinds_stack_four_frames(probe):
    lm = torch.randn(103, 80)  # 103 frames at 100 Hz: 25 whole units, 3 frames left over
    dims = {"mel": 4 * 80, "cep1-19": 4 * 19, "cep0-12": 4 * 13, "cep1-12-cmn": 4 * 12}
    assert set(dims) == set(probe.KINDS)
    for kind, fn in probe.KINDS.items():
        out = fn(lm)
        assert out.shape == (25, dims[kind]), kind
        assert torch.isfinite(out).all(), kind
    # the cepstra come from an orthonormal DCT basis, so no coefficient is scaled over another
    dct = probe._DCT
    assert torch.allclose(dct.t() @ dct, torch.eye(40), atol=1e-5)
