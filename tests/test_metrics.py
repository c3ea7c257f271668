"""ASR scoring equals jiwer's after normalisation; the paired tests on fixtures with known answers."""

from __future__ import annotations

import math

import jiwer
import numpy as np
import pytest

from zipper_cli.errors import ZipperError
from zipper_cli.metrics import bootstrap_ratio, length_buckets, paired_bootstrap, score, utterance_errors, wer_by_length, wilcoxon

REFS = ["Set an alarm for 7:30.", "call mom", "the password starts with P Z A", "turn the volume up", "turn it up"]
HYPS = ["set an alarm for seven thirty", "call mum", "the password starts with p z", "", "turn it up now"]


def test_wer_cer_equal_jiwer_on_normalised_text():
    s = score(REFS, HYPS)
    refs = ["set an alarm for seven thirty", "call mom", "the password starts with p z a", "turn the volume up", "turn it up"]
    hyps = ["set an alarm for seven thirty", "call mum", "the password starts with p z", "", "turn it up now"]
    assert s.wer == pytest.approx(jiwer.wer(refs, hyps))
    assert s.cer == pytest.approx(jiwer.cer(refs, hyps))
    assert (s.substitutions, s.deletions, s.insertions, s.ref_words) == (1, 5, 1, 22)
    assert s.wer == pytest.approx(7 / 22)


def test_utterance_alignment_dump():
    rows = utterance_errors(REFS, HYPS)
    assert rows[1]["alignment"] == "call [mom->mum]"
    assert rows[4]["alignment"] == "turn it up [+now]"
    assert rows[2]["alignment"] == "the password starts with p z [-a]"
    assert rows[3]["errors"] == 4 and rows[3]["wer"] == 1.0
    assert rows[0]["errors"] == 0


def test_scoring_errors():
    with pytest.raises(ZipperError, match="as many hypotheses as references"):
        score(["a"], [])
    with pytest.raises(ZipperError, match="reference is empty after normalisation"):
        score(["?!"], ["x"])


def test_wilcoxon_known_answer():
    # Differences 1..5, no ties: W+ = 15, mean 7.5, var 13.75 -> z = 2.0226, normal two-sided p = 0.0431;
    # exactly, only the all-positive signs reach 15: p = 2/32 (scipy.stats.wilcoxon gives both).
    r = wilcoxon([0, 0, 0, 0, 0, 3], [1, 2, 3, 4, 5, 3])
    assert r["n_nonzero"] == 5 and r["statistic"] == 15.0 and r["method"] == "exact"
    assert r["z"] == pytest.approx(7.5 / math.sqrt(13.75))
    assert r["p_normal"] == pytest.approx(0.0431, abs=1e-4)
    assert r["p"] == 2 / 32
    assert wilcoxon([1, 2], [1, 2])["p"] == 1.0


def test_wilcoxon_ties_by_hand():
    # d = 1 2 0 1 2 1 3 0 -1: zeros dropped, |d| 1,1,1,1 share rank 2.5, 2,2 share 5.5, 3 is 7.
    # W+ = 3 * 2.5 + 2 * 5.5 + 7 = 25.5 of 28. Signs reaching W+ >= 25.5: all positive, or one rank-2.5 item
    # negative (4 ways): 5 of 2^7, two-sided p = 10/128. Normal: var = 7*8*15/24 - (4^3-4 + 2^3-2)/48 = 33.625.
    r = wilcoxon([0, 1, 0, 2, 0, 0, 1, 0, 2], [1, 3, 0, 3, 2, 1, 4, 0, 1])
    assert (r["statistic"], r["n_nonzero"]) == (25.5, 7)
    assert r["p"] == 10 / 128
    assert r["z"] == pytest.approx(11.5 / math.sqrt(33.625))
    assert r["p_normal"] == pytest.approx(0.04734500208525525, rel=1e-9)  # scipy, method="approx"


A40 = [3, 2, 2, 3, 2, 3, 3, 0, 0, 1, 1, 3, 3, 0, 1, 3, 0, 3, 0, 1, 3, 1, 1, 1, 2, 1, 3, 1, 1, 2, 2, 2, 2, 3, 3, 3, 2,
       2, 1, 3]
B40 = [4, 1, 4, 1, 4, 4, 2, 0, 0, 0, 0, 3, 6, 0, 3, 6, 2, 4, 0, 1, 2, 1, 0, 1, 4, 0, 1, 0, 3, 4, 4, 1, 3, 2, 4, 1, 3,
       4, 2, 2]


def test_wilcoxon_against_scipy():
    # Values from scipy 1.17.1: wilcoxon(d, method="approx", correction=False) and, for the exact p with ties,
    # wilcoxon(d, method=PermutationMethod(n_resamples=200000)) = 0.1001 (Monte Carlo, +-0.0007).
    r = wilcoxon(A40, B40)
    assert r["n_nonzero"] == 32 and r["method"] == "exact"
    assert r["p_normal"] == pytest.approx(0.09809662195076686, rel=1e-9)
    assert r["p"] == pytest.approx(0.1001, abs=0.002)
    big = wilcoxon(A40 * 2, B40 * 2)  # 64 non-zero differences: the normal approximation
    assert big["method"] == "normal approximation" and big["p"] == big["p_normal"]
    assert big["p"] == pytest.approx(0.018551382115098464, rel=1e-9)
    # the sign of the statistic: W+ counts B's extra errors; swapping the systems mirrors it
    assert wilcoxon(B40, A40)["statistic"] == 32 * 33 / 2 - r["statistic"]
    with pytest.raises(ZipperError, match="same utterances"):
        wilcoxon([1, 2], [1])


def test_paired_bootstrap_known_answers():
    words = [10] * 50
    better = paired_bootstrap([3] * 50, [1] * 50, words, n=2000)
    assert better["p_b_not_better"] == 0.0 and better["delta_wer"] == pytest.approx(-0.2)
    same = paired_bootstrap([2, 0] * 25, [0, 2] * 25, words, n=2000)
    assert same["delta_wer"] == 0.0 and 0.3 < same["p_b_not_better"] < 0.8
    assert same["ci95"][0] < 0 < same["ci95"][1]


def test_paired_bootstrap_two_sided_and_chunking():
    words = [10] * 50
    worse = paired_bootstrap([1] * 50, [3] * 50, words, n=2000)
    assert worse["p_b_not_better"] == 1.0 and worse["p_two_sided"] == 0.0
    a = paired_bootstrap(A40, B40, [5] * 40, n=1000, seed=3, chunk=1000)
    b = paired_bootstrap(A40, B40, [5] * 40, n=1000, seed=3, chunk=1000)
    assert a == b  # seeded
    c = paired_bootstrap(A40, B40, [5] * 40, n=1000, seed=3, chunk=7)
    assert abs(c["p_two_sided"] - a["p_two_sided"]) < 0.1 and c["resamples"] == 1000


def test_bootstrap_ratio_known_answers():
    # B makes exactly twice A's errors on every utterance: every resample's ratio is 2
    double = bootstrap_ratio([1, 2, 0, 3] * 10, [2, 4, 0, 6] * 10, target=1.3, n=2000)
    assert double["ratio"] == 2.0 and double["ci95"] == [2.0, 2.0] and double["share_at_or_under_target"] == 0.0
    assert bootstrap_ratio([1, 2] * 20, [1, 2] * 20, target=1.3, n=500)["share_at_or_under_target"] == 1.0
    # errors moved between utterances: the point ratio is 1.25 but a resample can land on either side of 1.3
    mixed = bootstrap_ratio([2, 2, 0, 0] * 25, [0, 3, 2, 0] * 25, target=1.3, n=4000)
    assert mixed["ratio"] == 1.25 and mixed["ci95"][0] < 1.25 < mixed["ci95"][1]
    assert 0.5 < mixed["share_at_or_under_target"] < 0.9
    assert bootstrap_ratio(A40, B40, 1.3, n=1000, seed=3) == bootstrap_ratio(A40, B40, 1.3, n=1000, seed=3, chunk=7)
    # a resample with no errors under A has no ratio: left out, not a division by zero
    rare = bootstrap_ratio([1] + [0] * 9, [2] * 10, target=1.3, n=1000)
    assert rare["resamples"] < 1000 and np.isfinite(rare["ci95"]).all()
    with pytest.raises(ZipperError, match="no errors"):
        bootstrap_ratio([0, 0], [1, 0], target=1.3)
    with pytest.raises(ZipperError, match="same non-empty set"):
        bootstrap_ratio([1, 2], [1], target=1.3)


def test_normaliser_cases_in_scoring():
    # one normaliser on both sides: case, punctuation, numbers, times, amounts, hyphens, apostrophes
    cases = [("Set an alarm for 7:30.", "set an alarm for seven thirty"),
             ("Call 911!", "call nine hundred eleven"),
             ("the 2nd floor", "The second floor."),
             ("It's twenty-one, OK?", "it's twenty one ok"),
             ("Pay $5 now", "pay five dollars now")]
    for ref, hyp in cases:
        s = score([ref], [hyp])
        assert s.wer == 0.0 and s.cer == 0.0, (ref, hyp, utterance_errors([ref], [hyp])[0]["alignment"])
    assert score(["It's done"], ["its done"]).wer == 0.5  # the apostrophe inside a word is kept
    assert score(["Hello, World"], ["HELLO WORLD!!"]).wer == 0.0


def test_length_buckets_and_wer_by_length():
    assert length_buckets([3, 3, 4, 7]) == [(3, 3), (4, 4), (7, 7)]
    assert length_buckets([]) == []
    many = list(range(1, 41))
    b = length_buckets(many, max_buckets=4)
    assert b == [(1, 10), (11, 20), (21, 30), (31, 40)]
    skewed = length_buckets([2] * 30 + list(range(3, 20)), max_buckets=4)
    assert skewed[0] == (2, 2) and skewed[-1][1] == 19  # a length is never split; all lengths covered
    assert all(lo <= hi for lo, hi in skewed) and all(skewed[i][1] < skewed[i + 1][0] for i in range(len(skewed) - 1))
    rows = wer_by_length([1, 0, 2, 4], [2, 2, 4, 10], [(1, 2), (3, 5), (6, 9), (10, 12)])
    assert [(r["lo"], r["utterances"], r["wer"]) for r in rows] == [(1, 2, 0.25), (3, 1, 0.5), (10, 1, 0.4)]
