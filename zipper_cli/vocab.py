"""Each tower's vocabulary and how a token shard becomes a training sequence.

Text tower: the sentencepiece ids as they are (pad 0, unk 1, bos 2, eos 3 are fixed by text_tokenizer).
Speech tower: pad 0, begin-of-audio 1, end-of-audio 2, then unit u at id u + 3.
A sequence is [begin] tokens [end]; the model reads all but the last and predicts all but the first.
"""

from __future__ import annotations

import numpy as np

from .text_tokenizer import BOS_ID, EOS_ID, PAD_ID

SPEECH_PAD, SPEECH_BOA, SPEECH_EOA = 0, 1, 2
SPEECH_OFFSET = 3


def text_vocab_size(spm_size: int) -> int:
    return spm_size


def speech_vocab_size(n_units: int) -> int:
    return n_units + SPEECH_OFFSET


def specials(modality: str) -> tuple[int, int, int]:
    """(pad, begin, end) ids of a modality."""
    return (PAD_ID, BOS_ID, EOS_ID) if modality == "text" else (SPEECH_PAD, SPEECH_BOA, SPEECH_EOA)


def to_sequence(modality: str, tokens: np.ndarray) -> np.ndarray:
    """Raw shard tokens -> [begin] ids [end] in the tower's vocabulary (int64)."""
    _, begin, end = specials(modality)
    ids = np.asarray(tokens, dtype=np.int64)
    if modality == "speech":
        ids = ids + SPEECH_OFFSET
    return np.concatenate([[begin], ids, [end]])


def from_sequence(modality: str, ids) -> np.ndarray:
    """Tower ids -> raw shard tokens, dropping specials (units back to 0..K-1)."""
    pad, begin, end = specials(modality)
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[(ids != pad) & (ids != begin) & (ids != end)]
    if modality == "speech":
        ids = ids - SPEECH_OFFSET
    return ids


def split_long(seq: np.ndarray, max_len: int) -> list[np.ndarray]:
    """Cut a sequence longer than max_len into consecutive windows (overlapping by one token so every
    next-token target is kept exactly once)."""
    if len(seq) <= max_len:
        return [seq]
    return [seq[i:i + max_len] for i in range(0, len(seq) - 1, max_len - 1) if len(seq[i:i + max_len]) > 1]
