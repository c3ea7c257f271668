"""scripts/measure_vocoder.py --mix: the envelope / fine-structure split and the unit-rate average it judges."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def mv():
    return load_script("measure_vocoder")


def test_envelope_keeps_everything_with_all_cepstra(mv):
    x = torch.randn(7, 80)
    torch.testing.assert_close(mv.envelope(x, 80), x, atol=1e-5, rtol=0)


def test_envelope_is_a_projection(mv):
    x = torch.randn(5, 80)
    e = mv.envelope(x, 20)
    torch.testing.assert_close(mv.envelope(e, 20), e, atol=1e-5, rtol=0)
    # the fine structure has no envelope left
    torch.testing.assert_close(mv.envelope(x - e, 20), torch.zeros_like(x), atol=1e-5, rtol=0)


def test_envelope_keeps_a_smooth_spectrum_and_drops_a_fast_ripple(mv):
    bins = torch.arange(80, dtype=torch.float32)
    smooth = 3.0 - 0.05 * bins + torch.cos(math.pi * (bins + 0.5) * 3 / 80)  # tilt + a slow formant-like wave
    ripple = 0.7 * torch.cos(math.pi * (bins + 0.5) * 40 / 80)  # harmonic-like: cepstral index 40
    x = (smooth + ripple).expand(4, 80)
    e = mv.envelope(x, 20)
    # the tilt's DCT has a small tail past 20 coefficients; the ripple is gone entirely
    assert (e - smooth).abs().max() < 0.1
    assert (x - e - ripple).abs().max() < 0.1


def test_unit_average_replaces_each_unit_by_its_mean_and_keeps_the_tail(mv):
    x = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    y = mv.unit_average(x, 4)
    torch.testing.assert_close(y[:4], x[:4].mean(0, keepdim=True).expand(4, 3))
    torch.testing.assert_close(y[4:8], x[4:8].mean(0, keepdim=True).expand(4, 3))
    torch.testing.assert_close(y[8:], x[8:])


def test_unit_interpolate_passes_through_the_means_at_the_centres(mv):
    x = torch.tensor([[0.0], [0.0], [2.0], [2.0], [4.0], [4.0], [9.0]])  # run means 0, 2, 4 at frames 0.5, 2.5, 4.5
    y = mv.unit_interpolate(x, 2)
    torch.testing.assert_close(y[:, 0], torch.tensor([0.0, 0.5, 1.5, 2.5, 3.5, 4.0, 9.0]))
    ramp = torch.arange(12, dtype=torch.float32)[:, None]  # a linear trajectory survives inside the first and last run
    torch.testing.assert_close(mv.unit_interpolate(ramp, 4)[2:10], ramp[2:10])


def test_mix_conditions_cut_to_the_shorter_and_swap_envelopes(mv):
    true = [torch.randn(12, 80)]
    pred = [torch.randn(9, 80)]
    mix = mv.mix_conditions(pred, true, cepstra=20)
    assert {k: v[0].shape for k, v in mix.items()} == {k: (9, 80) for k in mix}
    torch.testing.assert_close(mix["gl_true"][0], true[0][:9])
    torch.testing.assert_close(mix["true_average_25hz"][0][:4], true[0][:4].mean(0, keepdim=True).expand(4, 80))
    torch.testing.assert_close(mix["true_average_50hz"][0][2:4], true[0][2:4].mean(0, keepdim=True).expand(2, 80))
    swapped = mix["pred_envelope+true_fine"][0] + mix["true_envelope+pred_fine"][0]
    torch.testing.assert_close(swapped, pred[0] + true[0][:9], atol=1e-5, rtol=0)
    # with the prediction equal to the truth every condition but the averages is the truth
    same = mv.mix_conditions(true, true, cepstra=20)
    torch.testing.assert_close(same["pred_envelope+true_fine"][0], true[0], atol=1e-5, rtol=0)


def test_ratio_spread_counts_word_errors_and_skips_empty_references(mv):
    refs = ["one two three four", "...", "five six seven eight"] * 10  # "..." normalises to nothing
    original = ["one two three four", "x", "five six seven nine"] * 10  # 1 error per 8 words
    vocoder = ["one two three", "y", "five six eight eight"] * 10  # 2 errors per 8 words
    spread = mv.ratio_spread(refs, original, vocoder, target=1.3)
    assert spread["ratio"] == 2.0 and spread["share_at_or_under_target"] < 0.05
    assert spread["ci95"][0] < 2.0 < spread["ci95"][1]  # the errors sit in different utterances
    assert mv.ratio_spread(refs, refs, vocoder, target=1.3) is None  # no errors on the original: no ratio
    assert mv.ratio_spread(["..."], ["a"], ["b"], target=1.3) is None
