"""CTC prefix scores against brute force over every alignment, and against torch's CTC loss."""

import itertools
import math

import torch
import torch.nn.functional as F

from zipper_cli.ctc_prefix import CTCPrefixScorer


def _collapse(path, blank=0):
    out, prev = [], None
    for p in path:
        if p != prev and p != blank:
            out.append(p)
        prev = p
    return tuple(out)


def _brute(x: torch.Tensor):
    """{label sequence: probability} over every alignment of x [T, V]."""
    T, V = x.shape
    p = x.exp().double()
    probs: dict = {}
    for path in itertools.product(range(V), repeat=T):
        pr = math.prod(p[t, k].item() for t, k in enumerate(path))
        key = _collapse(path)
        probs[key] = probs.get(key, 0.0) + pr
    return probs


def _walk(scorer, example, prefix):
    """The scorer's (psi after each label, final) along `prefix`."""
    s = scorer.initial(example)
    psis = []
    for lab in prefix:
        psi = scorer.extend([s], torch.tensor([[lab]]))
        s = scorer.advance([s], [lab], [psi[0, 0].item()])[0]
        psis.append(s.psi)
    return psis, scorer.final(s)


def test_prefix_and_final_scores_match_brute_force():
    torch.manual_seed(0)
    x = torch.randn(5, 3).log_softmax(-1)
    probs = _brute(x)
    scorer = CTCPrefixScorer([x])
    for n in range(1, 4):
        for prefix in itertools.product((1, 2), repeat=n):  # repeated labels included
            psis, final = _walk(scorer, 0, prefix)
            for k in range(1, n + 1):
                want = sum(p for seq, p in probs.items() if seq[:k] == prefix[:k])
                assert math.isclose(math.exp(psis[k - 1]), want, rel_tol=1e-4, abs_tol=1e-12), (prefix, k)
            assert math.isclose(math.exp(final), probs.get(prefix, 0.0), rel_tol=1e-4, abs_tol=1e-12), prefix
    assert math.isclose(math.exp(scorer.final(scorer.initial(0))), probs[()], rel_tol=1e-4)


def test_final_score_equals_ctc_loss_and_padding_changes_nothing():
    torch.manual_seed(1)
    long, short = torch.randn(9, 6).log_softmax(-1), torch.randn(4, 6).log_softmax(-1)
    target = [3, 3, 1]
    alone = CTCPrefixScorer([short])
    padded = CTCPrefixScorer([long, short])  # the short input padded to 9 frames
    (ps_a, fin_a), (ps_p, fin_p) = _walk(alone, 0, target), _walk(padded, 1, target)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ps_a, ps_p))
    assert math.isclose(fin_a, fin_p, rel_tol=1e-5)
    loss = F.ctc_loss(short[:, None], torch.tensor([target]), torch.tensor([4]), torch.tensor([3]), reduction="sum")
    assert math.isclose(fin_a, -loss.item(), rel_tol=1e-5)
    _, fin_long = _walk(padded, 0, target)
    loss = F.ctc_loss(long[:, None], torch.tensor([target]), torch.tensor([9]), torch.tensor([3]), reduction="sum")
    assert math.isclose(fin_long, -loss.item(), rel_tol=1e-5)


def test_extend_scores_many_candidates_and_rows_at_once():
    torch.manual_seed(2)
    xs = [torch.randn(7, 5).log_softmax(-1), torch.randn(6, 5).log_softmax(-1)]
    scorer = CTCPrefixScorer(xs)
    states = [scorer.initial(0), scorer.initial(1)]
    psi = scorer.extend(states, torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]]))
    for i, cands in enumerate(([1, 2, 3, 4], [4, 3, 2, 1])):
        for j, c in enumerate(cands):
            one = scorer.extend([states[i]], torch.tensor([[c]]))
            assert torch.equal(one[0, 0], psi[i, j])
    # one frame: only an empty prefix + one label, from frame 0
    one_frame = CTCPrefixScorer([torch.tensor([[-1.0, -0.5, -2.0]]).log_softmax(-1)])
    psi = one_frame.extend([one_frame.initial(0)], torch.tensor([[1, 2]]))
    assert torch.allclose(psi, one_frame.x[0, 0, 1:][None])
