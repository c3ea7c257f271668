"""ASR judges for TTS evaluation: audio -> transcript, deterministic and independent of call order.

PocketsphinxJudge uses the English acoustic model, language model and dictionary that ship inside the
`pocketsphinx` wheel (nothing is downloaded). Two settings make it a fair judge:
  cmn="batch"   cepstral mean normalisation from the whole utterance. The default ("live") carries its
                running mean from one utterance into the next, so the same files scored 79% and 88% in
                two runs depending on what was decoded before them.
  reinit_feat() before every utterance: the front end's noise-removal statistics also persist across
                utterances (one transcript in 40 changed with the order); a fresh feature extractor per
                utterance gives exactly what a newly built decoder gives, for ~0.1 ms instead of ~0.5 s.

wer() is the corpus-level word error rate after zipper_cli.text_norm.normalize_text on both sides.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Sequence

import numpy as np

from .errors import ZipperError
from .text_norm import normalize_text

SAMPLE_RATE = 16_000
PIP_LINE = "pip install pocketsphinx"


def _import_pocketsphinx():
    try:
        import pocketsphinx
    except ImportError as e:
        raise ZipperError(f"the pocketsphinx judge needs the pocketsphinx package ({e}); install it with "
                          f"`{PIP_LINE}` (its wheel ships the English model)") from None
    return pocketsphinx


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class PocketsphinxJudge:
    """Transcribes 16 kHz mono float32 audio with pocketsphinx's bundled en-us model.

    Deterministic: every utterance is decoded with batch CMN and a fresh feature extractor, so a
    transcript depends only on that utterance's samples, never on what was decoded before.
    """

    name = "pocketsphinx"

    def __init__(self, workers: int | None = None) -> None:
        """workers: processes for transcribe_many (default: the CPUs this process may use)."""
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = workers
        ps = _import_pocketsphinx()
        self._decoder = ps.Decoder(samprate=SAMPLE_RATE, cmn="batch", loglevel="FATAL")
        cfg = self._decoder.config
        model = "/".join(str(cfg["hmm"]).rstrip("/").split("/")[-2:])  # e.g. en-us/en-us
        lm = str(cfg["lm"]).rstrip("/").split("/")[-1]
        self.model = f"{model} ({lm})"
        self.version = f"pocketsphinx {_package_version('pocketsphinx')}, model {self.model}, cmn=batch"

    def transcribe(self, wav16k: np.ndarray) -> str:
        """Lowercase words separated by single spaces ("" when nothing is recognised)."""
        wav = np.asarray(wav16k, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"judge expects 1-D mono 16 kHz audio, got shape {wav.shape}")
        wav = np.nan_to_num(wav, nan=0.0, posinf=0.0, neginf=0.0)
        pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
        d = self._decoder
        d.reinit_feat()  # fresh front-end state (noise statistics, CMN) for every utterance
        d.start_utt()
        if pcm:
            d.process_raw(pcm, no_search=False, full_utt=True)
        d.end_utt()
        hyp = d.hyp()
        text = hyp.hypstr if hyp is not None else ""
        return " ".join(text.lower().split())

    def transcribe_many(self, wavs: Sequence[np.ndarray]) -> list[str]:
        """Transcripts in order. Spread over `workers` processes, each with its own decoder: a transcript
        depends only on its utterance, so the result is the same as one by one."""
        n = min(self.workers, len(wavs) // _MIN_PER_WORKER)
        if n <= 1:
            return [self.transcribe(w) for w in wavs]
        # fork: no re-import of the caller; the children run pocketsphinx only, never torch.
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(n, initializer=_init_worker) as pool:
            return pool.map(_transcribe_in_worker, wavs, chunksize=max(1, len(wavs) // (4 * n)))

    def info(self) -> dict:
        """For reports: what judged the audio."""
        return {"name": self.name, "version": self.version, "model": self.model}


_MIN_PER_WORKER = 8  # fewer utterances per process than this: not worth starting processes
_WORKER_JUDGE: PocketsphinxJudge | None = None


def _init_worker() -> None:
    global _WORKER_JUDGE
    _WORKER_JUDGE = PocketsphinxJudge(workers=1)


def _transcribe_in_worker(wav: np.ndarray) -> str:
    return _WORKER_JUDGE.transcribe(wav)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level WER (jiwer) after normalize_text on both sides; empty references are skipped."""
    import jiwer

    if len(refs) != len(hyps):
        raise ValueError(f"wer(): {len(refs)} references but {len(hyps)} hypotheses")
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(refs, hyps)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        raise ValueError("wer(): no non-empty references")
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))
