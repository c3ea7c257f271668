"""Learned speech features without labels: one HuBERT-style iteration, trained on a run's own audio.

A small transformer reads the mel-kmeans tokenizer's 25 Hz features (per-utterance normalised log-mel,
4 frames stacked) with spans of them replaced by a learned mask vector, and predicts the k-means cluster
of every masked frame (HuBERT's first iteration, with log-mel clusters in place of MFCC ones). To predict
a hidden frame it has to use the context, so its inner layers are expected to describe the sound more and
the frame's own acoustics less. scripts/probe_units.py clusters those layers and measures how much the
units say about the characters and about the voice.

Used by probe_units.py (--masked-steps); standalone it only checks that the model trains:
  .venv/bin/python scripts/masked_units.py --run-dir RUN --steps 50
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MaskedEncoder(nn.Module):
    """[B, T, d_in] features -> hidden states of each layer / logits over the k-means targets."""

    def __init__(self, d_in: int, n_targets: int, d: int = 256, n_layer: int = 4, n_head: int = 4,
                 conv_pos: int = 15, dropout: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.mask_emb = nn.Parameter(torch.randn(d) * 0.02)
        # HuBERT's relative positions: a grouped convolution over time, added to the input
        self.pos = nn.Conv1d(d, d, conv_pos, padding=conv_pos // 2, groups=16)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, n_head, 4 * d, dropout=dropout, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_targets)

    def hidden(self, x: torch.Tensor, pad: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x [B, T, d_in], pad bool [B, T] (True = padding), mask bool [B, T] (True = hidden) -> the input
        to the first layer and every layer's output, each [B, T, d]."""
        h = self.inp(x)
        if mask is not None:
            h = torch.where(mask[..., None], self.mask_emb.to(h.dtype), h)
        h = h + F.gelu(self.pos(h.transpose(1, 2))).transpose(1, 2)  # [B, T, d]
        out = [h]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
            out.append(h)
        return out

    def forward(self, x, pad, mask):
        return self.head(self.norm(self.hidden(x, pad, mask)[-1]))  # [B, T, n_targets]


def span_mask(lengths: list[int], T: int, p: float, span: int, g: torch.Generator) -> torch.Tensor:
    """bool [B, T]: each valid frame starts a masked span of `span` frames with probability p (HuBERT:
    p 0.08, span 10 at 50 Hz, about half the frames hidden; here span 5 at 25 Hz and p 0.13)."""
    starts = torch.rand(len(lengths), T, generator=g) < p
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for s in range(span):
        mask[:, s:] |= starts[:, :T - s]
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return mask & valid


def pad_batch(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(f.shape[0] for f in feats)
    x = torch.zeros(len(feats), T, feats[0].shape[1])
    for i, f in enumerate(feats):
        x[i, :len(f)] = f
    pad = torch.arange(T)[None, :] >= torch.tensor([len(f) for f in feats])[:, None]
    return x, pad


def train_masked(feats: list[torch.Tensor], targets: list[torch.Tensor], n_targets: int, steps: int,
                 batch_frames: int = 2048, lr: float = 5e-4, seed: int = 0, log=print, **model_kw) -> MaskedEncoder:
    """Masked prediction of `targets` (long [T_i] per utterance) from `feats` ([T_i, D]) for `steps`
    AdamW steps of about batch_frames frames each (warmup 5%, cosine decay); model_kw go to MaskedEncoder."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MaskedEncoder(feats[0].shape[1], n_targets, **model_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    order = torch.randperm(len(feats), generator=g).tolist()
    pos, t0 = 0, time.time()
    model.train()
    for step in range(steps):
        batch, n = [], 0
        while n < batch_frames:
            if pos == len(order):
                order, pos = torch.randperm(len(feats), generator=g).tolist(), 0
            batch.append(order[pos])
            n += len(feats[order[pos]])
            pos += 1
        x, pad = pad_batch([feats[i] for i in batch])
        y = torch.full(pad.shape, -100, dtype=torch.long)
        for j, i in enumerate(batch):
            y[j, :len(targets[i])] = targets[i]
        mask = span_mask([len(feats[i]) for i in batch], x.shape[1], 0.13, 5, g)
        for group in opt.param_groups:
            group["lr"] = lr * min((step + 1) / warm, 0.5 * (1 + math.cos(math.pi * step / steps)))
        loss = F.cross_entropy(model(x, pad, mask)[mask], y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"masked step {step + 1}/{steps}: loss {loss.item():.3f} "
                f"(masked {mask.float().mean():.2f} of frames, {time.time() - t0:.0f}s)")
    return model.eval()


@torch.no_grad()
def layer_features(model: MaskedEncoder, feats: list[torch.Tensor], layer: int, batch: int = 32) -> list[torch.Tensor]:
    """Layer `layer`'s output (0 = the input projection) for each utterance, nothing masked: [T_i, d] each."""
    out = []
    for s in range(0, len(feats), batch):
        chunk = feats[s:s + batch]
        x, pad = pad_batch(chunk)
        h = model.hidden(x, pad)[layer]
        out += [h[i, :len(f)] for i, f in enumerate(chunk)]
    return out


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from zipper_cli.atomic import read_jsonl
    from zipper_cli.audio import read_audio
    from zipper_cli.kmeans import assign, kmeans
    from zipper_cli.speech_features import log_mel, normalise_and_stack

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--utts", type=int, default=200)
    a = p.parse_args()
    rows = list(read_jsonl(Path(a.run_dir) / "data" / "aligned.jsonl"))[:a.utts]
    feats = [normalise_and_stack(log_mel(read_audio(r["audio"])), 4) for r in rows]
    c = kmeans(torch.cat(feats), 50, seed=0).centroids
    targets = [assign(f, c)[0] for f in feats]
    train_masked(feats, targets, 50, a.steps, batch_frames=1024)


if __name__ == "__main__":
    main()
