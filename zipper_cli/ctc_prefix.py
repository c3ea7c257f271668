"""CTC prefix scores for joint CTC/attention decoding (Watanabe et al., 2017; ESPnet's --ctc-weight).

A Zipper fused with --ctc-weight has a CTC head on its speech tower. At ASR decode time each hypothesis
is scored by (1 - w) * log p_att(token | prefix) + w * (log p_ctc(prefix + token ...) - log p_ctc(prefix ...)),
where p_ctc(g ...) is the probability, under the CTC posteriors of the input speech, that the transcript
starts with g (the prefix probability), and for the end token the probability that it is exactly g.
The CTC term vetoes hypotheses the audio does not support: an attention decoder that leans on its text
LM and drifts away from the audio (the failure mode of a briefly fused model) gets pulled back.

State of a prefix g over T frames (log domain): r_n[t] / r_b[t], the probability that frames 0..t emit
exactly g and end in a non-blank / a blank frame, plus psi = log p_ctc(g ...). Frames past an input's
length are padding: blank with log-prob 0, every label impossible, so they carry the totals unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = -1e30


@dataclass(frozen=True)
class CTCState:
    """One prefix's CTC state for one example."""

    example: int  # row of the scorer's posteriors
    r_n: torch.Tensor  # [T] log P(frames 0..t give the prefix, frame t non-blank)
    r_b: torch.Tensor  # [T] log P(frames 0..t give the prefix, frame t blank)
    psi: float  # log P(transcript starts with the prefix)
    last: int  # last label of the prefix, -1 when empty


class CTCPrefixScorer:
    """CTC posteriors of a batch of inputs and the prefix-score recursion over them."""

    def __init__(self, log_probs: list[torch.Tensor], blank: int = 0):
        """log_probs: per example, [T_i, V] log-softmax CTC outputs (T_i >= 1)."""
        T = max(x.shape[0] for x in log_probs)
        V = log_probs[0].shape[1]
        x = torch.full((len(log_probs), T, V), NEG, dtype=torch.float32)
        x[:, :, blank] = 0.0  # padding frames: certain blank
        for i, lp in enumerate(log_probs):
            x[i, : lp.shape[0]] = lp.float()
        self.x, self.blank, self.T = x, blank, T  # x: [B, T, V]

    def initial(self, example: int) -> CTCState:
        r_b = self.x[example, :, self.blank].cumsum(0)
        return CTCState(example, torch.full_like(r_b, NEG), r_b, 0.0, -1)

    def final(self, state: CTCState) -> float:
        """log P(the transcript is exactly the prefix)."""
        return torch.logaddexp(state.r_n[-1], state.r_b[-1]).item()

    def _prefix_ends(self, states: list[CTCState], labels: torch.Tensor) -> torch.Tensor:
        """phi [R, K, T] for labels [R, K]: log P(frames 0..t give the prefix and the label may start at
        t + 1); a label equal to the prefix's last one needs a blank in between."""
        r_n = torch.stack([s.r_n for s in states])[:, None, :]  # [R, 1, T]
        r_b = torch.stack([s.r_b for s in states])[:, None, :]
        last = torch.tensor([s.last for s in states])[:, None, None]  # [R, 1, 1]
        return torch.where(labels[:, :, None] == last, r_b, torch.logaddexp(r_n, r_b))

    def _label_frames(self, states: list[CTCState], labels: torch.Tensor) -> torch.Tensor:
        """[R, K, T] log-probs of labels [R, K] at every frame of each state's example."""
        R, K = labels.shape
        x = self.x[torch.tensor([s.example for s in states])]  # [R, T, V]
        return x.gather(2, labels[:, None, :].expand(R, self.T, K)).transpose(1, 2)

    def extend(self, states: list[CTCState], cands: torch.Tensor) -> torch.Tensor:
        """Prefix scores of every prefix + candidate label: states R prefixes, cands [R, K] labels (never the
        blank) -> psi [R, K], log P(transcript starts with prefix + label). No recursion over frames:
        psi sums over the frame where the label first appears."""
        phi = self._prefix_ends(states, cands)  # [R, K, T]
        xc = self._label_frames(states, cands)  # [R, K, T]
        empty = torch.tensor([s.last < 0 for s in states])[:, None]  # [R, 1]
        first = torch.where(empty, xc[:, :, 0], NEG)  # only an empty prefix's label may start at frame 0
        if self.T == 1:
            return first
        return torch.logaddexp(first, (phi[:, :, :-1] + xc[:, :, 1:]).logsumexp(-1))

    def advance(self, parents: list[CTCState], labels: list[int], psis: list[float]) -> list[CTCState]:
        """The states of the chosen extensions parents[m] + labels[m] (psis[m]: their extend() scores), by
        the recursion over frames, batched over the M children."""
        lab = torch.tensor(labels)[:, None]  # [M, 1]
        phi = self._prefix_ends(parents, lab)[:, 0]  # [M, T]
        xc = self._label_frames(parents, lab)[:, 0]  # [M, T]
        xb = self.x[torch.tensor([p.example for p in parents]), :, self.blank]  # [M, T]
        new_n = torch.full_like(xc, NEG)
        new_b = torch.full_like(xc, NEG)
        new_n[:, 0] = torch.where(torch.tensor([p.last < 0 for p in parents]), xc[:, 0], NEG)
        for t in range(1, self.T):
            new_n[:, t] = torch.logaddexp(new_n[:, t - 1], phi[:, t - 1]) + xc[:, t]
            new_b[:, t] = torch.logaddexp(new_b[:, t - 1], new_n[:, t - 1]) + xb[:, t]
        return [CTCState(p.example, new_n[m], new_b[m], psis[m], labels[m]) for m, p in enumerate(parents)]
