"""Generation settings and results: GenerationConfig (the decode verb's search flags), Generation (one
example's outputs), and parse_modality_map for the per-modality flags. See generate.py for the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from zipper_cli.errors import ZipperError

MODALITIES = ("text", "speech")
STRATEGIES = ("greedy", "sample", "beam")


def parse_modality_map(spec: str, flag: str, cast=float) -> dict[str, float]:
    """'text=0.5,speech=12' -> {'text': 0.5, 'speech': 12.0}; a ZipperError naming `flag` otherwise."""
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in MODALITIES:
            raise ZipperError(f"{flag} must look like text=X,speech=Y (got {spec!r})")
        try:
            out[key.strip()] = cast(value)
        except ValueError:
            raise ZipperError(f"{flag}: {value!r} is not a number (in {spec!r})") from None
    return out


@dataclass
class GenerationConfig:
    strategy: str = "greedy"
    """--strategy: greedy (argmax), sample (temperature / top-k / top-p) or beam (--beam beams)."""
    beam: int = 4
    """--beam: number of beams when strategy is beam; 1 gives exactly greedy."""
    length_penalty: float = 0.6
    """--length-penalty: alpha in GNMT's ((5 + len) / 6) ** alpha; beams are ranked by log-prob / that.
    0 ranks by total log-probability (favours short outputs)."""
    temperature: float = 1.0
    """--temperature: sampling divides the logits by this."""
    top_k: int = 0
    """--top-k: sample among the k most likely tokens only; 0 = all."""
    top_p: float = 1.0
    """--top-p: sample within the smallest set of tokens whose probability reaches p (nucleus); 1 = all."""
    seed: int = 0
    """--seed: sampling seed. Example i of a call draws from its own generator seeded by (seed, i), so its
    sample does not depend on which examples share its batch."""
    max_len_ratio: dict = field(default_factory=lambda: {"text": 0.5, "speech": 10.0})
    """--max-len-ratio: per output modality, maximum tokens per input token when the input is the other
    modality, speech counted in 25 Hz units (40 ms each) whatever the tokenizer's rate (see unit_rate), so
    a limit means the same duration at any rate. Demo corpus: ~56 units (25 Hz) per ~12 text pieces, i.e.
    ~0.21 pieces per unit and ~4.7 units per piece; the defaults leave about 2x headroom."""
    max_len_min: dict = field(default_factory=lambda: {"text": 10, "speech": 75})
    """--max-len-min: per output modality, a floor on its maximum length (short inputs); speech in 25 Hz
    units, like --max-len-ratio. Speech: 75 units (3 s), raised from 50 in session 16. Short sentences
    carry more silence per piece: 24 of the demo's 2,000 aligned utterances, all of 4-6 text pieces, were
    longer than 50 units (at most 71), and 3 of the 200 test sentences' TTS outputs were cut there."""
    unit_rate: float = 25.0
    """Speech units per second of the model's speech tokenizer (zipper decode sets it from the run; not a
    flag). The speech lengths of --max-len-ratio and --max-len-min are scaled by unit_rate / 25: at 50 Hz
    the default allows 20 units per text piece, not 10, which would cut most demo sentences short."""
    max_new_tokens: Optional[int] = None
    """--max-new-tokens: if given, the maximum length of every output, instead of the ratios."""
    min_new_tokens: int = 0
    """--min-new-tokens: an output's end token is forbidden until it has this many tokens (benchmarks)."""
    batch_size: int = 16
    """--batch-size: examples decoded together (beam search runs batch_size * beam rows, --best-of
    batch_size * best_of)."""
    use_cache: bool = True
    """--no-cache turns this off: recompute the whole forward pass at every step (reference path)."""
    ctc_weight: float = 0.0
    """--ctc-weight: joint CTC/attention decoding of text from speech (ASR) with a Zipper fused with
    --ctc-weight: each text token is chosen by (1 - w) * attention log-prob + w * the gain in CTC prefix
    log-probability (ctc_prefix.py). 0 = attention only. Greedy and beam search; 1 = CTC prefix scores only."""
    best_of: int = 1
    """--best-of: TTS with a Zipper fused with a CTC head (--ctc-weight): sample this many speech outputs per
    input and keep the one the model's own CTC head reads as the input text most likely (the CTC
    log-likelihood of the text's pieces given the units, read as in ASR). Needs --strategy sample. 1 = off."""
    guidance: float = 0.0
    """--guidance: classifier-free guidance of speech outputs with a Zipper: each unit is chosen from
    (1 + g) * log p(unit | text, units so far) - g * log p(unit | units so far), the second term from the
    speech tower alone (generate_guidance.py). 0 = off."""

    def validate(self) -> "GenerationConfig":
        if self.strategy not in STRATEGIES:
            raise ZipperError(f"--strategy must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        if not _pos_int(self.beam):
            raise ZipperError(f"--beam ({self.beam!r}) must be a positive integer")
        if not math.isfinite(self.length_penalty):
            raise ZipperError(f"--length-penalty ({self.length_penalty!r}) must be a finite number")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ZipperError(f"--temperature ({self.temperature!r}) must be > 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ZipperError(f"--top-k ({self.top_k!r}) must be a non-negative integer")
        if not 0 < self.top_p <= 1:
            raise ZipperError(f"--top-p ({self.top_p!r}) must be in (0, 1]")
        if not isinstance(self.seed, int):
            raise ZipperError(f"--seed ({self.seed!r}) must be an integer")
        for flag, d, ok in (("--max-len-ratio", self.max_len_ratio, lambda v: v > 0 and math.isfinite(v)),
                            ("--max-len-min", self.max_len_min, _pos_int)):
            for k, v in d.items():
                if k not in MODALITIES or not ok(v):
                    raise ZipperError(f"{flag}: bad entry {k}={v!r} (modalities: text, speech; values > 0)")
        if self.max_new_tokens is not None and not _pos_int(self.max_new_tokens):
            raise ZipperError(f"--max-new-tokens ({self.max_new_tokens!r}) must be a positive integer")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ZipperError(f"--min-new-tokens ({self.min_new_tokens!r}) must be a non-negative integer")
        if not (0 <= self.ctc_weight <= 1):
            raise ZipperError(f"--ctc-weight ({self.ctc_weight!r}) must be in [0, 1]")
        if self.ctc_weight > 0 and self.strategy == "sample":
            raise ZipperError("--ctc-weight works with --strategy greedy or beam, not sample")
        if not _pos_int(self.best_of):
            raise ZipperError(f"--best-of ({self.best_of!r}) must be a positive integer")
        if self.best_of > 1 and self.strategy != "sample":
            raise ZipperError("--best-of picks among sampled outputs: it needs --strategy sample")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ZipperError(f"--guidance ({self.guidance!r}) must be >= 0")
        if not (isinstance(self.unit_rate, (int, float)) and math.isfinite(self.unit_rate) and self.unit_rate > 0):
            raise ZipperError(f"speech unit rate ({self.unit_rate!r}) must be > 0")
        if not _pos_int(self.batch_size):
            raise ZipperError(f"--batch-size ({self.batch_size!r}) must be a positive integer")
        return self

    def max_len(self, modality: str, input_modality: str, input_len: int) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        per_25hz = self.unit_rate / 25.0  # units at the tokenizer's rate per 25 Hz unit
        floor = self.max_len_min.get(modality, 1)
        if modality == "speech":
            floor = math.ceil(floor * per_25hz)
        if modality == input_modality:
            return max(floor, input_len)
        ratio = self.max_len_ratio.get(modality, 1.0)
        ratio = ratio * per_25hz if modality == "speech" else ratio / per_25hz
        return max(floor, math.ceil(ratio * input_len))


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass
class Generation:
    outputs: list[str]
    """The output modalities, in order."""
    tokens: list[np.ndarray]
    """Per output, the raw generated tokens: text pieces without bos/eos, speech units 0..K-1."""
    ended: list[bool]
    """Per output, True if it stopped at its end token, False if it hit its maximum length."""
    max_len: list[int]
    """Per output, the maximum length it was allowed."""
    logprob: float
    """Sum of the log-probabilities of the chosen tokens (end tokens included, forced tokens excluded)
    under the model's distribution restricted to the output modality, temperature 1 (with --ctc-weight,
    the joint CTC/attention scores of the text tokens)."""
    score: float
    """logprob / ((5 + n) / 6) ** length_penalty for beam search (n chosen tokens); logprob otherwise."""
    logits: Optional[list[torch.Tensor]] = None
    """With return_logits: the raw model logits [V] before each chosen token (greedy / sample only)."""

    def __getitem__(self, modality: str) -> np.ndarray:
        """The tokens of the (first) output in `modality`."""
        return self.tokens[self.outputs.index(modality)]
