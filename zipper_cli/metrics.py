"""ASR scoring: corpus-level WER/CER with jiwer after the one normaliser, error counts, per-utterance
alignments, and a paired significance test between two systems on the same utterances."""

from __future__ import annotations

from dataclasses import dataclass

import jiwer
import numpy as np

from .errors import ZipperError
from .text_norm import normalize_text

EMPTY = "<empty>"  # jiwer refuses empty references; an empty hypothesis is scored against it as all deletions


@dataclass(frozen=True)
class Score:
    wer: float
    cer: float
    substitutions: int
    deletions: int
    insertions: int
    ref_words: int
    utterances: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _prepare(refs: list[str], hyps: list[str]) -> tuple[list[str], list[str]]:
    if len(refs) != len(hyps):
        raise ZipperError(f"scoring needs as many hypotheses as references ({len(hyps)} vs {len(refs)})")
    if not refs:
        raise ZipperError("nothing to score: no utterances")
    r = [normalize_text(x) for x in refs]
    if any(not x for x in r):
        raise ZipperError("a reference is empty after normalisation; WER is undefined for it")
    return r, [normalize_text(x) for x in hyps]


def score(refs: list[str], hyps: list[str]) -> Score:
    """Corpus-level WER and CER (errors summed over utterances / reference length summed)."""
    r, h = _prepare(refs, hyps)
    words = jiwer.process_words(r, h)
    chars = jiwer.process_characters(r, h)
    return Score(words.wer, chars.cer, words.substitutions, words.deletions, words.insertions,
                 sum(len(x.split()) for x in r), len(r))


def utterance_errors(refs: list[str], hyps: list[str]) -> list[dict]:
    """Per utterance: normalised ref/hyp, word errors, ref length, and a readable alignment."""
    r, h = _prepare(refs, hyps)
    out = []
    for ref, hyp in zip(r, h):
        o = jiwer.process_words(ref, hyp)
        errors = o.substitutions + o.deletions + o.insertions
        out.append({"ref": ref, "hyp": hyp, "errors": errors, "ref_words": len(ref.split()),
                    "wer": errors / len(ref.split()), "alignment": _alignment(o)})
    return out


def _alignment(o) -> str:
    """'a [b->x] c [-d] [+e]': substitutions, deletions, insertions inline."""
    ref, hyp = o.references[0], o.hypotheses[0]
    parts = []
    for c in o.alignments[0]:
        rw, hw = ref[c.ref_start_idx:c.ref_end_idx], hyp[c.hyp_start_idx:c.hyp_end_idx]
        if c.type == "equal":
            parts += rw
        elif c.type == "substitute":
            parts += [f"[{a}->{b}]" for a, b in zip(rw, hw)]
        elif c.type == "delete":
            parts += [f"[-{a}]" for a in rw]
        else:
            parts += [f"[+{b}]" for b in hw]
    return " ".join(parts)


def paired_bootstrap(errors_a: list[int], errors_b: list[int], ref_words: list[int], n: int = 10_000,
                     seed: int = 0) -> dict:
    """Paired bootstrap over utterances (Koehn 2004; Bisani & Ney 2004): resample utterances with
    replacement, recompute both corpus WERs, and report how often B is not better than A.

    Returns delta = WER_B - WER_A, its 95% interval, and p = P(WER_B >= WER_A) under resampling
    (small p: B is significantly better; p near 1: A is)."""
    a, b, w = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, ref_words))
    if not (len(a) == len(b) == len(w)) or len(a) == 0:
        raise ZipperError("paired test needs the same non-empty set of utterances for both systems")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n, len(a)))
    words = w[idx].sum(1)
    delta = (b[idx].sum(1) - a[idx].sum(1)) / words
    return {"delta_wer": float((b.sum() - a.sum()) / w.sum()), "ci95": [float(np.percentile(delta, 2.5)),
            float(np.percentile(delta, 97.5))], "p_b_not_better": float((delta >= 0).mean()), "resamples": n,
            "test": "paired bootstrap"}


def wilcoxon(errors_a: list[float], errors_b: list[float]) -> dict:
    """Wilcoxon signed-rank test on per-utterance error counts (two-sided, normal approximation with
    tie and zero corrections, Pratt's handling of zero differences dropped: zeros are discarded)."""
    d = np.asarray(errors_b, dtype=np.float64) - np.asarray(errors_a, dtype=np.float64)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return {"statistic": 0.0, "z": 0.0, "p": 1.0, "n_nonzero": 0, "test": "wilcoxon signed-rank"}
    ranks = _average_ranks(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    mean = n * (n + 1) / 4
    _, counts = np.unique(np.abs(d), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (counts**3 - counts).sum() / 48
    z = (w_plus - mean) / np.sqrt(var) if var > 0 else 0.0
    from math import erfc, sqrt

    return {"statistic": w_plus, "z": float(z), "p": float(erfc(abs(z) / sqrt(2))), "n_nonzero": n,
            "test": "wilcoxon signed-rank"}


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # ties share their average rank
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks
