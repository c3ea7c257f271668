"""ASR scoring: corpus-level WER/CER with jiwer after the one normaliser, error counts, per-utterance
alignments, paired significance tests between two systems on the same utterances, and a bootstrap
interval for the ratio of two WERs."""

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


def _resamples(size: int, n: int, seed: int, chunk: int):
    """n bootstrap draws of `size` utterance indices with replacement, `chunk` draws at a time: [chunk, size]."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        yield rng.integers(0, size, size=(min(chunk, n - start), size))


def paired_bootstrap(errors_a: list[int], errors_b: list[int], ref_words: list[int], n: int = 10_000,
                     seed: int = 0, chunk: int = 500) -> dict:
    """Paired bootstrap over utterances (Koehn 2004; Bisani & Ney 2004): resample utterances with
    replacement, recompute both corpus WERs, and report how often B is not better than A.

    Returns delta = WER_B - WER_A, its 95% interval, p_b_not_better = P(WER_B >= WER_A) under resampling
    (small: B is significantly better; near 1: A is) and the two-sided p = 2 min(P(delta >= 0), P(delta <= 0)).
    Resamples are drawn `chunk` at a time so memory stays small on large test sets."""
    a, b, w = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, ref_words))
    if not (len(a) == len(b) == len(w)) or len(a) == 0:
        raise ZipperError("paired test needs the same non-empty set of utterances for both systems")
    delta = np.concatenate([(b[idx].sum(1) - a[idx].sum(1)) / w[idx].sum(1)
                            for idx in _resamples(len(a), n, seed, chunk)])
    not_better, not_worse = float((delta >= 0).mean()), float((delta <= 0).mean())
    return {"delta_wer": float((b.sum() - a.sum()) / w.sum()), "ci95": [float(np.percentile(delta, 2.5)),
            float(np.percentile(delta, 97.5))], "p_b_not_better": not_better,
            "p_two_sided": min(1.0, 2 * min(not_better, not_worse)), "resamples": n, "seed": seed,
            "test": "paired bootstrap"}


def bootstrap_ratio(errors_a: list[int], errors_b: list[int], target: float, n: int = 10_000, seed: int = 0,
                    chunk: int = 500) -> dict:
    """The ratio WER_B / WER_A of two transcriptions of the same utterances (for example resynthesised
    against original audio), with a 95% interval from resampling the utterances (paired), and the share of
    resamples at or under `target`. The reference lengths cancel in the ratio, so the error counts suffice.
    Resamples where A makes no error at all are left out of the interval (the ratio is undefined there)."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b))
    if len(a) != len(b) or len(a) == 0:
        raise ZipperError("a WER ratio needs the same non-empty set of utterances for both transcriptions")
    if a.sum() == 0:
        raise ZipperError("a WER ratio is undefined: the first transcription has no errors")
    ratios = []
    for idx in _resamples(len(a), n, seed, chunk):
        den = a[idx].sum(1)
        ratios.append(b[idx].sum(1)[den > 0] / den[den > 0])
    r = np.concatenate(ratios)
    return {"ratio": float(b.sum() / a.sum()), "ci95": [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))],
            "share_at_or_under_target": float((r <= target).mean()), "target": target, "resamples": len(r),
            "seed": seed}


EXACT_WILCOXON_MAX_N = 50


def wilcoxon(errors_a: list[float], errors_b: list[float]) -> dict:
    """Wilcoxon signed-rank test of d = B - A on per-utterance error counts, two-sided.

    Zero differences are discarded (Wilcoxon's treatment), tied |d| share their average rank. The statistic
    is W+ (the rank sum of the positive differences: large when B makes more errors). p is exact for at most
    50 non-zero differences (the permutation distribution of W+ given the observed ranks, ties included), and
    otherwise the normal approximation with the tie correction and no continuity correction (`p_normal`,
    always reported; scipy.stats.wilcoxon(d, correction=False, method="approx") gives the same)."""
    a, b = np.asarray(errors_a, dtype=np.float64), np.asarray(errors_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ZipperError(f"paired test needs the same utterances for both systems ({len(a)} vs {len(b)})")
    d = b - a
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return {"statistic": 0.0, "z": 0.0, "p": 1.0, "p_normal": 1.0, "method": "exact", "n_nonzero": 0,
                "test": "wilcoxon signed-rank"}
    ranks = _average_ranks(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    mean = n * (n + 1) / 4
    _, counts = np.unique(np.abs(d), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (counts**3 - counts).sum() / 48
    z = (w_plus - mean) / np.sqrt(var) if var > 0 else 0.0
    from math import erfc, sqrt

    p_normal = float(erfc(abs(z) / sqrt(2)))
    exact = n <= EXACT_WILCOXON_MAX_N
    p = _wilcoxon_exact_p(ranks, w_plus) if exact else p_normal
    return {"statistic": w_plus, "z": float(z), "p": p, "p_normal": p_normal,
            "method": "exact" if exact else "normal approximation", "n_nonzero": n, "test": "wilcoxon signed-rank"}


def _wilcoxon_exact_p(ranks: np.ndarray, w_plus: float) -> float:
    """Two-sided p of W+ under random signs: its exact distribution by dynamic programming over the doubled
    (integer: average ranks are multiples of 1/2) ranks, p = 2 min(P(W+ <= w), P(W+ >= w)), at most 1."""
    r2 = np.rint(2 * ranks).astype(np.int64)
    dist = np.zeros(int(r2.sum()) + 1)
    dist[0] = 1.0
    for r in r2:
        shifted = np.zeros_like(dist)
        shifted[r:] = dist[: len(dist) - r]
        dist = 0.5 * (dist + shifted)
    w2 = int(round(2 * w_plus))
    return float(min(1.0, 2 * min(dist[: w2 + 1].sum(), dist[w2:].sum())))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # ties share their average rank
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def length_buckets(lengths: list[int], max_buckets: int = 8) -> list[tuple[int, int]]:
    """Reference-length buckets (lo, hi inclusive, in words) for WER-by-length: one per length when there are
    at most `max_buckets` distinct lengths, else about equally many utterances per bucket, a length never
    split across two buckets."""
    if not lengths:
        return []
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    if len(values) <= max_buckets:
        return [(int(v), int(v)) for v in values]
    target = counts.sum() / max_buckets
    buckets, lo, seen = [], int(values[0]), 0
    for i, (v, c) in enumerate(zip(values, counts)):
        seen += c
        if seen >= target * (len(buckets) + 1) or i == len(values) - 1:
            buckets.append((lo, int(v)))
            if i + 1 < len(values):
                lo = int(values[i + 1])
    return buckets


def wer_by_length(errors: list[int], ref_words: list[int], buckets: list[tuple[int, int]]) -> list[dict]:
    """Corpus WER of the utterances whose reference length falls in each bucket (empty buckets are left out)."""
    e, w = np.asarray(errors, dtype=np.int64), np.asarray(ref_words, dtype=np.int64)
    out = []
    for lo, hi in buckets:
        m = (w >= lo) & (w <= hi)
        if m.any():
            out.append({"lo": lo, "hi": hi, "utterances": int(m.sum()), "errors": int(e[m].sum()),
                        "ref_words": int(w[m].sum()), "wer": float(e[m].sum() / w[m].sum())})
    return out


GOLD_ROWS = {"asr": "ASR", "tts_vs_gold": "generated", "oracle_vs_gold": "oracle (gold units)",
             "ground_truth_vs_gold": "ground-truth audio"}
"""Per-utterance rows scored against the gold transcript, whose length buckets the WER-by-length table."""


def wer_by_length_panels(rows: list[dict], label) -> dict[str, dict[str, list[dict]]]:
    """{panel: {series: WER per reference-length bucket}}: panel "ASR" or "TTS, judge J", series label(row);
    buckets shared by the series of a panel (metrics.length_buckets over their gold reference lengths)."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        kind, _, judge = r["row"].partition("/")
        if kind in GOLD_ROWS:
            panel = "ASR" if kind == "asr" else f"TTS, judge {judge}"
            groups.setdefault(panel, {}).setdefault(label(r), []).append(r)
    out = {}
    for panel, series in groups.items():
        buckets = length_buckets([r["ref_words"] for rs in series.values() for r in rs])
        out[panel] = {name: wer_by_length([r["errors"] for r in rs], [r["ref_words"] for r in rs], buckets)
                      for name, rs in series.items()}
    return out
