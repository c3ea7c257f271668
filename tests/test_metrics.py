"""ASR scoring equals jiwer's after normalisation; the paired tests on fixtures with known answers."""

from __future__ import annotations

import math

import jiwer
import pytest

from zipper_cli.errors import ZipperError
from zipper_cli.metrics import paired_bootstrap, score, utterance_errors, wilcoxon

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
    # Differences 1..5, no ties: W+ = 15, mean 7.5, var 13.75 -> z = 2.0226, two-sided p = 0.0431
    # (scipy.stats.wilcoxon(d, correction=False, method="approx") gives the same).
    r = wilcoxon([0, 0, 0, 0, 0, 3], [1, 2, 3, 4, 5, 3])
    assert r["n_nonzero"] == 5 and r["statistic"] == 15.0
    assert r["z"] == pytest.approx(7.5 / math.sqrt(13.75))
    assert r["p"] == pytest.approx(0.0431, abs=1e-4)
    assert wilcoxon([1, 2], [1, 2])["p"] == 1.0


def test_paired_bootstrap_known_answers():
    words = [10] * 50
    better = paired_bootstrap([3] * 50, [1] * 50, words, n=2000)
    assert better["p_b_not_better"] == 0.0 and better["delta_wer"] == pytest.approx(-0.2)
    same = paired_bootstrap([2, 0] * 25, [0, 2] * 25, words, n=2000)
    assert same["delta_wer"] == 0.0 and 0.3 < same["p_b_not_better"] < 0.8
    assert same["ci95"][0] < 0 < same["ci95"][1]
