#!/usr/bin/env python
"""How much do k-means speech units say about the words? Prints one JSON line per feature kind.

For each feature kind, k-means (K units at 25 Hz) is fitted on aligned utterances of a tokenized run, and
the run's dev utterances are encoded. Each unit is paired with the character spoken at its centre, from a
forced alignment of the transcript by the run's CTC judge (blank frames hold the last character). Per
kind:
  pnmi_char            I(unit; char) / H(char): 1 when the unit determines the character (HuBERT's
                       phone-normalised mutual information, with characters for phones)
  h_char_given_unit    H(char | unit) in bits
  change_rate          fraction of units that differ from the unit before them
  i_unit_speaker_bits  I(unit; voice): how much the unit says about who speaks (not in the text)

Kinds (per-utterance normalised, 4 consecutive 100 Hz frames stacked into one 25 Hz vector):
  mel            the 80-bin log-mel, mean/variance normalised per bin (the mel-kmeans tokenizer's features)
  cep1-19        cepstra 1-19 of the log-mel (DCT; no energy, no pitch harmonics), mean/variance normalised
  cep0-12        cepstra 0-12 (MFCC-like), mean/variance normalised
  cep1-12-cmn    cepstra 1-12, mean normalised only
  masked-L<n>    layer n of a HuBERT-style masked-prediction encoder trained first on the run's aligned and
                 unlabeled audio (--masked-steps; scripts/masked_units.py), over the mel features

  .venv/bin/python scripts/probe_units.py --run-dir runs/demo
  .venv/bin/python scripts/probe_units.py --run-dir runs/demo --kinds mel --masked-steps 2000 --masked-layers 2,3,4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchaudio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # masked_units, beside this file

from zipper_cli.atomic import read_jsonl  # noqa: E402
from zipper_cli.audio import read_audio  # noqa: E402
from zipper_cli.ctc_judge import ensure_ctc_judge  # noqa: E402
from zipper_cli.ctc_judge_model import text_to_ids  # noqa: E402
from zipper_cli.kmeans import assign, kmeans  # noqa: E402
from zipper_cli.speech_features import log_mel, normalise_and_stack  # noqa: E402
from masked_units import layer_features, train_masked  # noqa: E402

STACK = 4  # 100 Hz frames per 25 Hz unit


def _stack(f: torch.Tensor) -> torch.Tensor:
    t = f.shape[0] // STACK * STACK
    return f[:t].reshape(t // STACK, STACK * f.shape[1])  # [T/4, 4 D]


_DCT = torchaudio.functional.create_dct(40, 80, "ortho")  # [80 mels, 40 cepstra]
KINDS = {
    "mel": lambda lm: normalise_and_stack(lm, STACK),  # exactly the mel-kmeans tokenizer's features
    "cep1-19": lambda lm: normalise_and_stack((lm @ _DCT)[:, 1:20], STACK),
    "cep0-12": lambda lm: normalise_and_stack((lm @ _DCT)[:, :13], STACK),
    "cep1-12-cmn": lambda lm: _stack((lm @ _DCT)[:, 1:13] - (lm @ _DCT)[:, 1:13].mean(0)),
}


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    return _entropy(joint.sum(1)) + _entropy(joint.sum(0)) - _entropy(joint.ravel())


def char_per_frame(judge, wavs: list[np.ndarray], texts: list[str], frames: list[int]) -> list[np.ndarray]:
    """The character id at every 100 Hz frame, from the CTC judge's forced alignment of the transcript."""
    out = []
    for lp, text, n in zip(judge.logits(wavs), texts, frames):
        target = torch.tensor([text_to_ids(text)], dtype=torch.int32)
        ali, _ = torchaudio.functional.forced_align(lp.float().log_softmax(-1)[None], target, blank=0)
        held, last = [], -1
        for x in ali[0].tolist():
            last = x if x != 0 else last
            held.append(last)
        per100 = np.repeat(np.array(held), judge.cfg.subsample)[:n]  # CTC frames -> 100 Hz frames
        out.append(np.pad(per100, (0, n - len(per100)), mode="edge"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="a tokenized run (data/aligned.jsonl, data/dev.jsonl)")
    p.add_argument("--k", type=int, default=512, help="k-means units")
    p.add_argument("--fit-utts", type=int, default=1200, help="aligned utterances k-means is fitted on")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--masked-steps", type=int, default=0, help="train the masked-prediction encoder this long "
                   "and add its layers as kinds masked-L<n> (0: not)")
    p.add_argument("--masked-layers", default="2,4", help="its layers to cluster (0 = the input projection)")
    p.add_argument("--masked-targets", type=int, default=100, help="k-means clusters of the mel features it predicts")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run = Path(a.run_dir)
    kinds = a.kinds.split(",")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        sys.exit(f"probe_units.py: --kinds {','.join(bad)}: unknown (valid: {', '.join(KINDS)})")
    fit = [log_mel(read_audio(r["audio"], start=r.get("start"), end=r.get("end")))
           for r in list(read_jsonl(run / "data" / "aligned.jsonl"))[:a.fit_utts]]
    dev = list(read_jsonl(run / "data" / "dev.jsonl"))
    wavs = [read_audio(r["audio"], start=r.get("start"), end=r.get("end")) for r in dev]
    mels = [log_mel(w) for w in wavs]
    chars = char_per_frame(ensure_ctc_judge(run), wavs, [r.get("norm") or r["text"] for r in dev],
                           [m.shape[0] for m in mels])
    voices = np.unique([str(r.get("speaker", "")).split("@")[0] for r in dev], return_inverse=True)[1]
    encoded = {kind: ([KINDS[kind](m) for m in fit], [KINDS[kind](m) for m in mels]) for kind in kinds}
    if a.masked_steps:
        train = [normalise_and_stack(log_mel(read_audio(r["audio"], start=r.get("start"), end=r.get("end"))), STACK)
                 for role in ("aligned", "train-speech") for r in read_jsonl(run / "data" / f"{role}.jsonl")]
        train = [f for f in train if len(f)]
        c = kmeans(torch.cat(train[::5]), a.masked_targets, seed=0).centroids
        model = train_masked(train, [assign(f, c)[0] for f in train], a.masked_targets, a.masked_steps,
                             log=lambda s: print(s, file=sys.stderr, flush=True))
        fit_mel, dev_mel = encoded["mel"] if "mel" in encoded else ([KINDS["mel"](m) for m in fit],
                                                                    [KINDS["mel"](m) for m in mels])
        for layer in map(int, a.masked_layers.split(",")):
            encoded[f"masked-L{layer}"] = (layer_features(model, fit_mel, layer), layer_features(model, dev_mel, layer))
    for kind, (fit_feats, dev_feats) in encoded.items():
        centroids = kmeans(torch.cat(fit_feats).float(), a.k, seed=0).centroids
        units, labels, spk, changes, pairs = [], [], [], 0, 0
        for f, ch, v in zip(dev_feats, chars, voices):
            u = assign(f.float(), centroids)[0].numpy()
            c = ch[np.arange(len(u)) * STACK + STACK // 2]  # the character at each unit's centre
            keep = c >= 0  # frames before the first character
            units.append(u[keep])
            labels.append(c[keep])
            spk.append(np.full(int(keep.sum()), v))
            changes += int((u[1:] != u[:-1]).sum())
            pairs += max(len(u) - 1, 0)
        u, c, s = np.concatenate(units), np.concatenate(labels), np.concatenate(spk)
        h_char, i_char = _entropy(np.bincount(c)), _mutual_info(u, c)
        print(json.dumps({"kind": kind, "k": a.k, "pnmi_char": round(i_char / h_char, 4),
                          "h_char_given_unit": round(h_char - i_char, 3), "change_rate": round(changes / pairs, 3),
                          "i_unit_speaker_bits": round(_mutual_info(u, s), 3)}), flush=True)


if __name__ == "__main__":
    main()
