"""The paper's baseline: one decoder, the text tower with its vocabulary extended by the speech tower's
ids and two task tags, all parameters fine-tuned on the same aligned ASR/TTS mix.

Extended id space (V_text = text vocabulary, V_speech = speech tower vocabulary, see vocab.py):
    0 .. V_text-1                  text ids, unchanged
    V_text + s, s in 1..V_speech-1 speech tower id s (boa 1, eoa 2, unit u at u + 3)
    V_text + V_speech              <asr>
    V_text + V_speech + 1          <tts>
The speech pad (0) maps to the text pad, so one pad id serves both; id V_text is kept for it
(never produced by the builders) so the mapping stays a plain offset both ways.

Examples (ids, loss_mask), with loss_mask[i] True iff ids[i] is a prediction target; a trainer reads
ids[:-1] and scores ids[1:] where loss_mask[1:]:
    ASR  [<asr>] [boa] units [eoa] [bos] text [eos]    targets: text pieces and eos
    TTS  [<tts>] [bos] text [eos] [boa] units [eoa]    targets: units and eoa
The output segment's begin token (bos / boa) is not a target: the layout fixes it (decoding forces it),
and Zipper's towers never predict it either, so both models are scored on the same targets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from zipper_cli.errors import ZipperError
from zipper_cli.models.tower import Tower
from zipper_cli.text_tokenizer import PAD_ID
from zipper_cli.vocab import SPEECH_PAD, to_sequence


@dataclass(frozen=True)
class SingleDecoderVocab:
    text_size: int
    """V_text: size of the text tower's vocabulary (its ids are kept as they are)."""
    speech_size: int
    """V_speech: size of the speech tower's vocabulary (n_units + 3)."""

    @property
    def asr_tag(self) -> int:
        return self.text_size + self.speech_size

    @property
    def tts_tag(self) -> int:
        return self.text_size + self.speech_size + 1

    @property
    def size(self) -> int:
        """Extended vocabulary size."""
        return self.text_size + self.speech_size + 2

    @property
    def n_new(self) -> int:
        """Rows added to the text tower's embedding."""
        return self.size - self.text_size

    def text(self, ids) -> np.ndarray:
        """Text tower ids -> extended ids (identity, range-checked)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.text_size):
            raise ZipperError(f"text id out of range 0..{self.text_size - 1}")
        return ids

    def speech(self, ids) -> np.ndarray:
        """Speech tower ids -> extended ids: offset by V_text; the speech pad becomes the text pad."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.speech_size):
            raise ZipperError(f"speech id out of range 0..{self.speech_size - 1}")
        return np.where(ids == SPEECH_PAD, PAD_ID, ids + self.text_size)

    def is_speech(self, ext_ids) -> np.ndarray:
        ext_ids = np.asarray(ext_ids, dtype=np.int64)
        return (ext_ids >= self.text_size) & (ext_ids < self.text_size + self.speech_size)

    def to_speech(self, ext_ids) -> np.ndarray:
        """Extended ids that are speech ids -> speech tower ids (inverse of `speech`, for decoding)."""
        ext_ids = np.asarray(ext_ids, dtype=np.int64)
        if not self.is_speech(ext_ids).all():
            raise ZipperError("to_speech: some ids are not speech ids of the extended vocabulary")
        return ext_ids - self.text_size

    def asr_example(self, units, pieces) -> tuple[np.ndarray, np.ndarray]:
        """Raw units (0..K-1) and text pieces (sentencepiece ids, no bos/eos) ->
        [<asr>] [boa] units [eoa] [bos] text [eos], loss on text pieces and eos."""
        prompt = np.concatenate([[self.asr_tag], self.speech(to_sequence("speech", units))])
        out = self.text(to_sequence("text", pieces))
        return _join(prompt, out)

    def tts_example(self, pieces, units) -> tuple[np.ndarray, np.ndarray]:
        """Text pieces and raw units -> [<tts>] [bos] text [eos] [boa] units [eoa], loss on units and eoa."""
        prompt = np.concatenate([[self.tts_tag], self.text(to_sequence("text", pieces))])
        out = self.speech(to_sequence("speech", units))
        return _join(prompt, out)


def _join(prompt: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prompt + out (whose first token is its begin token) -> ids, loss_mask over out[1:]."""
    ids = np.concatenate([prompt, out]).astype(np.int64)
    loss_mask = np.zeros(len(ids), dtype=bool)
    loss_mask[len(prompt) + 1:] = True
    return ids, loss_mask


@torch.no_grad()
def extend_tower(tower: Tower, n_new: int, noise: float = 0.1, seed: int = 0, dropout: float | None = None) -> Tower:
    """A new Tower with vocab_size + n_new: every parameter copied bitwise, the embedding's first rows
    the original ones, new rows = mean of the original rows + noise * (their per-dimension std) * N(0, 1).

    Why mean + small noise: the head is tied to the embedding, so a new row's logit is h . row. At the mean
    row every new token scores about the average logit: it neither dominates the softmax (as a random
    row far from the text rows could) nor starts far from the region the blocks' outputs live in; the
    noise, scaled to the rows' own spread, breaks the tie between new tokens so they can separate.
    The original rows are untouched, so logits[..., :V] of text input equal the original tower's at step 0
    (the softmax over the extended vocabulary of course differs). The caller's tower is not modified.
    dropout (None: the tower's own) sets the new tower's dropout, which only acts in training."""
    if not isinstance(n_new, int) or n_new < 0:
        raise ZipperError(f"extend_tower: n_new ({n_new!r}) must be a non-negative integer")
    old = tower.wte.weight
    cfg = dataclasses.replace(tower.cfg, vocab_size=tower.cfg.vocab_size + n_new,
                              dropout=tower.cfg.dropout if dropout is None else dropout).validate()
    new = Tower(cfg).to(device=old.device, dtype=old.dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)  # reproducible, independent of the global RNG
    rows = torch.randn(n_new, old.shape[1], generator=gen, dtype=torch.float32).to(old.device)
    rows = old.float().mean(0) + noise * old.float().std(0) * rows  # [n_new, C]
    state = tower.state_dict()
    state["wte.weight"] = torch.cat([old, rows.to(old.dtype)], dim=0)  # [V + n_new, C]
    new.load_state_dict(state)
    new.train(tower.training)
    return new


def build_single_decoder(text_tower: Tower, vocab: SingleDecoderVocab, seed: int = 0, dropout: float | None = None) -> Tower:
    """The baseline model: the text tower extended to the joint vocabulary (all parameters trainable)."""
    if vocab.text_size != text_tower.cfg.vocab_size:
        raise ZipperError(f"single decoder: text vocabulary {vocab.text_size} != the text tower's "
                          f"{text_tower.cfg.vocab_size}")
    return extend_tower(text_tower, vocab.n_new, seed=seed, dropout=dropout)
