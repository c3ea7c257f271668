"""CTC forced alignment (Viterbi): which transcript label each frame belongs to.

Used by `zipper fuse --clock-align-weight`: the fused model's own CTC head, on ASR examples (where the
speech has seen no text, so its posteriors are acoustic evidence only), aligns the transcript to the
speech, and the learned clock is taught to place each speech token at the text position it is saying.

Standard CTC topology over the extended label sequence [blank, l1, blank, l2, ..., lL, blank]: a path stays
in its state, moves to the next one, or skips a blank between two different labels; it starts in one of the
first two states and ends in one of the last two. Batched over examples, frames in a Python loop (the
fusion's sequences are short).
"""

from __future__ import annotations

import torch

NEG = -1e30


def ctc_viterbi(log_probs: torch.Tensor, lengths: torch.Tensor, labels: list[torch.Tensor],
                blank: int = 0) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """log_probs [B, T, V] (log-softmax over V), lengths [B] (valid frames), labels: B 1-D label tensors
    (no blanks) -> (per example, [lengths[b]] int64: the index in labels[b] of the last label emitted at
    or before each frame, -1 before the first; None where no path exists (more labels, counting repeats'
    blanks, than frames); the best path's log-probability [B], -inf where None)."""
    B, T, _ = log_probs.shape
    L = max((len(x) for x in labels), default=0)
    S = 2 * L + 1
    dev = log_probs.device
    ext = torch.full((B, S), blank, dtype=torch.long, device=dev)  # [B, S] extended label sequences
    n_states = torch.tensor([2 * len(x) + 1 for x in labels], device=dev)
    for b, x in enumerate(labels):
        ext[b, 1: 2 * len(x): 2] = x.to(dev)
    # A skip from s-2 to s is allowed onto a label that differs from the label two states back.
    skip = torch.zeros((B, S), dtype=torch.bool, device=dev)
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    emit = log_probs.float().gather(2, ext[:, None, :].expand(B, T, S))  # [B, T, S]
    alpha = torch.full((B, S), NEG, device=dev)
    alpha[:, 0] = emit[:, 0, 0]
    alpha[:, 1] = torch.where(n_states > 1, emit[:, 0, 1], torch.full_like(emit[:, 0, 1], NEG))
    back = torch.zeros((T, B, S), dtype=torch.int8, device=dev)  # 0 stay, 1 from s-1, 2 from s-2
    for t in range(1, T):
        prev1 = torch.cat([torch.full((B, 1), NEG, device=dev), alpha[:, :-1]], 1)
        prev2 = torch.cat([torch.full((B, 2), NEG, device=dev), alpha[:, :-2]], 1)
        prev2 = torch.where(skip, prev2, torch.full_like(prev2, NEG))
        best, arg = torch.stack([alpha, prev1, prev2]).max(0)  # [B, S]
        live = (t < lengths)[:, None]  # past an example's length its states stay frozen
        alpha = torch.where(live, best + emit[:, t], alpha)
        back[t] = torch.where(live, arg.to(torch.int8), torch.zeros_like(back[t]))
    out, scores = [], torch.full((B,), float("-inf"))
    back = back.cpu().numpy()  # the backtrack reads one entry per frame: numpy, not a tensor index each
    for b in range(B):
        n, Tb = int(n_states[b]), int(lengths[b])
        last = [n - 1] + ([n - 2] if n > 1 else [])
        s = max(last, key=lambda k: float(alpha[b, k]))
        if Tb == 0 or float(alpha[b, s]) <= NEG / 2:
            out.append(None)
            continue
        scores[b] = float(alpha[b, s])
        states = [0] * Tb
        for t in range(Tb - 1, -1, -1):
            states[t] = s
            s -= int(back[t, b, s])
        path = torch.tensor(states, dtype=torch.long)
        # state s holds label (s - 1) // 2 when odd; a blank state 2k follows label k - 1
        out.append(torch.where(path % 2 == 1, (path - 1) // 2, path // 2 - 1))
    return out, scores
