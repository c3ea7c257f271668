"""The training losses of `zipper fuse`: ZipperLoss (cross-entropy per output modality plus the Zipper's
auxiliary losses: CTC on the speech tower, the learned clock's terms; noised TTS input units) and
SingleDecoderLoss (next-token cross-entropy on the baseline's joint vocabulary, with its examples)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .ctc_align import ctc_viterbi
from .fusion_data import ASR, LM, TTS, Example, tower_batch
from .models.single_decoder import SingleDecoderVocab
from .vocab import SPEECH_OFFSET

# --clock-align-weight uses an ASR example's forced alignment only when its CTC head reads the transcript
# at under this many nats per piece: an untrained head's Viterbi path is arbitrary and would teach the
# clock noise.
ALIGN_MAX_NATS = 1.0


def corrupt_units(tokens: torch.Tensor, rows: list[bool], p: float, vocab_size: int) -> torch.Tensor:
    """A copy of speech tokens [B, T] where, in the chosen rows, each unit (never a begin, end or pad
    token) is replaced with probability p by a unit drawn uniformly (it may draw itself)."""
    is_unit = (tokens >= SPEECH_OFFSET) & torch.tensor(rows, dtype=torch.bool)[:, None]
    hit = is_unit & (torch.rand(tokens.shape) < p)
    noise = torch.randint(SPEECH_OFFSET, vocab_size, tokens.shape)
    return torch.where(hit, noise, tokens)


class ZipperLoss:
    """Cross-entropy on the output modality of each example (ASR: text, TTS and LM: speech), plus
    ctc_weight x the CTC loss of the model's CTC head on ASR examples (speech positions -> transcript
    pieces) and ctc_tts_weight x the same on TTS examples, plus clock_weight x sum over ASR and TTS
    examples of log(speech clock end / text length)^2 (a learned clock only), plus clock_align_weight x
    the Huber distance of each speech token's clock place from its piece's text position (FuseConfig).
    LM examples have no text: no auxiliary loss applies to them. In training mode, speech_input_noise
    corrupts TTS examples' input units (FuseConfig.speech_input_noise), drawn from torch's CPU generator,
    which checkpoints save and resume restores."""

    def __init__(self, ctc_weight: float = 0.0, clock_weight: float = 0.0, ctc_tts_weight: float = 0.0,
                 clock_align_weight: float = 0.0, speech_input_noise: float = 0.0):
        self.ctc_weight, self.clock_weight, self.ctc_tts_weight = ctc_weight, clock_weight, ctc_tts_weight
        self.clock_align_weight, self.speech_input_noise = clock_align_weight, speech_input_noise

    def __call__(self, model, examples: list[Example], device):
        batch, targets = {}, {}
        for m in ("text", "speech"):
            tokens, valid, order, tgt = tower_batch(examples, m)
            if m == "speech" and self.speech_input_noise > 0 and model.training:
                tokens = corrupt_units(tokens, [e.task == TTS for e in examples], self.speech_input_noise,
                                       model.towers["speech"].cfg.vocab_size)
            batch[m] = (tokens.to(device), valid.to(device), order.to(device))
            targets[m] = tgt.to(device)
        weight = [{ASR: self.ctc_weight, TTS: self.ctc_tts_weight}.get(e.task, 0.0) for e in examples]
        rows = [i for i, w in enumerate(weight) if w > 0]
        logits = model(batch, with_ctc=bool(rows), with_clock=self.clock_weight > 0 or self.clock_align_weight > 0)
        loss = sum(F.cross_entropy(logits[m].float().flatten(0, 1), targets[m].flatten(), ignore_index=-100,
                                   reduction="sum") for m in ("text", "speech"))
        if rows:
            log_probs = logits["ctc"][rows].float().log_softmax(-1).transpose(0, 1)  # [T_speech, B_ctc, V_text]
            pieces = [torch.as_tensor(examples[i].pieces, dtype=torch.long) for i in rows]
            ctc = F.ctc_loss(log_probs, torch.cat(pieces).to(device), batch["speech"][1][rows].sum(1),
                             torch.tensor([len(p) for p in pieces], device=device), blank=0, reduction="none",
                             zero_infinity=True)  # [B_ctc]
            loss = loss + (torch.tensor([weight[i] for i in rows], device=device) * ctc).sum()
            if self.clock_align_weight > 0:
                loss = loss + self.clock_align_weight * self._clock_align(
                    examples, rows, log_probs.detach().transpose(0, 1), ctc.detach(), pieces, batch,
                    logits["clock_pos"]["speech"])
        if self.clock_weight > 0:
            n_text = batch["text"][1].sum(1).clamp(min=1).to(torch.float32)
            end = logits["clock"]["speech"].clamp(min=1e-3)  # [B]
            paired = torch.tensor([e.task != LM for e in examples], device=device)
            loss = loss + self.clock_weight * ((end.log() - n_text.log()).square() * paired).sum()
        return loss, int(sum((t != -100).sum() for t in targets.values()))

    @staticmethod
    def _clock_align(examples, rows, log_probs, ctc, pieces, batch, clock_pos) -> torch.Tensor:
        """Sum over the ASR rows the CTC head reads (under ALIGN_MAX_NATS per piece) of the Huber distance
        between each speech token's clock place and the text position of the piece its frame belongs to
        (piece k sits at k + 1, after the text's begin token; frames before the first piece at 0)."""
        keep = [j for j, i in enumerate(rows) if examples[i].task == ASR and len(pieces[j])
                and float(ctc[j]) / len(pieces[j]) < ALIGN_MAX_NATS]
        if not keep:
            return clock_pos.sum() * 0.0
        lengths = batch["speech"][1][[rows[j] for j in keep]].sum(1)
        ali, _ = ctc_viterbi(log_probs[keep], lengths, [pieces[j] for j in keep])
        total = clock_pos.sum() * 0.0
        for j, a, n in zip(keep, ali, lengths.tolist()):
            if a is not None:
                target = (a + 1).to(clock_pos.device, torch.float32)
                total = total + F.smooth_l1_loss(clock_pos[rows[j], :n].float(), target, reduction="sum")
        return total

    @staticmethod
    def count_targets(ex: Example) -> int:
        return ex.targets()


@dataclass(frozen=True)
class SDExample:
    """A single-decoder example: joint-vocabulary ids and which of them are targets."""

    ids: np.ndarray
    mask: np.ndarray
    task: str

    def __len__(self) -> int:
        return len(self.ids)


class SingleDecoderLoss:
    def __call__(self, model, examples: list[SDExample], device):
        T = max(len(e.ids) for e in examples) - 1
        x = torch.zeros((len(examples), T), dtype=torch.long)  # pad id 0 (text pad)
        y = torch.full((len(examples), T), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            ids = torch.as_tensor(e.ids)
            x[i, : len(ids) - 1] = ids[:-1]
            y[i, : len(ids) - 1] = torch.where(torch.as_tensor(e.mask[1:]), ids[1:], torch.tensor(-100))
        logits = model(x.to(device))
        y = y.to(device)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"), int((y != -100).sum())

    @staticmethod
    def count_targets(ex: SDExample) -> int:
        return int(ex.mask[1:].sum())


def to_single_decoder(examples: list[Example], vocab: SingleDecoderVocab) -> list[SDExample]:
    out = []
    for ex in examples:
        ids, mask = vocab.asr_example(ex.units, ex.pieces) if ex.task == ASR else vocab.tts_example(ex.pieces, ex.units)
        out.append(SDExample(ids, mask, ex.task))
    return out
