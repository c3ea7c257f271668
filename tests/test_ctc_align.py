"""CTC forced alignment: the Viterbi path agrees with torchaudio's forced_align, batched equals one by
one, and impossible alignments are reported, not invented."""

from __future__ import annotations

import torch
import torchaudio

from zipper_cli.ctc_align import ctc_viterbi


def _label_index(path: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torchaudio's per-frame tokens -> index of the last label emitted at or before each frame."""
    out, k, prev = [], -1, 0
    for tok in path.tolist():
        if tok != 0 and (tok != prev or prev == 0):
            k += 1
        out.append(k)
        prev = tok
    return torch.tensor(out)


def test_viterbi_matches_torchaudio_and_batching():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([12, 9, 15, 7])
    labels = [torch.tensor([3, 3, 1, 4]), torch.tensor([2, 5]), torch.tensor([1, 2, 2, 2, 3]), torch.tensor([4])]
    lp = torch.randn(4, 15, 6, generator=g).mul(3).log_softmax(-1)
    ali, scores = ctc_viterbi(lp, lengths, labels)
    for b in range(4):
        T = int(lengths[b])
        ref, ref_scores = torchaudio.functional.forced_align(lp[b: b + 1, :T], labels[b][None].int(), blank=0)
        assert torch.equal(ali[b], _label_index(ref[0], labels[b]))
        assert abs(float(scores[b]) - float(ref_scores[0].sum())) < 1e-4
        one, _ = ctc_viterbi(lp[b: b + 1, :T], lengths[b: b + 1], labels[b: b + 1])
        assert torch.equal(one[0], ali[b])
        assert ali[b][-1] == len(labels[b]) - 1 and (ali[b].diff() >= 0).all() and (ali[b].diff() <= 1).all()


def test_peaked_posteriors_give_their_segmentation_and_impossible_ones_none():
    # frames: blank, a, a, blank, b, b, blank -> labels a b: indices -1 0 0 0 1 1 1
    frames = [0, 1, 1, 0, 2, 2, 0]
    lp = torch.full((1, 7, 3), -10.0)
    lp[0, torch.arange(7), torch.tensor(frames)] = 0.0
    ali, _ = ctc_viterbi(lp.log_softmax(-1), torch.tensor([7]), [torch.tensor([1, 2])])
    assert ali[0].tolist() == [-1, 0, 0, 0, 1, 1, 1]
    # a a needs a blank between the repeats: 3 frames at least, so 2 frames cannot hold it
    ali, scores = ctc_viterbi(lp[:, :2].log_softmax(-1), torch.tensor([2]), [torch.tensor([1, 1])])
    assert ali == [None] and scores[0] == float("-inf")
