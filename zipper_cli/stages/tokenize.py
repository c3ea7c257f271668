"""`zipper tokenize`: corpora -> manifests, rejects, text and speech tokenizers, token shards.

Restartable: the speech tokenizer fit is reused when its inputs are unchanged, and finished token
shards are kept (checked by ids and tokenizer checksums), so an interrupted run resumes where it was.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import sha256_json, write_json, write_jsonl
from ..audio import AudioLimits, AudioReject, read_audio
from ..console import console, log, progress
from ..corpora.collect import NEEDS_AUDIO, clean_rows, collect_rows
from ..corpora.sources import ROLES
from ..errors import ZipperError
from ..rundir import config_dict, init_run_dir, open_stage
from ..shards import Shard, read_shard, write_index, write_shard
from ..speech_tokenizer import SpeechTokenizer, SpeechTokenizerConfig, fit_speech_tokenizer
from ..text_tokenizer import TextTokenizer, TextTokenizerConfig, train_text_tokenizer

ROLE_FILES = {"text": "train-text", "speech": "train-speech", "aligned": "aligned", "dev": "dev", "test": "test"}


@dataclass(frozen=True)
class TokenizeConfig:
    """Everything `zipper tokenize` reads; all but `workers` and `cache_dir` change its artifacts."""

    corpus: tuple[str, ...] = ("demo",)
    """--corpus: one or more of demo, english, librispeech:DIR, kaldi:DIR@ROLE, manifest:FILE.jsonl[@ROLE]."""
    n_text: int | None = None
    """--n-text: text-only sentences in a built-in corpus (None: the corpus default)."""
    n_speech: int | None = None
    """--n-speech: audio-only utterances in a built-in corpus."""
    n_aligned: int | None = None
    """--n-aligned: (audio, transcript) pairs in a built-in corpus."""
    n_dev: int | None = None
    """--n-dev: dev pairs in a built-in corpus."""
    n_test: int | None = None
    """--n-test: test pairs in a built-in corpus."""
    corpus_seed: int = 0
    """--corpus-seed: seed of the built-in corpora's sentences and voices."""
    voices: str = "default"
    """--voices: voice mix of the built-in corpora (see corpora/synth.py)."""
    subset_roles: tuple[str, ...] = ()
    """--subset-role NAME=ROLE: LibriSpeech/LibriTTS subset to role (default: test*/dev* by name, else aligned)."""
    text_files: tuple[str, ...] = ()
    """--text-file: extra text-only data, one sentence per line, added to the text role."""
    limits: AudioLimits = AudioLimits()
    """--min-seconds / --max-seconds: audio outside them is rejected."""
    max_text_words: int = 100
    """--max-text-words: longer transcripts are rejected."""
    text: TextTokenizerConfig = TextTokenizerConfig()
    speech: SpeechTokenizerConfig = SpeechTokenizerConfig()
    shard_size: int = 2000
    """--shard-size: utterances per token shard (the unit of resumption)."""
    workers: int = 1
    """--workers: processes for audio decoding, features and unit assignment (does not change outputs)."""
    cache_dir: str | None = None
    """--cache-dir: where built-in corpora are built once and reused (default $ZIPPER_CACHE or ~/.cache/zipper)."""

    def validate(self) -> None:
        if self.workers < 1:
            raise ZipperError(f"--workers must be >= 1 (got {self.workers})")
        if self.shard_size < 1:
            raise ZipperError(f"--shard-size must be >= 1 (got {self.shard_size})")
        if not 0 < self.limits.min_seconds < self.limits.max_seconds:
            raise ZipperError(f"--min-seconds ({self.limits.min_seconds}) must be > 0 and below --max-seconds ({self.limits.max_seconds})")
        if self.max_text_words < 1:
            raise ZipperError(f"--max-text-words must be >= 1 (got {self.max_text_words})")
        self.text.validate()
        self.speech.validate()

    def marker_config(self) -> dict:
        d = config_dict(self)
        d.pop("workers")
        d.pop("cache_dir")
        return d


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZIPPER_CACHE") or Path.home() / ".cache" / "zipper")


