"""The CTC judge: greedy decoding, config checks, learning a tiny task, batch independence, save/load,
exact resume after an interruption, and the run-directory entry point (trains on aligned, never test)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from zipper_cli.ctc_judge import (BLANK, VOCAB, CTCJudge, CTCJudgeConfig, ctc_collapse, ensure_ctc_judge,
                                  greedy_decode, load_ctc_judge, text_to_ids, train_ctc_judge)
from zipper_cli.errors import Interrupted, ZipperError
from zipper_cli.metrics import score

SR = 16000
WORDS = ["go", "up", "yes", "no"]
_CHARS = sorted(set("".join(WORDS)))
FREQS = {c: 260.0 * 1.28 ** i for i, c in enumerate(_CHARS)}  # one tone per character


def render(text: str, rng: np.random.Generator) -> np.ndarray:
    """A toy "speech" signal: each character a tone of its own, words separated by silence."""
    def silence(lo, hi):
        return np.zeros(int(rng.uniform(lo, hi) * SR))

    parts = [silence(0.08, 0.15)]
    for i, word in enumerate(text.split()):
        if i:
            parts.append(silence(0.12, 0.2))
        for c in word:
            n = int(rng.uniform(0.07, 0.1) * SR)
            t = np.arange(n) / SR
            env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
            parts.append(rng.uniform(0.2, 0.5) * env * np.sin(2 * np.pi * FREQS[c] * rng.uniform(0.98, 1.02) * t))
    parts.append(silence(0.08, 0.15))
    wav = np.concatenate(parts)
    return (wav + 0.003 * rng.standard_normal(wav.size)).astype(np.float32)


def tone_pairs(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        out.append((render(text, rng), text))
    return out


TINY = dict(dim=48, layers=3, subsample=2, lr=1e-2, warmup_steps=10, max_frames=1500,
            time_masks=1, time_mask_width=5, freq_masks=1, freq_mask_width=4, dropout=0.0)


def tiny(**kw) -> CTCJudgeConfig:
    return CTCJudgeConfig(**{**TINY, "steps": 300, "eval_every": 100, "ckpt_every": 100, **kw})


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_role(run: Path, name: str, pairs, missing_audio: bool = False) -> None:
    rows = []
    for i, (wav, text) in enumerate(pairs):
        path = run / "wav" / f"{name}-{i:03d}.wav"
        if not missing_audio:
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, wav, SR, subtype="FLOAT")
        rows.append({"id": f"{name}-{i:03d}", "audio": str(path), "start": None, "end": None, "text": text,
                     "norm": text, "duration": len(wav) / SR, "speaker": None, "source": "tones"})
    (run / "data").mkdir(parents=True, exist_ok=True)
    (run / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny judge, trained through ensure_ctc_judge on a run directory of tone "speech"."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run")
    write_role(run, "aligned", tone_pairs(64, seed=1))
    write_role(run, "dev", tone_pairs(8, seed=2))
    write_role(run, "test", tone_pairs(8, seed=3), missing_audio=True)  # never read: a read would fail
    logs: list[str] = []
    judge = ensure_ctc_judge(run, logs.append, tiny())
    return run, judge, logs


# ---------------------------------------------------------------------------------------------- decoding


def test_greedy_decoding_collapses_repeats_and_drops_blanks():
    a, b, sp = VOCAB.index("a"), VOCAB.index("b"), VOCAB.index(" ")
    path = [BLANK, a, a, BLANK, a, b, b, sp, sp, BLANK, b, BLANK, BLANK]
    assert ctc_collapse(path) == [a, a, b, sp, b]
    logits = torch.full((len(path), len(VOCAB)), -5.0)
    logits[torch.arange(len(path)), torch.tensor(path)] = 3.0
    assert greedy_decode(logits) == "aab b"  # a blank separates the double letter; repeats merge
    assert greedy_decode(torch.zeros(0, len(VOCAB))) == ""
    only_spaces = torch.full((3, len(VOCAB)), -5.0)
    only_spaces[:, sp] = 1.0
    assert greedy_decode(only_spaces) == ""
    with pytest.raises(ValueError, match="expects"):
        greedy_decode(torch.zeros(4, 5))


def test_text_is_normalised_to_the_character_vocabulary():
    ids = text_to_ids("Don't pay $5, Café!")
    assert "".join(VOCAB[i] for i in ids) == "don't pay five dollars caf"
    assert BLANK not in ids


def test_config_validation_names_the_field():
    CTCJudgeConfig().validate()
    for kw, field in [({"steps": 0}, "steps"), ({"ff_mult": 0}, "ff_mult"), ({"lr": 0.0}, "lr"),
                      ({"subsample": 0}, "subsample"), ({"freq_mask_width": 80}, "freq_mask_width"),
                      ({"dropout": 1.0}, "dropout"), ({"max_frames": 10}, "max_frames"),
                      ({"conv_kernel": 4}, "conv_kernel")]:
        with pytest.raises(ZipperError, match=rf"CTC judge config: {field} = "):
            CTCJudgeConfig(**kw).validate()
    with pytest.raises(ZipperError, match="unknown CTC judge config keys bogus"):
        CTCJudgeConfig.from_dict({**CTCJudgeConfig().to_dict(), "bogus": 1})


# ---------------------------------------------------------------------------------------------- a trained judge


def test_tiny_model_learns_the_tone_task(trained):
    run, judge, logs = trained
    assert judge.name == "ctc" and judge.version.startswith("ctc-")
    test = tone_pairs(12, seed=4)
    hyps = judge.transcribe_many([w for w, _ in test])
    s = score([t for _, t in test], hyps)
    assert s.cer < 0.1, list(zip([t for _, t in test], hyps))
    meta = json.loads((run / "judges" / "ctc" / "judge.json").read_text())
    assert meta["version"] == judge.version and meta["dev"]["cer"] < 0.2
    assert meta["train_utterances"] == 64 and meta["dev_utterances"] == 8
    assert {"zipper", "torch"} <= set(meta["versions"]) and meta["train_seconds"] > 0
    assert not (run / "judges" / "ctc" / "ckpt").exists()  # optimizer checkpoints go once the judge is done
    assert any("step 300/300" in line for line in logs)


def test_transcripts_do_not_depend_on_batch_composition(trained):
    _, judge, _ = trained
    wavs = [w for w, _ in tone_pairs(9, seed=5)] + [np.zeros(100, np.float32)]  # the last: too short for a frame
    alone = [judge.transcribe(w) for w in wavs]
    assert judge.transcribe_many(wavs) == alone
    assert judge.transcribe_many(wavs[::-1]) == alone[::-1]
    assert judge.transcribe_many(wavs + wavs[:3]) == alone + alone[:3]
    assert alone[-1] == ""
    # stronger: the log-probabilities themselves are bitwise those of the utterance decoded alone
    batched = judge.logits(wavs)
    for w, lp in zip(wavs[:4], batched):
        assert torch.equal(judge.logits([w])[0], lp)


def test_save_load_round_trip(trained):
    run, judge, _ = trained
    again = load_ctc_judge(run / "judges" / "ctc")
    assert again.version == judge.version
    wavs = [w for w, _ in tone_pairs(6, seed=6)]
    assert again.transcribe_many(wavs) == judge.transcribe_many(wavs)
    assert not again.model.training


def test_ensure_reuses_the_stored_judge_and_refuses_another_config(trained):
    run, judge, _ = trained
    logs: list[str] = []
    assert ensure_ctc_judge(run, logs.append).version == judge.version
    assert ensure_ctc_judge(run, logs.append, tiny()).version == judge.version
    assert not any("training" in line for line in logs)
    with pytest.raises(ZipperError, match=r"another config \(lr: 0.01 -> 0.001\)"):
        ensure_ctc_judge(run, quiet, tiny(lr=1e-3))


def test_tampered_weights_are_refused(trained, tmp_path):
    run, _, _ = trained
    import shutil

    d = tmp_path / "ctc"
    shutil.copytree(run / "judges" / "ctc", d)
    state = torch.load(d / "model.pt", weights_only=True)
    state["out.bias"] = state["out.bias"] + 1.0
    torch.save(state, d / "model.pt")
    with pytest.raises(ZipperError, match="differs from"):
        load_ctc_judge(d)


def test_ensure_needs_a_tokenized_run(tmp_path):
    with pytest.raises(ZipperError, match=r"aligned.jsonl, which is missing; run `zipper tokenize` first"):
        ensure_ctc_judge(tmp_path, quiet)


# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_training_resumes_exactly(tmp_path):
    pairs, dev = tone_pairs(24, seed=7), tone_pairs(4, seed=8)
    cfg = tiny(steps=12, eval_every=4, ckpt_every=100, dropout=0.1)
    a = train_ctc_judge(pairs, dev, cfg, tmp_path / "a", quiet)

    def interrupt_at_step_8(msg: str) -> None:
        if "step 8/12" in msg:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would: the step finishes, a checkpoint is saved

    with pytest.raises(Interrupted, match="stopped by signal at step 8; checkpoint saved"):
        train_ctc_judge(pairs, dev, cfg, tmp_path / "b", interrupt_at_step_8)
    assert not (tmp_path / "b" / "judge.json").exists()
    logs: list[str] = []
    torch.manual_seed(1234)  # the resumed run must not depend on the caller's RNG state
    b = train_ctc_judge(pairs, dev, cfg, tmp_path / "b", logs.append)
    assert any("resuming" in line and "step 8/12" in line for line in logs)
    assert b.version == a.version  # bitwise the same weights as the uninterrupted run
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    ra, rb = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in rb] == list(range(1, 13))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    # other data over an unfinished run's checkpoints is refused rather than mixed in
    with pytest.raises(Interrupted):
        train_ctc_judge(pairs, dev, cfg, tmp_path / "c", interrupt_at_step_8)
    with pytest.raises(ZipperError, match="unfinished CTC judge trained with other settings"):
        train_ctc_judge(pairs[:-1], dev, cfg, tmp_path / "c", quiet)


def test_padding_never_reaches_an_utterance():
    """Untrained, subsampling by 3: log-probabilities in a padded batch are bitwise those of the utterance alone."""
    torch.manual_seed(0)
    from zipper_cli.ctc_judge import CTCModel

    judge = CTCJudge(CTCModel(CTCJudgeConfig(dim=32, layers=2, subsample=3)))
    rng = np.random.default_rng(0)
    wavs = [(0.1 * rng.standard_normal(int(SR * s))).astype(np.float32) for s in (0.31, 1.27, 0.8, 2.05)]
    batched = judge.logits(wavs)
    for w, lp in zip(wavs, batched):
        alone = judge.logits([w])[0]
        assert lp.shape == alone.shape and torch.equal(lp, alone)


def test_a_checkpoint_that_does_not_fit_is_one_error_naming_the_file(tmp_path):
    """A training checkpoint of another model (here: another width) is refused on resume, not a traceback."""
    from zipper_cli.checkpoint import save_checkpoint
    from zipper_cli.ctc_judge import CTCModel

    other = CTCModel(tiny(dim=16))
    state = {"model": other.state_dict(), "optimizer": {}, "step": 2, "epoch": 0, "batch_pos": 1}
    save_checkpoint(tmp_path / "ckpt", 2, state, dev_loss=None, keep_last=2)
    with pytest.raises(ZipperError, match=r"ckpt/step-0+2\.pt: checkpoint step 2 does not fit .*size mismatch"):
        train_ctc_judge(tone_pairs(4, seed=9), [], tiny(steps=4), tmp_path, quiet)


def test_a_full_disk_while_appending_metrics_is_one_error(tmp_path, monkeypatch):
    import builtins
    import errno

    from zipper_cli import atomic

    real_open = builtins.open

    def full(path, *args, **kw):
        if str(path).endswith("metrics.jsonl") and args and args[0] == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kw)

    monkeypatch.setattr(atomic, "open", full, raising=False)  # append_jsonl's `open`, not the builtin
    with pytest.raises(ZipperError, match=r"metrics.jsonl: no space left on device"):
        train_ctc_judge(tone_pairs(4, seed=9), [], tiny(steps=2), tmp_path, quiet)
