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

    def extend(self, states: list[CTCState], cands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix scores of every prefix + candidate label.

        states: R prefixes; cands [R, K] labels (never the blank). Returns psi [R, K] (log P(transcript
        starts with prefix + label)) and the extended prefixes' r_n, r_b [R, K, T]."""
        R, K = cands.shape
        ex = torch.tensor([s.example for s in states])
        x = self.x[ex]  # [R, T, V]
        xc = x.gather(2, cands[:, None, :].expand(R, self.T, K)).transpose(1, 2)  # [R, K, T]
        xb = x[:, :, self.blank][:, None, :]  # [R, 1, T]
        r_n = torch.stack([s.r_n for s in states])[:, None, :]  # [R, 1, T]
        r_b = torch.stack([s.r_b for s in states])[:, None, :]
        last = torch.tensor([s.last for s in states])[:, None]  # [R, 1]
        # phi[t]: the prefix is complete by frame t and the label may start at t + 1 (a repeated label
        # needs a blank in between).
        phi = torch.where(cands[:, :, None] == last[:, :, None], r_b, torch.logaddexp(r_n, r_b))  # [R, K, T]
        empty = torch.tensor([s.last < 0 for s in states])[:, None]  # [R, 1]
        new_n = torch.full((R, K, self.T), NEG)
        new_b = torch.full((R, K, self.T), NEG)
        new_n[:, :, 0] = torch.where(empty, xc[:, :, 0], NEG)  # only an empty prefix starts at frame 0
        # log P(starts with prefix + label) = sum over the frame t where the label first appears.
        start = phi[:, :, :-1] + xc[:, :, 1:]  # [R, K, T-1]: the label first emitted at frame t >= 1
        psi = torch.logaddexp(new_n[:, :, 0], start.logsumexp(-1)) if self.T > 1 else new_n[:, :, 0].clone()
        for t in range(1, self.T):
            new_n[:, :, t] = torch.logaddexp(new_n[:, :, t - 1], phi[:, :, t - 1]) + xc[:, :, t]
            new_b[:, :, t] = torch.logaddexp(new_b[:, :, t - 1], new_n[:, :, t - 1]) + xb[:, :, t]
        return psi, new_n, new_b

    @staticmethod
    def state(parent: CTCState, label: int, psi: float, r_n: torch.Tensor, r_b: torch.Tensor) -> CTCState:
        return CTCState(parent.example, r_n, r_b, psi, label)
