"""Aligned data for fusion: the nested aligned subset, the ASR/TTS task mix, and batches per tower.

An example is one utterance in one direction:
  ASR  [speech][text]  the speech tower reads all of the speech, the text tower is trained on the text;
  TTS  [text][speech]  the text tower reads all of the text, the speech tower is trained on the units;
  LM   [speech][]      rehearsal (fuse --rehearsal): unlabeled speech, the speech tower trained as the plain
                       language model it was pretrained as (empty text after it: nothing to cross-attend).
Each tower gets (tokens, valid, order, targets): `order` is the token's position in the example's linear
sequence, which the Zipper model uses to mask cross-attention (a token sees the other modality's tokens
that come before it); targets are -100 except on the output modality.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ZipperError
from .vocab import specials, to_sequence

ASR, TTS, LM = "asr", "tts", "lm"
OUTPUT = {ASR: "text", TTS: "speech", LM: "speech"}
TASKS = (ASR, TTS, LM)


@dataclass(frozen=True)
class Example:
    task: str
    """asr, tts or lm (speech only: rehearsal)."""
    pieces: np.ndarray
    """Raw text tokens (sentencepiece ids, no bos/eos)."""
    units: np.ndarray
    """Raw speech units (0..K-1)."""
    uid: str

    def __len__(self) -> int:
        return len(self.pieces) + len(self.units) + 4

    def targets(self) -> int:
        """Predicted tokens: the output modality's tokens and its end token (never its begin token)."""
        return (len(self.pieces) if self.task == ASR else len(self.units)) + 1

    def sequence(self, modality: str) -> np.ndarray:
        """This example's sequence in a tower's vocabulary: [begin] tokens [end]."""
        return to_sequence(modality, self.pieces if modality == "text" else self.units)


def nested_subset(ids: list[str], seed: int, fraction: float | None = None, count: int | None = None) -> list[str]:
    """A deterministic subset of `ids`: a fixed seeded ranking of all ids, cut at the requested size,
    so a smaller subset is always inside a larger one (the 1% set is inside the 10% set)."""
    if fraction is not None and count is not None:
        raise ZipperError("give --aligned-fraction or --aligned-count, not both")
    ranked = sorted(ids, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())
    if count is None:
        fraction = 1.0 if fraction is None else fraction
        if not 0 < fraction <= 1:
            raise ZipperError(f"--aligned-fraction must be in (0, 1] (got {fraction})")
        count = max(1, round(fraction * len(ids)))
    if not 1 <= count <= len(ids):
        raise ZipperError(f"--aligned-count must be between 1 and {len(ids)}, the aligned utterances (got {count})")
    return ranked[:count]


def parse_task_mix(mix: str) -> tuple[float, float]:
    """'1:1.26' -> (1.0, 1.26): relative numbers of ASR and TTS examples."""
    try:
        a, t = (float(x) for x in mix.split(":"))
    except ValueError:
        raise ZipperError(f"--task-mix must look like ASR:TTS, e.g. 1:1.26 (got {mix!r})") from None
    if a < 0 or t < 0 or a + t == 0:
        raise ZipperError(f"--task-mix needs non-negative parts, not both zero (got {mix!r})")
    return a, t


def make_examples(utts: list[dict], mix: tuple[float, float], seed: int) -> list[Example]:
    """Examples in both directions with ASR:TTS = mix: the larger side uses every utterance, the
    smaller a seeded sample (repeats cycle through the utterances when a side exceeds 1x)."""
    scale = 1.0 / max(mix)
    rng = np.random.default_rng(seed)
    out = []
    for task, weight in ((ASR, mix[0]), (TTS, mix[1])):
        n = round(len(utts) * weight * scale)
        order = np.concatenate([rng.permutation(len(utts)) for _ in range(-(-n // max(1, len(utts))))])[:n] if n else []
        out += [Example(task, utts[i]["text"], utts[i]["speech"], utts[i]["id"]) for i in sorted(order)]
    if not out:
        raise ZipperError("--task-mix leaves no examples")
    return out


def with_other_text(examples: list[Example]) -> list[Example]:
    """The same TTS examples, each given another example's text: the nearest one after it (cyclically)
    whose text differs, or its own if none does. Its dev loss against the true text's says what reading
    the text is worth; at step 0 of a Zipper, where fusion is the identity, the two are equal (up to
    float rounding: the batches pad differently)."""
    out = []
    for i, ex in enumerate(examples):
        after = (examples[(i + k) % len(examples)] for k in range(1, len(examples)))
        other = next((o for o in after if not np.array_equal(o.pieces, ex.pieces)), ex)
        out.append(Example(ex.task, other.pieces, ex.units, ex.uid))
    return out


def make_rehearsal(utts: list[dict], n: int, seed: int, max_units: int | None = None) -> list[Example]:
    """n speech-only (LM) examples from `utts` (unlabeled speech), a seeded order cycling through them;
    units beyond max_units are cut (the speech tower's context, less its begin and end tokens)."""
    rng = np.random.default_rng(seed + 1)  # not the aligned examples' stream
    order = np.concatenate([rng.permutation(len(utts)) for _ in range(-(-n // len(utts)))])[:n] if n else []
    empty = np.zeros(0, dtype=np.int64)
    return [Example(LM, empty, np.asarray(utts[i]["speech"])[:max_units], utts[i]["id"]) for i in sorted(order)]


def tower_batch(examples: list[Example], modality: str) -> tuple[torch.Tensor, ...]:
    """(tokens, valid, order, targets) [B, T] for one tower over a batch of examples."""
    pad = specials(modality)[0]
    rows = []
    for ex in examples:
        seq = ex.sequence(modality)
        other_len = len(ex.units if modality == "text" else ex.pieces) + 2
        is_output = OUTPUT[ex.task] == modality
        inp = seq[:-1] if is_output else seq  # the output modality is teacher-forced; the input is read whole
        tgt = seq[1:] if is_output else np.full(len(seq), -100)
        first = (ex.task != TTS) == (modality == "speech")  # is this modality first in the linear order?
        start = 0 if first else other_len
        rows.append((inp, tgt, start))
    T = max(len(r[0]) for r in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    valid = torch.zeros((B, T), dtype=torch.bool)
    order = torch.zeros((B, T), dtype=torch.long)
    for i, (inp, tgt, start) in enumerate(rows):
        n = len(inp)
        tokens[i, :n] = torch.as_tensor(inp)
        targets[i, :n] = torch.as_tensor(tgt)
        valid[i, :n] = True
        order[i, :n] = start + torch.arange(n)
    return tokens, valid, order, targets
