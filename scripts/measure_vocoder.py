#!/usr/bin/env python
"""Measure the unit vocoder's intelligibility with ASR judges; prints one JSON result.

Two modes.

--run-dir RUN (what `zipper decode` / `zipper eval` use): the run's own speech tokenizer and gold test
units (tokens/test), the run's vocoder (ensure_vocoder: trained into RUN/tokenizers/speech/vocoder/ on
first need with VocoderConfig defaults, or the flags given), the whole test split (data/test.jsonl; with
--splits test,dev the dev split too). Judges: pocketsphinx, and with --ctc the run's CTC judge
(ensure_ctc_judge: RUN/judges/ctc, trained on the aligned role if missing). Reports per judge the WER on
the original audio and on audio resynthesised from the gold units, and their ratio against --target (the
issue's 1.3) with its 95% interval over resampled utterances. With --mix, also audio that
tells where the loss is (each through the same Griffin-Lim): the true log-mel; its envelope alone (the
first --cepstra mel-cepstral coefficients); the true log-mel averaged over runs of 2 and 4 frames (what
a vocoder that knew the true spectrum, but only at a 50 or 25 Hz unit rate, would give), and the 25 Hz
averages interpolated linearly between run centres (the same knowledge, without the steps); and the
predicted and true log-mel with their envelopes swapped.

  .venv/bin/python scripts/measure_vocoder.py --run-dir /tmp/runs/voc-exp --ctc --threads 1
  .venv/bin/python scripts/measure_vocoder.py --run-dir /tmp/runs/voc-exp --ctc --mix --steps 1500

--corpus DIR (vocoder experiments without a run; pocketsphinx only):
  1. fit a mel-kmeans speech tokenizer (default K=512, 25 Hz) on the corpus's speech + aligned audio
     (cached in --work-dir by its settings),
  2. train the unit vocoder on (units, audio) pairs of those roles (cached/resumed in --work-dir),
  3. on held-out test utterances (Festival voices only by default), judge with pocketsphinx:
       original   the test audio itself
       gl_true    Griffin-Lim from the audio's true (unquantised) log-mel
       vocoder    the vocoder from the gold units (the audio's own units)
     and report each WER, the ratio vocoder/original against --target (1.3), training time and the
     resynthesis real-time factor.

Example (the demo corpus cached by `zipper tokenize --corpus demo`):
  .venv/bin/python scripts/measure_vocoder.py --corpus /tmp/zipper-cache-demo/demo-d5677c937c3b
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zipper_cli.atomic import sha256_json  # noqa: E402
from zipper_cli.audio import read_audio  # noqa: E402
from zipper_cli.judges import PocketsphinxJudge, wer  # noqa: E402
from zipper_cli.metrics import bootstrap_ratio, utterance_errors  # noqa: E402
from zipper_cli.speech_features import log_mel  # noqa: E402
from zipper_cli.speech_tokenizer import SpeechTokenizer, SpeechTokenizerConfig, fit_speech_tokenizer  # noqa: E402
from zipper_cli.text_norm import normalize_text  # noqa: E402
from zipper_cli.vocoder import VocoderConfig, griffin_lim, rank_speakers, train_vocoder  # noqa: E402
from zipper_cli.vocoder_train import mel_cepstrum_basis  # noqa: E402


def parse_args() -> argparse.Namespace:
    d = VocoderConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run-dir", help="a tokenized run: its tokenizer, vocoder, judges and test split")
    mode.add_argument("--corpus", help="directory with manifest.jsonl (id, role, text, audio)")
    p.add_argument("--ctc", action="store_true", help="--run-dir: also judge with the run's CTC judge")
    p.add_argument("--target", type=float, default=1.3, help="target ratio resynthesis WER / original WER")
    p.add_argument("--work-dir", default="/tmp/zipper-measure-vocoder", help="tokenizer and vocoder cache")
    p.add_argument("--k", type=int, default=512, help="k-means units")
    p.add_argument("--frame-rate", type=int, default=25, choices=(100, 50, 25), help="unit rate (Hz)")
    p.add_argument("--train-utts", type=int, default=3000, help="speech+aligned utterances for the vocoder")
    p.add_argument("--fit-utts", type=int, default=6000, help="speech+aligned utterances the tokenizer reads")
    p.add_argument("--test-utts", type=int, default=None,
                   help="held-out test utterances to judge (default: 40 with --corpus, all with --run-dir)")
    p.add_argument("--splits", default="test",
                   help="--run-dir: held-out splits to judge, comma-separated (test,dev doubles the utterances: "
                   "a narrower interval for the ratio)")
    p.add_argument("--all-voices", action="store_true", help="judge espeak test voices too (default: Festival only)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--averaged-voice", action="store_true",
                   help="train the vocoder without its speaker embedding (by_speaker=False): one averaged voice")
    p.add_argument("--max-utterances", type=int, default=d.max_utterances, help="--run-dir: vocoder training sample")
    p.add_argument("--channels", type=int, default=d.channels)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--kernel-size", type=int, default=d.kernel_size)
    p.add_argument("--dilations", default=",".join(map(str, d.dilations)), help="comma-separated, e.g. 1,2,4")
    p.add_argument("--post-layers", type=int, default=d.post_layers)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--segment-seconds", type=float, default=d.segment_seconds)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--envelope-weight", type=float, default=d.envelope_weight,
                   help="weight of the vocoder's envelope (mel-cepstrum) L1; 0: log-mel L1 alone")
    p.add_argument("--envelope-cepstra", type=int, default=d.envelope_cepstra)
    p.add_argument("--gl-iters", type=int, default=d.gl_iters)
    p.add_argument("--gl-momentum", type=float, default=d.gl_momentum)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--lookup-baseline", action="store_true",
                   help="also judge the per-cluster mean log-mel lookup (each unit -> its cluster's mean frames)")
    p.add_argument("--skip-gl-true", action="store_true", help="do not judge Griffin-Lim from the true log-mel")
    p.add_argument("--dump", help="also write per-utterance transcripts to this JSONL file")
    p.add_argument("--mix", action="store_true",
                   help="--run-dir: also judge the true log-mel, its envelope alone, its 50 and 25 Hz averages, "
                        "and the predicted and true log-mel with envelopes swapped (where intelligibility is lost)")
    p.add_argument("--cepstra", type=int, default=20, help="--mix: mel-cepstral coefficients kept as the envelope")
    a = p.parse_args()
    if not a.splits or not set(a.splits.split(",")) <= {"test", "dev"}:
        p.error(f"--splits {a.splits!r}: held-out splits are test and dev (comma-separated)")
    return a


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cluster_means(pairs, k: int, up: int, n_mels: int) -> torch.Tensor:
    """[k, up, n_mels] mean un-normalised log-mel frames of each unit over the training pairs."""
    total, count = torch.zeros(k, up * n_mels, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for units, wav in pairs:
        lm = log_mel(wav, n_mels)
        n = min(len(units), lm.shape[0] // up)
        idx = torch.as_tensor(np.asarray(units[:n], dtype=np.int64))
        total.index_add_(0, idx, lm[:n * up].reshape(n, up * n_mels).double())
        count.index_add_(0, idx, torch.ones(n, dtype=torch.float64))
    mean = total / count.clamp_min(1)[:, None]
    mean[count == 0] = total.sum(0) / count.sum()
    return mean.float().view(k, up, n_mels)


def envelope(log_mel_frames: torch.Tensor, cepstra: int) -> torch.Tensor:
    """The spectral envelope of log-mel frames [T, n_mels]: their first `cepstra` mel-cepstral coefficients
    (the vocoder's envelope loss compares the same ones) transformed back; the rest (log-mel minus this) is
    the fine structure (harmonics, noise)."""
    basis = mel_cepstrum_basis(log_mel_frames.shape[-1], cepstra).double()  # [n_mels, cepstra], orthonormal columns
    return (log_mel_frames.double() @ basis @ basis.t()).to(log_mel_frames.dtype)


def unit_average(log_mel_frames: torch.Tensor, up: int) -> torch.Tensor:
    """Each run of `up` frames (one unit's) replaced by its mean frame; a shorter tail is kept as it is."""
    t = log_mel_frames.shape[0] // up * up
    blocks = log_mel_frames[:t].reshape(-1, up, log_mel_frames.shape[1])  # [units, up, n_mels]
    avg = blocks.mean(1, keepdim=True).expand_as(blocks).reshape(t, -1)
    return torch.cat([avg, log_mel_frames[t:]])


def unit_interpolate(log_mel_frames: torch.Tensor, up: int) -> torch.Tensor:
    """Each run of `up` frames' mean placed at the run's centre, frames in between interpolated linearly
    (held flat before the first centre and after the last); a shorter tail is kept as it is."""
    t = log_mel_frames.shape[0] // up * up
    if t == 0:
        return log_mel_frames.clone()
    means = log_mel_frames[:t].reshape(-1, up, log_mel_frames.shape[1]).mean(1)  # [units, n_mels]
    pos = (torch.arange(t, dtype=torch.float32) - (up - 1) / 2) / up  # frame position in units of centres
    pos = pos.clamp(0, means.shape[0] - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=means.shape[0] - 1)
    w = (pos - lo.float())[:, None]
    return torch.cat([means[lo] * (1 - w) + means[hi] * w, log_mel_frames[t:]])


def mix_conditions(pred: list[torch.Tensor], true: list[torch.Tensor], cepstra: int) -> dict:
    """--mix: log-mel frames per condition (each pair cut to its shorter length)."""
    pairs = [(p[:min(len(p), len(t))], t[:min(len(p), len(t))]) for p, t in zip(pred, true)]
    env = [(envelope(p, cepstra), envelope(t, cepstra)) for p, t in pairs]
    return {
        "gl_true": [t for _, t in pairs],
        "true_envelope": [et for _, et in env],
        "true_average_50hz": [unit_average(t, 2) for _, t in pairs],
        "true_average_25hz": [unit_average(t, 4) for _, t in pairs],
        "true_interpolated_25hz": [unit_interpolate(t, 4) for _, t in pairs],
        "pred_envelope+true_fine": [ep + t - et for (_, t), (ep, et) in zip(pairs, env)],
        "true_envelope+pred_fine": [et + p - ep for (p, _), (ep, et) in zip(pairs, env)],
    }


def ratio_spread(refs: list[str], original: list[str], vocoder: list[str], target: float) -> dict | None:
    """The resynthesis/original WER ratio's 95% interval over resampled utterances (10,000 paired draws, seed 0):
    with a few hundred test utterances the ratio moves by +-0.2, so one number alone cannot say whether the
    target is met. Empty references are skipped, as judges.wer does; None when the original audio has no errors
    (the ratio is undefined)."""
    keep = [i for i, r in enumerate(refs) if normalize_text(r)]
    refs, original, vocoder = ([x[i] for i in keep] for x in (refs, original, vocoder))
    if not keep:
        return None
    a = [e["errors"] for e in utterance_errors(refs, original)]
    if sum(a) == 0:
        return None
    return bootstrap_ratio(a, [e["errors"] for e in utterance_errors(refs, vocoder)], target)


def vocoder_config(a: argparse.Namespace, **shape) -> VocoderConfig:
    """The flags as a VocoderConfig; `shape` (vocab_size, frame_rate, n_mels) comes from the tokenizer."""
    return VocoderConfig(**shape, channels=a.channels, layers=a.layers, kernel_size=a.kernel_size,
                         dilations=tuple(int(x) for x in a.dilations.split(",")), post_layers=a.post_layers,
                         steps=a.steps, lr=a.lr, envelope_weight=a.envelope_weight,
                         envelope_cepstra=a.envelope_cepstra, batch_size=a.batch_size,
                         segment_seconds=a.segment_seconds,
                         gl_iters=a.gl_iters, gl_momentum=a.gl_momentum, max_utterances=a.max_utterances, seed=a.seed,
                         by_speaker=not a.averaged_voice)


def measure_run(a: argparse.Namespace) -> dict:
    """The run's vocoder on the run's test split: original vs resynthesised-from-gold-units WER per judge."""
    from zipper_cli.atomic import read_jsonl
    from zipper_cli.shards import load_role
    from zipper_cli.vocoder import ensure_vocoder, griffin_lim_many

    run = Path(a.run_dir)
    tok = json.loads((run / "tokenizers" / "speech" / "tokenizer.json").read_text())
    t0 = time.time()
    model = ensure_vocoder(run, log=log, cfg=vocoder_config(a))  # shape fields are replaced from the tokenizer
    train_seconds = time.time() - t0
    vcfg = model.cfg
    meta = json.loads((run / "tokenizers" / "speech" / "vocoder" / "config.json").read_text())
    units, rows = {}, []
    for split in dict.fromkeys(a.splits.split(",")):  # held-out splits: the vocoder trains on the speech and aligned roles
        units.update({r["id"]: r["speech"] for r in load_role(run, split, speech_tok=tok["checksum"])})
        rows += [r for r in read_jsonl(run / "data" / f"{split}.jsonl") if r["id"] in units and r.get("audio")]
    rows = rows[:a.test_utts] if a.test_utts else rows
    refs = [r.get("norm") or r["text"] for r in rows]
    wavs = [read_audio(r["audio"], start=r.get("start"), end=r.get("end")) for r in rows]
    audio_seconds = sum(w.size for w in wavs) / 16000
    t0 = time.time()
    mels = model.mels([np.asarray(units[r["id"]]) for r in rows], speakers=[r.get("speaker") for r in rows])
    net_seconds = time.time() - t0
    t0 = time.time()
    voc = [griffin_lim(m, vcfg.gl_iters, vcfg.gl_momentum) for m in mels]
    gl_seconds = time.time() - t0
    audio = {"original": wavs, "vocoder": voc}
    if a.mix:
        true = [log_mel(w, vcfg.n_mels) for w in wavs]
        for name, frames in mix_conditions(mels, true, a.cepstra).items():
            audio[name] = griffin_lim_many(frames, vcfg.gl_iters, vcfg.gl_momentum)
    judges = [PocketsphinxJudge()]
    if a.ctc:
        from zipper_cli.ctc_judge import ensure_ctc_judge

        judges.append(ensure_ctc_judge(run, log=log))
    result: dict = {"run_dir": str(run), "splits": list(dict.fromkeys(a.splits.split(","))), "test_utterances": len(rows),
                    "test_audio_seconds": round(audio_seconds, 1), "judges": {}}
    hyps: dict = {}
    for judge in judges:
        t0 = time.time()
        h = {name: judge.transcribe_many(x) for name, x in audio.items()}
        w = {k: round(wer(refs, v), 4) for k, v in h.items()}
        ratio = round(w["vocoder"] / max(w["original"], 1e-9), 3)
        spread = ratio_spread(refs, h["original"], h["vocoder"], a.target)
        result["judges"][judge.name] = {"version": judge.version, "wer": w, "ratio_vocoder_to_original": ratio,
                                        "meets_target": ratio <= a.target, "ratio_bootstrap": spread,
                                        "seconds": round(time.time() - t0, 1)}
        hyps[judge.name] = h
        log(f"{judge.name}: original WER {w['original']:.4f}, vocoder WER {w['vocoder']:.4f}, ratio {ratio:.3f}"
            + (f" (95% interval {spread['ci95'][0]:.2f}-{spread['ci95'][1]:.2f}, "
               f"{spread['share_at_or_under_target']:.0%} of resamples <= {a.target})" if spread else "")
            + "".join(f"; {k} {v:.4f}" for k, v in w.items() if k not in ("original", "vocoder")))
    result["target_ratio"] = a.target
    if a.mix:
        result["mix_cepstra"] = a.cepstra
    result["vocoder"] = {"config": vcfg.to_dict(), "train_utterances": meta.get("utterances"),
                         "train_hours": meta.get("hours"), "parameters": meta.get("parameters"),
                         "train_l1": meta.get("train_l1"), "train_seconds": meta.get("train_seconds"),
                         "wall_seconds_this_call": round(train_seconds, 1)}
    result["rtf"] = {"network": round(net_seconds / audio_seconds, 4), "griffin_lim": round(gl_seconds / audio_seconds, 4)}
    result["threads"] = a.threads
    if a.dump:
        with open(a.dump, "w") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps({"id": r["id"], "speaker": r.get("speaker"), "text": refs[i],
                                    **{f"{j}_{k}": v[i] for j, h in hyps.items() for k, v in h.items()}}) + "\n")
    return result


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    if a.run_dir:
        print(json.dumps(measure_run(a), indent=2))
        return
    a.test_utts = a.test_utts or 40
    corpus = Path(a.corpus)
    rows = [json.loads(x) for x in (corpus / "manifest.jsonl").read_text().splitlines() if x.strip()]
    for r in rows:
        if r.get("audio") and not Path(r["audio"]).is_absolute():
            r["audio"] = str(corpus / r["audio"])
    train_rows = sorted((r for r in rows if r["role"] in ("speech", "aligned") and r.get("audio")), key=lambda r: r["id"])
    rng = np.random.default_rng(a.seed)
    train_rows = [train_rows[i] for i in rng.permutation(len(train_rows))]
    test_rows = [r for r in rows if r["role"] == "test" and r.get("audio") and r.get("text")
                 and (a.all_voices or not str(r.get("speaker") or "").startswith("espeak"))][:a.test_utts]
    if not train_rows or not test_rows:
        sys.exit(f"{corpus}: need speech/aligned audio and test rows with text")
    work = Path(a.work_dir)

    # 1. speech tokenizer (cached by its settings and the utterances it read)
    tcfg = SpeechTokenizerConfig(k=a.k, frame_rate=a.frame_rate, seed=a.seed)
    fit_rows = train_rows[:a.fit_utts]
    tok_dir = work / f"tok-k{a.k}-r{a.frame_rate}-n{len(fit_rows)}-s{a.seed}"
    t0 = time.time()
    if (tok_dir / "tokenizer.json").exists():
        tok = SpeechTokenizer.load(tok_dir)
        log(f"tokenizer: loaded {tok_dir}")
    else:
        tok = fit_speech_tokenizer(tcfg, (read_audio(r["audio"]) for r in fit_rows), log=log)
        tok.save(tok_dir)
    tok_seconds = time.time() - t0

    # 2. vocoder
    vcfg = vocoder_config(a, vocab_size=tok.vocab_size, frame_rate=float(tok.frame_rate), n_mels=tcfg.n_mels)
    if vcfg.by_speaker:
        vcfg = dataclasses.replace(vcfg, speakers=rank_speakers(r.get("speaker") for r in train_rows[:a.train_utts]))
    vcfg.validate()
    t0 = time.time()
    pairs = []
    for r in train_rows[:a.train_utts]:
        wav = read_audio(r["audio"])
        pairs.append((tok.encode(wav), wav, r.get("speaker")))
    encode_seconds = time.time() - t0
    train_keys = {k: v for k, v in vcfg.to_dict().items() if k not in ("gl_iters", "gl_momentum", "save_every")}
    voc_dir = tok_dir / f"vocoder-{sha256_json(train_keys)[:10]}-n{len(pairs)}"
    lookup = cluster_means(pairs, tok.vocab_size, vcfg.upsample, tcfg.n_mels) if a.lookup_baseline else None
    t0 = time.time()
    model = train_vocoder(pairs, vcfg, voc_dir, log)
    train_seconds = time.time() - t0
    model_meta = json.loads((voc_dir / "config.json").read_text())
    del pairs

    # 3. judge
    judge = PocketsphinxJudge()
    wavs = [read_audio(r["audio"]) for r in test_rows]
    refs = [r["text"] for r in test_rows]
    audio_seconds = sum(w.size for w in wavs) / 16000
    units = [tok.encode(w) for w in wavs]
    t0 = time.time()
    mels = model.mels(units, speakers=[r.get("speaker") for r in test_rows])
    net_seconds = time.time() - t0
    t0 = time.time()
    voc = [griffin_lim(m, vcfg.gl_iters, vcfg.gl_momentum) for m in mels]
    gl_seconds = time.time() - t0
    hyp = {"original": judge.transcribe_many(wavs), "vocoder": judge.transcribe_many(voc)}
    if lookup is not None:
        looked = [griffin_lim(lookup[torch.as_tensor(u.astype(np.int64))].reshape(-1, tcfg.n_mels),
                              vcfg.gl_iters, vcfg.gl_momentum) for u in units]
        hyp["lookup"] = judge.transcribe_many(looked)
    if not a.skip_gl_true:
        gl_true = [griffin_lim(log_mel(w, tcfg.n_mels), vcfg.gl_iters, vcfg.gl_momentum) for w in wavs]
        hyp["gl_true"] = judge.transcribe_many(gl_true)
    # the vocoder's L1 on the test audio (frames aligned as in training)
    up = vcfg.upsample
    l1 = []
    for w, m in zip(wavs, mels):
        true = log_mel(w, tcfg.n_mels)
        n = min(m.shape[0], true.shape[0] // up * up)
        l1.append(float((m[:n] - true[:n]).abs().mean()))
    result = {
        "judge": judge.version,
        "test_utterances": len(test_rows),
        "test_audio_seconds": round(audio_seconds, 1),
        "wer": {k: round(wer(refs, v), 4) for k, v in hyp.items()},
        "tokenizer": {"k": a.k, "frame_rate": a.frame_rate, "fit_utterances": len(fit_rows),
                      "seconds": round(tok_seconds, 1), "checksum": tok.checksum[:12]},
        "vocoder": {"config": vcfg.to_dict(), "train_utterances": model_meta["utterances"],
                    "train_hours": model_meta["hours"], "parameters": model_meta["parameters"],
                    "receptive_field_seconds": model_meta["receptive_field_seconds"],
                    "train_l1": model_meta["train_l1"], "test_l1": round(float(np.mean(l1)), 4),
                    "train_seconds": round(train_seconds, 1), "encode_seconds": round(encode_seconds, 1),
                    "dir": str(voc_dir)},
        "rtf": {"network": round(net_seconds / audio_seconds, 4), "griffin_lim": round(gl_seconds / audio_seconds, 4),
                "total": round((net_seconds + gl_seconds) / audio_seconds, 4),
                "ms_per_utterance": round(1000 * (net_seconds + gl_seconds) / len(test_rows), 1)},
        "threads": a.threads,
    }
    result["ratio_vocoder_to_original"] = round(result["wer"]["vocoder"] / max(result["wer"]["original"], 1e-9), 3)
    result["target_ratio"] = a.target
    result["meets_target"] = result["ratio_vocoder_to_original"] <= a.target
    result["ratio_bootstrap"] = ratio_spread(refs, hyp["original"], hyp["vocoder"], a.target)
    if a.dump:
        with open(a.dump, "w") as f:
            for i, r in enumerate(test_rows):
                f.write(json.dumps({"id": r["id"], "speaker": r.get("speaker"), "text": r["text"],
                                    **{k: v[i] for k, v in hyp.items()}}) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
