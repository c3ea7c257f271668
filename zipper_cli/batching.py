"""Length-bucketed batches under a token budget, deterministic per (seed, epoch) for exact resume.

Each epoch: sequences are shuffled with a generator seeded by (seed, epoch), sorted by length inside
chunks of `bucket_chunk` sequences (similar lengths share a batch, so little padding), cut into batches
whose padded size stays within `max_tokens`, and the batches are shuffled. The position in training is
then just (epoch, batch index), which a checkpoint stores.
"""

from __future__ import annotations

import numpy as np
import torch


def make_batches(lengths: list[int], max_tokens: int, seed: int, epoch: int, bucket_chunk: int = 4096,
                 shuffle: bool = True, groups: list[int] | None = None) -> list[list[int]]:
    """Index lists, each a batch whose len(batch) * max length <= max_tokens (a longer single sequence
    gets a batch of its own). With `groups`, a batch never mixes groups (e.g. ASR and TTS examples)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    key = (lambda i: lengths[i]) if groups is None else (lambda i: (groups[i], lengths[i]))
    batches = []
    for start in range(0, len(order), bucket_chunk):
        chunk = sorted(order[start:start + bucket_chunk], key=key)
        batch, longest = [], 0
        for i in chunk:
            longest_if = max(longest, lengths[i])
            new_group = groups is not None and batch and groups[batch[-1]] != groups[i]
            if batch and (new_group or longest_if * (len(batch) + 1) > max_tokens):
                batches.append(batch)
                batch, longest_if = [], lengths[i]
            batch.append(int(i))
            longest = longest_if
        if batch:
            batches.append(batch)
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(seqs: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (inputs, targets): inputs = seq[:-1], targets = seq[1:], padding targets = -100."""
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = torch.as_tensor(s, dtype=torch.long)
        x[i, : len(s) - 1] = s[:-1]
        y[i, : len(s) - 1] = s[1:]
    return x, y
