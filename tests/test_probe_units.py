"""scripts/probe_units.py: the information measures and feature kinds it reports units by."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def probe():
    return load_script("probe_units")


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


def test_span_mask_hides_spans_of_valid_frames_only(probe):
    from masked_units import span_mask

    g = torch.Generator().manual_seed(0)
    lengths = [400, 250, 3]
    mask = span_mask(lengths, 400, 0.13, 5, g)
    for row, n in zip(mask, lengths):
        assert not row[n:].any()  # padding is never a target
    frac = mask[0].float().mean().item()
    assert 0.4 < frac < 0.6  # 1 - 0.87^5 = 0.50 of the frames
    # hidden frames come in runs: a lone hidden frame would need a span shorter than 5
    runs = torch.diff(torch.cat([torch.tensor([0]), mask[0].int(), torch.tensor([0])])).nonzero().flatten()
    assert (runs[1::2] - runs[::2]).min() >= 5


def test_masked_encoder_learns_what_only_the_context_tells(probe):
    """Targets that the masked frame itself cannot show (the input is zeroed there) but its neighbours
    do (they repeat the target in 10-frame runs, longer than a masked span): training brings the masked
    loss well under chance, and
    unmasked layer features have the expected shapes."""
    from masked_units import layer_features, train_masked

    g = torch.Generator().manual_seed(0)
    feats, targets = [], []
    for _ in range(40):
        y = torch.randint(0, 6, (6,), generator=g).repeat_interleave(10)  # [60]
        feats.append(torch.nn.functional.one_hot(y, 8).float() + 0.1 * torch.randn(60, 8, generator=g))
        targets.append(y)
    losses = []
    model = train_masked(feats, targets, 6, 300, batch_frames=600, lr=2e-3, d=64, n_layer=2,
                         log=lambda s: losses.append(float(s.split("loss ")[1].split()[0])))
    assert losses[0] > 1.6 and losses[-1] < 1.0  # chance: ln 6 = 1.79
    out = layer_features(model, feats[:3], 2)
    assert [tuple(o.shape) for o in out] == [(60, 64)] * 3