def tokenize(run_dir: Path, cfg: TokenizeConfig, force: bool = False) -> dict | None:
    """Run the stage; returns the summary, or None when it was already done."""
    cfg.validate()
    run_dir = init_run_dir(Path(run_dir))
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    # Build or reuse the corpus before opening the stage: the inputs' checksums are part of the marker.
    rows, rejects, inputs = collect_rows(cfg, cache_dir, log)
    with open_stage(run_dir, "tokenize", cfg.marker_config(), inputs, force=force, log=log) as stage:
        if stage is None:
            return None
        rows, more = clean_rows(rows, cfg.max_text_words)
        rejects += more
        if not rows:
            write_jsonl(run_dir / "data" / "rejects.jsonl", rejects)
            raise ZipperError(f"no usable utterances in {', '.join(cfg.corpus)}; "
                              f"see the reasons in {run_dir / 'data' / 'rejects.jsonl'}")
        text_tok = _text_tokenizer(run_dir, cfg, rows)
        speech_tok = _speech_tokenizer(run_dir, cfg, rows, inputs)
        kept, audio_rejects = _write_shards(run_dir, cfg, rows, text_tok, speech_tok)
        rejects += audio_rejects
        summary = _write_manifests(run_dir, kept, rejects)
        _print_summary(summary)
        stage.finish(outputs=summary, extra={"text_tokenizer": text_tok.checksum,
                                             "speech_tokenizer": speech_tok.checksum if speech_tok else None})
        return summary


def _text_tokenizer(run_dir: Path, cfg: TokenizeConfig, rows: list[dict]) -> TextTokenizer:
    # Trained on all training text: the text role and the aligned transcripts (never dev or test).
    sentences = [r["norm"] for r in rows if r["role"] in ("text", "aligned")]
    if not sentences:
        raise ZipperError("no training text: the corpora give no text or aligned rows to train the text tokenizer")
    log(f"[tokenize] training the text tokenizer on {len(sentences)} sentences")
    return train_text_tokenizer(cfg.text, sentences, Path(run_dir) / "tokenizers" / "text")


def _speech_tokenizer(run_dir: Path, cfg: TokenizeConfig, rows: list[dict], inputs: dict) -> SpeechTokenizer | None:
    audio_rows = [r for r in rows if r["role"] in NEEDS_AUDIO]
    if not audio_rows:
        return None
    out_dir = Path(run_dir) / "tokenizers" / "speech"
    fit_rows = [r for r in audio_rows if r["role"] in ("speech", "aligned")] or audio_rows
    random.Random(cfg.speech.seed).shuffle(fit_rows)
    key = sha256_json({"speech": config_dict(cfg.speech), "inputs": inputs, "limits": config_dict(cfg.limits),
                       "fit_ids": [r["id"] for r in fit_rows]})
    fit_json = out_dir / "fit.json"
    if fit_json.exists() and (out_dir / "tokenizer.json").exists():
        if json.loads(fit_json.read_text()).get("key") == key:
            log("[tokenize] reusing the speech tokenizer fitted on these inputs")
            return SpeechTokenizer.load(out_dir)

    frames_per_second = {"encodec": 75.0, "ssl-kmeans": 50.0}.get(cfg.speech.kind, float(cfg.speech.frame_rate))
    encoder = _ctc_encoder(out_dir / "encoder", cfg, audio_rows, key) if cfg.speech.kind == "ctc-kmeans" else None

    def wavs():
        # Read just enough audio for max_fit_frames, in a seeded order; bad files are skipped here
        # and rejected with their reason by the encoding pass.
        frames = 0
        for r in fit_rows:
            try:
                wav = read_audio(r["audio"], cfg.limits, r.get("start"), r.get("end"))
            except AudioReject:
                continue
            yield wav
            frames += wav.size / 16000 * frames_per_second
            if frames >= cfg.speech.max_fit_frames:
                return

    log(f"[tokenize] fitting the {cfg.speech.kind} speech tokenizer (K={cfg.speech.k}) on up to "
        f"{cfg.speech.max_fit_frames} frames")
    tok = fit_speech_tokenizer(cfg.speech, wavs(), log=log, encoder=encoder)
    tok.save(out_dir)
    write_json(fit_json, {"key": key})
    return SpeechTokenizer.load(out_dir)


