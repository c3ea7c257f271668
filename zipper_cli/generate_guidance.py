"""Classifier-free guidance for speech outputs of a Zipper (`zipper decode --guidance G`).

A Zipper has its unconditional model built in: the speech tower alone (without input projections, exactly
what the fused model computes for speech that has nothing to cross-attend; tested in test_fuse). Each
speech token is then chosen from

    (1 + G) * log p(unit | text, units so far) - G * log p(unit | units so far)

which pushes generation towards what the text adds over the tower's own language model (Ho & Salimans'
guidance, as used by LM-based TTS), against fluent units that ignore the text. On the demo it helped
little (G = 1: -1.3 points, not significant; G = 3: worse; README).

GuidedEngine wraps two generate_cache engines behind the same interface: the fused model's, and one over
a private copy of the speech tower (a Tower holds its own KV cache, so the fused engine's tower cannot
serve both) fed only the row's speech tokens.
"""

from __future__ import annotations

import torch


class GuidedEngine:
    def __init__(self, cond, uncond, tower: str, scale: float):
        self.cond, self.uncond, self.tower, self.scale = cond, uncond, tower, scale

    def start(self, B: int, cache_len: dict[str, int]) -> None:
        self.cond.start(B, cache_len)
        self.uncond.start(B, {self.tower: cache_len[self.tower]})
        self.u = None  # [B, V]: the tower alone's log-probs after each row's latest speech token

    def feed(self, items):
        last, logits = self.cond.feed(items)
        mine = [[it for it in row if it[0] == self.tower] for row in items]
        if any(mine):
            u_last, u_logits = self.uncond.feed(mine)
            lp = u_logits[self.tower].float().log_softmax(-1)
            fresh = torch.tensor([x is not None for x in u_last], device=lp.device)[:, None]
            self.u = lp if self.u is None else torch.where(fresh, lp, self.u)
        rows = [i for i, x in enumerate(last) if x == self.tower]
        if rows:
            cond = logits[self.tower].float().log_softmax(-1)
            guided = logits[self.tower].float().clone()
            guided[rows] = ((1 + self.scale) * cond - self.scale * self.u)[rows]
            logits = {**logits, self.tower: guided}
        return last, logits

    def reorder(self, index) -> None:
        self.cond.reorder(index)
        self.uncond.reorder(index)
        if self.u is not None:
            self.u = self.u[torch.as_tensor(index, dtype=torch.long, device=self.u.device)]

    def close(self) -> None:
        self.cond.close()
        self.uncond.close()
