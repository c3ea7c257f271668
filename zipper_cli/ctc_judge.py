"""The toolkit's own ASR judge: a small character CTC model trained on the run's ground-truth audio.

TTS is scored by transcribing synthesized audio with an ASR "judge". pocketsphinx (zipper_cli.judges)
is independent of the run but weak on this kind of audio; this judge is trained on the run's own
training split (the `aligned` role, never dev or test), so it knows the domain's words and voices.
It has the PocketsphinxJudge interface: `name`, `version`, `transcribe(wav16k)`, `transcribe_many(wavs)`.

Modules:
  ctc_judge_model.py  vocabulary, CTCJudgeConfig, features, the network (CTCModel), the judge (CTCJudge)
  ctc_judge_train.py  train_ctc_judge, load_ctc_judge (a judge directory)
  ctc_judge.py        the run directory's judge (ensure_ctc_judge); every public name above is
                      importable from here

Files under a judge directory (run_dir/judges/ctc for `ensure_ctc_judge`):
  train_config.json  config + training-data checksum of the run being trained (checked on resume)
  ckpt/step-*.pt     training checkpoints (model, optimizer, position), loaded with weights_only=True;
                     removed once judge.json is written
  metrics.jsonl      one row per step (loss, lr, grad norm), dev CER/WER at evaluation steps
  model.pt           final weights (state_dict of tensors)
  judge.json         config, version, dev WER/CER, training time, versions: the completion marker
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import read_jsonl
from .console import log as console_log
from .ctc_judge_model import (BLANK, CHAR_TO_ID, FORMAT, SAMPLE_RATE, VOCAB, CTCJudge, CTCJudgeConfig, CTCModel,
                              ctc_collapse, features, greedy_decode, ids_to_text, lr_at, param_count, text_to_ids)
from .ctc_judge_train import load_ctc_judge, train_ctc_judge
from .errors import ZipperError
from .text_norm import normalize_text

__all__ = ["BLANK", "CHAR_TO_ID", "FORMAT", "JUDGE_SUBDIR", "SAMPLE_RATE", "VOCAB", "CTCJudge", "CTCJudgeConfig",
           "CTCModel", "ctc_collapse", "ensure_ctc_judge", "features", "greedy_decode", "ids_to_text",
           "load_ctc_judge", "lr_at", "param_count", "read_pairs", "text_to_ids", "train_ctc_judge"]

JUDGE_SUBDIR = Path("judges") / "ctc"


# ---------------------------------------------------------------------------------------------- run directories


def read_pairs(rows, where, log, limits=None, name: str = "ctc-judge") -> list[tuple[np.ndarray, str]]:
    """(16 kHz wav, normalised transcript) of manifest rows with a transcript and readable audio (within
    `limits`, default AudioLimits()); the others are skipped, and counted in one log line naming `where`
    (log lines prefixed [name])."""
    from .audio import AudioLimits, AudioReject, read_audio

    pairs, bad = [], 0
    for r in rows:
        text = r.get("norm") or normalize_text(r.get("text") or "")
        if not text:
            continue
        try:
            wav = read_audio(r["audio"], limits or AudioLimits(), r.get("start"), r.get("end"))
        except AudioReject as e:
            bad += 1
            if bad <= 3:
                log(f"[{name}] skipping {r.get('id')}: {e.detail}")
            continue
        pairs.append((wav, text))
    if bad:
        log(f"[{name}] {where}: {bad} utterances with unreadable audio skipped")
    return pairs


def ensure_ctc_judge(run_dir: str | Path, log: Callable[[str], None] = console_log,
                     cfg: CTCJudgeConfig | None = None) -> CTCJudge:
    """The run's CTC judge: loaded from run_dir/judges/ctc when trained, else trained now on the
    `aligned` role (data/aligned.jsonl) with data/dev.jsonl as dev (never test), and stored there.

    `cfg` None means the stored judge whatever its config (the defaults when training); a given cfg
    that differs from a stored judge's is refused (delete the directory to retrain).
    """
    from .rundir import stage_lock

    run_dir = Path(run_dir)
    out_dir = run_dir / JUDGE_SUBDIR

    def stored() -> CTCJudge | None:
        if not (out_dir / "judge.json").exists():
            return None
        judge = load_ctc_judge(out_dir)
        if cfg is not None and judge.cfg != cfg:
            from .rundir import diff_keys

            diffs = diff_keys(judge.cfg.to_dict(), cfg.to_dict())
            raise ZipperError(f"{out_dir} holds a CTC judge trained with another config ({'; '.join(diffs)}); "
                              f"delete {out_dir} to retrain it")
        return judge

    judge = stored()
    if judge is not None:
        return judge
    aligned = run_dir / "data" / "aligned.jsonl"
    if not aligned.exists():
        raise ZipperError(f"the CTC judge trains on {aligned}, which is missing; run `zipper tokenize` first")
    with stage_lock(run_dir, "judge-ctc"):
        judge = stored()  # another process may have finished it while we waited for nothing
        if judge is not None:
            return judge
        log(f"[ctc-judge] training the CTC judge on {aligned} (ground-truth audio of the training split)")
        pairs = read_pairs(read_jsonl(aligned), aligned, log)
        if not pairs:
            raise ZipperError(f"{aligned}: no utterances with a transcript and readable audio to train the CTC judge")
        dev = run_dir / "data" / "dev.jsonl"
        dev_pairs = read_pairs(read_jsonl(dev), dev, log) if dev.exists() else []
        return train_ctc_judge(pairs, dev_pairs, cfg or CTCJudgeConfig(), out_dir, log)
