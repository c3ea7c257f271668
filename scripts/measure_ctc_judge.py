#!/usr/bin/env python
"""Measure the CTC judge on a corpus manifest: train on the aligned role, score dev and test, time it.

  .venv/bin/python scripts/measure_ctc_judge.py [--manifest /tmp/zipper-cache-demo/demo-*/manifest.jsonl]
      [--out /tmp/ctc-judge-measure] [--threads 2] [--steps 1200] [--lr 2e-3] [--layers 6] ...

Every CTCJudgeConfig field is a flag (--time-masks 0 turns SpecAugment's time masks off, ...).
Prints one JSON object: config, parameters, training time, dev and test WER/CER, the real-time factor
of transcription (wall seconds per audio second, batched and one utterance at a time) and, when the
pocketsphinx judge is installed and --pocketsphinx is given, its WER on the same test audio.

The output directory is reused: a finished judge with the same config is loaded, not retrained
(--fresh deletes it first). Outputs are measurements only; nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from zipper_cli.atomic import read_jsonl  # noqa: E402
from zipper_cli.audio import read_audio  # noqa: E402
from zipper_cli.ctc_judge import CTCJudgeConfig, load_ctc_judge, train_ctc_judge  # noqa: E402
from zipper_cli.metrics import score  # noqa: E402
from zipper_cli.text_norm import normalize_text  # noqa: E402


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(field: dataclasses.Field):
    name = field.type if isinstance(field.type, str) else field.type.__name__
    return {"int": int, "float": float, "str": str, "bool": _bool}[name]


def griffin_lim(wav):
    """wav -> 80-bin power mel (25 ms / 10 ms) -> pseudo-inverse linear spectrogram -> Griffin-Lim (32 iterations,
    seeded): the kind of audio a mel vocoder makes, to see how the judge holds up off its training audio."""
    import torchaudio

    torch.manual_seed(0)
    x = torch.from_numpy(wav)
    to_mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=80)
    mel = to_mel(x)  # [80, T]
    fb = to_mel.mel_scale.fb  # [201, 80]; 80 bins over 201 STFT bins leave some filters empty: pinv, not lstsq
    spec = (torch.linalg.pinv(fb.T) @ mel).clamp_min(0.0)
    out = torchaudio.transforms.GriffinLim(n_fft=400, hop_length=160, power=2.0, length=x.numel())(spec)
    return (0.9 * out / out.abs().max().clamp_min(1e-6)).numpy().astype("float32")


def main() -> None:
    demo = sorted(glob.glob("/tmp/zipper-cache-demo/demo-*/manifest.jsonl"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=demo[0] if demo else None,
                    help="JSONL rows with id, role (aligned/dev/test), text, audio [, start, end]")
    ap.add_argument("--out", default="/tmp/ctc-judge-measure", help="judge directory (reused when finished)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    ap.add_argument("--train-limit", type=int, default=0, help="use only the first N aligned utterances")
    ap.add_argument("--pocketsphinx", action="store_true", help="also score the test audio with pocketsphinx")
    ap.add_argument("--resynth", action="store_true",
                    help="also score test audio resynthesised from its 80-bin mel by Griffin-Lim (vocoder-like audio)")
    ap.add_argument("--load", metavar="DIR", help="score the judge already trained in DIR instead of training")
    for f in dataclasses.fields(CTCJudgeConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=_flag_type(f), default=None)
    args = ap.parse_args()
    if not args.manifest:
        sys.exit("measure_ctc_judge: no --manifest given and no demo corpus cached under /tmp/zipper-cache-demo")
    torch.set_num_threads(args.threads)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(CTCJudgeConfig) if getattr(args, f.name) is not None}
    cfg = CTCJudgeConfig(**overrides)
    cfg.validate()

    rows = read_jsonl(args.manifest)
    base = Path(args.manifest).parent

    def load(role: str, limit: int = 0):
        rs = [r for r in rows if r.get("role") == role and r.get("audio") and r.get("text")]
        if limit:
            rs = rs[:limit]
        out = []
        for r in rs:
            path = r["audio"] if Path(r["audio"]).is_absolute() else str(base / r["audio"])
            out.append((read_audio(path, start=r.get("start"), end=r.get("end")), r["text"]))
        return out

    t0 = time.time()
    train = [] if args.load else load("aligned", args.train_limit)
    dev, test = load("dev"), load("test")
    read_seconds = time.time() - t0
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.load:
        judge = load_ctc_judge(args.load)
        cfg = judge.cfg
    else:
        cpu0 = time.process_time()
        judge = train_ctc_judge(train, dev, cfg, out, log=log)
        train_cpu = time.process_time() - cpu0  # CPU seconds: what an unloaded machine would take per thread
    meta = judge.meta

    def evaluate(pairs):
        wavs = [w for w, _ in pairs]
        audio_s = sum(w.size for w in wavs) / 16000
        t = time.time()
        hyps = judge.transcribe_many(wavs)
        batched = time.time() - t
        s = score([t for _, t in pairs], hyps)
        return {"wer": round(s.wer, 4), "cer": round(s.cer, 4), "utterances": s.utterances,
                "audio_seconds": round(audio_s, 1), "rtf_batched": round(batched / audio_s, 5)}, hyps

    dev_score, _ = evaluate(dev)
    test_score, test_hyps = evaluate(test)
    t = time.time()
    single = [judge.transcribe(w) for w, _ in test[:50]]
    single_s = time.time() - t
    test_score["rtf_single"] = round(single_s / (sum(w.size for w, _ in test[:50]) / 16000), 5)
    test_score["single_equals_batched"] = single == test_hyps[:50]
    errors = [(r, h) for (_, r), h in zip(test, test_hyps) if normalize_text(r) != h][:8]
    result = {"manifest": args.manifest, "threads": args.threads, "config": cfg.to_dict(), "version": judge.version,
              "params": meta["params"], "train_utterances": meta["train_utterances"], "train_hours": meta["train_hours"],
              "train_seconds": meta["train_seconds"], "feature_seconds": meta["feature_seconds"],
              "epochs": meta["epochs"], "read_seconds": round(read_seconds, 1), "dev": dev_score, "test": test_score,
              "example_test_errors": [{"ref": r, "hyp": h} for r, h in errors]}
    if not args.load:
        result["train_cpu_seconds"] = round(train_cpu, 1)  # features + training + dev evaluations
    if args.resynth:
        resynth = [(griffin_lim(w), t) for w, t in test]
        s, _ = evaluate(resynth)
        result["test_griffin_lim"] = {k: s[k] for k in ("wer", "cer")}
        if args.pocketsphinx:
            from zipper_cli.judges import PocketsphinxJudge

            s = score([t for _, t in resynth], PocketsphinxJudge().transcribe_many([w for w, _ in resynth]))
            result["pocketsphinx_test_griffin_lim"] = {"wer": round(s.wer, 4), "cer": round(s.cer, 4)}
    if args.pocketsphinx:
        from zipper_cli.judges import PocketsphinxJudge

        ps = PocketsphinxJudge()
        t = time.time()
        ps_hyps = ps.transcribe_many([w for w, _ in test])
        s = score([t for _, t in test], ps_hyps)
        result["pocketsphinx_test"] = {"wer": round(s.wer, 4), "cer": round(s.cer, 4),
                                       "rtf": round((time.time() - t) / test_score["audio_seconds"], 5)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