def _ctc_encoder(out_dir: Path, cfg: TokenizeConfig, audio_rows: list[dict], key: str):
    """The ctc-kmeans encoder: a CTC character recogniser trained (or resumed) in out_dir on the aligned
    role's audio and transcripts, with the dev role for its progress lines. Strided to the unit rate.
    out_dir/fit.json holds the tokenizer's fit key: an encoder of other inputs or settings is removed."""
    import shutil

    from ..ctc_judge import read_pairs
    from ..ctc_judge_model import CTCJudgeConfig
    from ..ctc_judge_train import train_ctc_judge

    marker = out_dir / "fit.json"
    if out_dir.exists() and (not marker.exists() or json.loads(marker.read_text()).get("key") != key):
        log(f"[tokenize] {out_dir} was trained for other inputs or settings; retraining it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"key": key})

    def pairs(role):  # the judge's code reads and trains the encoder; its log lines name the encoder
        return read_pairs([r for r in audio_rows if r["role"] == role], f"the {role} role", log, cfg.limits,
                          name="ctc-encoder")

    train = pairs("aligned")
    if not train:
        raise ZipperError("--speech-tokenizer ctc-kmeans: its encoder learns from the aligned role (audio with "
                          "transcripts), and the corpora give none")
    ccfg = CTCJudgeConfig(subsample=100 // cfg.speech.frame_rate, steps=cfg.speech.ctc_encoder_steps,
                          seed=cfg.speech.seed)
    log(f"[tokenize] training the ctc-kmeans encoder on {len(train)} aligned utterances")
    try:
        return train_ctc_judge(train, pairs("dev"), ccfg, out_dir, log=log, name="ctc-encoder")
    except ZipperError as e:
        raise ZipperError(f"--speech-tokenizer ctc-kmeans encoder: {e}") from None


# One tokenizer per worker process, loaded once by the pool initializer.
_WORKER: dict = {}


def _init_worker(tok_dir: str | None, limits: AudioLimits) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER["tok"] = SpeechTokenizer.load(Path(tok_dir)) if tok_dir else None
    _WORKER["limits"] = limits


def _encode_audio(row: dict) -> tuple[np.ndarray | None, float, dict | None]:
    try:
        wav = read_audio(row["audio"], _WORKER["limits"], row.get("start"), row.get("end"))
        return _WORKER["tok"].encode(wav), wav.size / 16000, None
    except AudioReject as e:
        return None, 0.0, {"source": row["source"], "id": row["id"], "reason": e.reason, "detail": e.detail}


def _write_shards(run_dir: Path, cfg: TokenizeConfig, rows: list[dict], text_tok: TextTokenizer,
                  speech_tok: SpeechTokenizer | None) -> tuple[list[dict], list[dict]]:
    """Encode every row into shards per role; reuse shards finished by an interrupted run."""
    tok_dir = str(Path(run_dir) / "tokenizers" / "speech") if speech_tok else None
    speech_sum = speech_tok.checksum if speech_tok else ""
    by_role = {role: [r for r in rows if r["role"] == role] for role in ROLES}
    todo = sum(len(v) for v in by_role.values())
    kept, rejects = [], []
    pool = None
    try:
        with progress() as bar:
            task = bar.add_task("[tokenize] units", total=todo)
            for role, role_rows in by_role.items():
                role_dir = Path(run_dir) / "tokens" / role
                names = []
                for start in range(0, len(role_rows), cfg.shard_size):
                    chunk = role_rows[start:start + cfg.shard_size]
                    name = f"shard-{start // cfg.shard_size:05d}.npz"
                    names.append(name)
                    shard = _reuse_shard(role_dir / name, chunk, text_tok.checksum, speech_sum)
                    if shard is None:
                        if pool is None and any(r["role"] in NEEDS_AUDIO for r in chunk):
                            pool = _start_workers(cfg.workers, tok_dir, cfg.limits)
                        shard = _encode_chunk(chunk, pool, text_tok, speech_sum, text_tok.checksum)
                        write_shard(role_dir / name, shard)
                    rejects += shard.rejects
                    good = dict(zip(shard.ids, shard.durations))
                    kept += [dict(r, duration=round(good[r["id"]], 3)) for r in chunk if r["id"] in good]
                    bar.advance(task, len(chunk))
                write_index(role_dir, {"role": role, "shards": names, "utterances": sum(1 for r in kept if r["role"] == role),
                                       "text_tokenizer": text_tok.checksum, "speech_tokenizer": speech_sum,
                                       "text_vocab": text_tok.vocab_size,
                                       "speech_vocab": speech_tok.vocab_size if speech_tok else 0,
                                       "frame_rate": speech_tok.frame_rate if speech_tok else None})
    finally:
        if pool not in (None, "inline"):
            pool.close()
            pool.join()
    return kept, rejects


def _start_workers(workers: int, tok_dir: str | None, limits: AudioLimits):
    """A process pool for audio work, or "inline" to do it in this process (one worker)."""
    if workers == 1:
        _init_worker(tok_dir, limits)
        return "inline"
    return mp.get_context("spawn").Pool(workers, _init_worker, (tok_dir, limits))


def _reuse_shard(path: Path, chunk: list[dict], text_sum: str, speech_sum: str) -> Shard | None:
    if not path.exists():
        return None
    try:
        shard = read_shard(path)
    except ZipperError:
        return None
    expected = [r["id"] for r in chunk]
    done = set(shard.ids) | {x["id"] for x in shard.rejects}
    if shard.text_tok != text_sum or shard.speech_tok != speech_sum or set(expected) != done:
        return None
    return shard


def _encode_chunk(chunk: list[dict], pool, text_tok: TextTokenizer, speech_sum: str, text_sum: str) -> Shard:
    audio_rows = [r for r in chunk if r["role"] in NEEDS_AUDIO]
    if not audio_rows:
        results = []
    elif pool == "inline":
        results = map(_encode_audio, audio_rows)
    else:
        results = pool.imap(_encode_audio, audio_rows, chunksize=4)
    by_id = {r["id"]: res for r, res in zip(audio_rows, results)}
    shard = Shard([], [], [], [], text_sum, speech_sum, [])
    for r in chunk:
        units, seconds, reject = by_id.get(r["id"], (None, 0.0, None))
        if reject:
            shard.rejects.append(reject)
            continue
        shard.ids.append(r["id"])
        shard.text.append(np.array(text_tok.sp.encode(r["norm"]), dtype=np.int32) if r["norm"] else None)
        shard.speech.append(units)
        shard.durations.append(seconds)
    return shard


def _write_manifests(run_dir: Path, kept: list[dict], rejects: list[dict]) -> dict:
    data = Path(run_dir) / "data"
    fields = ("id", "audio", "start", "end", "text", "norm", "duration", "speaker", "source")
    summary = {"roles": {}, "rejects": dict(Counter(r["reason"] for r in rejects))}
    for role, fname in ROLE_FILES.items():
        role_rows = [{k: r.get(k) for k in fields} for r in kept if r["role"] == role]
        write_jsonl(data / f"{fname}.jsonl", role_rows)
        summary["roles"][role] = {"utterances": len(role_rows),
                                  "hours": round(sum(r["duration"] or 0 for r in role_rows) / 3600, 4)}
    write_jsonl(data / "rejects.jsonl", sorted(rejects, key=lambda r: (r["source"], str(r["id"]))))
    return summary


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="zipper tokenize")
    for col in ("role", "utterances", "hours"):
        table.add_column(col, justify="left" if col == "role" else "right")
    for role, s in summary["roles"].items():
        table.add_row(role, str(s["utterances"]), f"{s['hours']:.3f}")
    console.print(table)
    if summary["rejects"]:
        rt = Table(title="rejects (data/rejects.jsonl)")
        rt.add_column("reason")
        rt.add_column("count", justify="right")
        for reason, n in sorted(summary["rejects"].items()):
            rt.add_row(reason, str(n))
        console.print(rt)
    else:
        log("no rejects")
