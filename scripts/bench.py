#!/usr/bin/env python
"""Benchmarks, reported as ratios against references measured in the same run.

  .venv/bin/python scripts/bench.py tokenize [--seconds 120] [--units 512] [--frame-rate 25]

tokenize: real-time factor (audio seconds per wall second) of the default speech tokenizer, split into
audio decoding, features and unit assignment on one thread, then the whole read+encode path with 1 and
2 worker processes. Target: features + assignment >= 500x real time on one core.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def festival_audio(out_dir: Path, seconds: float) -> list[Path]:
    """Real synthesized speech (Festival), enough for `seconds` of audio; cached in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    have = sorted(out_dir.glob("*.wav"))
    if have:
        return have
    if not shutil.which("festival"):
        sys.exit("bench: festival is not installed (apt-get install -y festival festvox-kallpc16k)")
    from zipper_cli.corpora.demo_text import generate_sentences  # noqa: WPS433 (bench only)

    n = max(4, int(seconds / 2.5))
    script = ["(voice_kal_diphone)"]
    for i, s in enumerate(generate_sentences(n, seed=123)):
        script.append(f'(utt.save.wave (utt.synth (Utterance Text "{s}")) "{out_dir}/b{i:05d}.wav" \'riff)')
    scm = out_dir / "bench.scm"
    scm.write_text("\n".join(script) + "\n")
    subprocess.run(["festival", "-b", str(scm)], check=True, capture_output=True)
    return sorted(out_dir.glob("*.wav"))


def _encode_file(args):
    path, tok_dir = args
    from zipper_cli.audio import read_audio
    from zipper_cli.speech_tokenizer import SpeechTokenizer

    global _TOK
    if "_TOK" not in globals():
        torch.set_num_threads(1)
        _TOK = SpeechTokenizer.load(Path(tok_dir))
    wav = read_audio(str(path))
    return _TOK.encode(wav).size, wav.size / 16000


def bench_tokenize(args) -> dict:
    from zipper_cli.audio import read_audio
    from zipper_cli.speech_tokenizer import SpeechTokenizerConfig, features, fit_speech_tokenizer

    torch.set_num_threads(1)
    files = festival_audio(Path(tempfile.gettempdir()) / "zipper-bench-audio", args.seconds)
    cfg = SpeechTokenizerConfig(k=args.units, frame_rate=args.frame_rate)

    t = time.perf_counter()
    wavs = [read_audio(str(f)) for f in files]
    t_read = time.perf_counter() - t
    audio_s = sum(w.size for w in wavs) / 16000

    tok = fit_speech_tokenizer(cfg, wavs, log=lambda *_: None)
    features(cfg, wavs[0])  # warm-up
    t = time.perf_counter()
    feats = [features(cfg, w) for w in wavs]
    t_feat = time.perf_counter() - t
    t = time.perf_counter()
    for f in feats:
        tok.encode_features(f)
    t_assign = time.perf_counter() - t

    tok_dir = Path(tempfile.mkdtemp(prefix="zipper-bench-tok-"))
    tok.save(tok_dir)
    pool_rtf = {}
    for workers in (1, 2):
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_encode_file, [(files[0], str(tok_dir))] * workers)  # start and warm the workers
            t = time.perf_counter()
            pool.map(_encode_file, [(f, str(tok_dir)) for f in files], chunksize=4)
            pool_rtf[workers] = audio_s / (time.perf_counter() - t)
    result = {
        "audio_seconds": round(audio_s, 1), "files": len(files), "units": args.units, "frame_rate": args.frame_rate,
        "rtf_decode_1thread": round(audio_s / t_read, 1),
        "rtf_features_1thread": round(audio_s / t_feat, 1),
        "rtf_assign_1thread": round(audio_s / t_assign, 1),
        "rtf_features_plus_assign_1thread": round(audio_s / (t_feat + t_assign), 1),
        "rtf_end_to_end_1_worker": round(pool_rtf[1], 1),
        "rtf_end_to_end_2_workers": round(pool_rtf[2], 1),
        "speedup_2_vs_1_workers": round(pool_rtf[2] / pool_rtf[1], 2),
        "target_features_plus_assign": 500,
    }
    result["meets_target"] = result["rtf_features_plus_assign_1thread"] >= 500
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tokenize")
    t.add_argument("--seconds", type=float, default=120.0)
    t.add_argument("--units", type=int, default=512)
    t.add_argument("--frame-rate", type=int, default=25)
    args = p.parse_args()
    result = {"tokenize": bench_tokenize}[args.what](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
