"""Interruptions: every stage is SIGKILLed at several points, the same command is rerun, and the result
equals an uninterrupted run's, bitwise (every stage is deterministic on CPU with one thread).

The kill points are deterministic (ZIPPER_TEST_KILL_AT, see zipper_cli.atomic.kill_point): 'write:NAME'
(a file fully written to its temporary name, not yet renamed into place), 'wrote:NAME' (renamed), and
'step:N' (a training step logged, its checkpoint not yet written). Each stage is killed several times in
a row, each rerun resuming from what the previous one left, and after every kill the stage's completion
marker must be absent. One shared reference pipeline (module fixture) is what every chain is compared to.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli_runner import assert_same_files, assert_same_marker, files, metric_rows, warm_imports, zipper
from conftest import make_small_manifest

RUN = ["--run-dir", "run"]
TRAIN = ["--size", "tiny", "--steps", "6", "--max-tokens", "256", "--eval-every", "3", "--ckpt-every", "2"]
SMALL = ["--max-len-min", "text=4,speech=8", "--max-new-tokens", "8", "--vocoder-steps", "20"]
FUSE = ["fuse", *RUN, "--freeze", "text", "--steps", "6", "--max-tokens", "512", "--eval-every", "3", "--ckpt-every", "2"]
DECODE_ASR = ["decode", *RUN, "--outputs", "text", "--tag", "asr", *SMALL]
DECODE_TTS = ["decode", *RUN, "--outputs", "speech", "--tag", "tts", *SMALL]
EVAL = ["eval", *RUN, "--decode", "asr", "--decode", "tts", "--judges", "ctc", "--judge-steps", "10", "--tag", "all"]


def tokenize_args(corpus: Path) -> list:
    return ["tokenize", *RUN, "--corpus", f"manifest:{corpus}", "--units", "16", "--text-vocab", "40", "--shard-size", "4"]


def pretrain_args(tower: str) -> list:
    return ["pretrain", *RUN, "--tower", tower, *TRAIN]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """The uninterrupted reference: every stage once, on a tiny corpus with tiny models. Returns the root
    holding corpus.jsonl and ref/run."""
    warm_imports()
    root = tmp_path_factory.mktemp("kill")
    corpus = make_small_manifest(root)
    cwd = root / "ref"
    cwd.mkdir()
    for args in (tokenize_args(corpus), pretrain_args("text"), pretrain_args("speech"), FUSE, DECODE_ASR, DECODE_TTS,
                 EVAL):
        zipper(*args, cwd=cwd)
    return root


def copy_before(root: Path, name: str, drop: list[str]) -> Path:
    """A copy of the reference run with `drop` (paths and stages/ globs) removed: the stage never ran."""
    cwd = root / name
    shutil.copytree(root / "ref", cwd)
    run = cwd / "run"
    for pattern in drop:
        for p in run.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return cwd


def kill_chain(cwd: Path, args: list, marker: str, kills: list, between=None) -> list:
    """Run `args` killed at each point in turn (each run resuming the last), then to completion.
    `between(i, run)` may damage the run directory after the i-th kill. Returns every run's result."""
    run = cwd / "run"
    results = []
    for i, point in enumerate(kills):
        res = zipper(*args, cwd=cwd, kill_at=point)
        assert res.killed, f"kill point {point!r} was never reached:\n{res}"
        assert not (run / "stages" / marker).exists(), f"{marker} written before the stage finished (killed at {point})"
        results.append(res)
        if between:
            between(i, run)
    results.append(zipper(*args, cwd=cwd))
    assert "already done" not in results[-1].stdout
    assert not list(run.rglob("*.tmp-*")), "temporary files of killed writers were left behind"
    return results


def test_tokenize_killed_three_times(ref):
    corpus = ref / "corpus.jsonl"
    cwd = ref / "tok"
    cwd.mkdir()
    kill_chain(cwd, tokenize_args(corpus), "tokenize.done.json",
               ["wrote:fit.json",             # text and speech tokenizers fitted, no shard yet
                "wrote:shard-*.npz#3",        # three shards finished
                "write:tokenize.done.json"])  # everything written but the marker
    a, b = ref / "ref" / "run", cwd / "run"
    made = ("data", "tokens", "tokenizers/text", "tokenizers/speech/centroids.npy", "tokenizers/speech/tokenizer.json",
            "tokenizers/speech/fit.json")  # (the reference run's later stages added a vocoder beside them)
    assert_same_files(files(a, *made), files(b, *made))
    assert_same_marker(a, b, "tokenize.done.json")


def test_pretrain_killed_four_times_and_a_truncated_checkpoint(ref):
    cwd = copy_before(ref, "pre", ["towers/text", "stages/pretrain-text.*", "fused", "decode", "eval", "judges",
                                   "stages/fuse-*", "stages/decode-*", "stages/eval-*"])
    ckpt = cwd / "run" / "towers" / "text" / "ckpt"
    named = Path("run/towers/text/ckpt")  # as the warnings name them (--run-dir run)

    def truncate_newest(i, run):
        if i == 2:  # after the kill before model.pt: checkpoints 4 and 6 exist; cut the newest short
            newest = sorted(ckpt.glob("step-*.pt"))[-1]
            assert newest.name == "step-00000006.pt"
            newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    res = kill_chain(cwd, pretrain_args("text"), "pretrain-text.done.json",
                     ["step:3",                         # step 3 logged; the last checkpoint is step 2
                      "wrote:step-00000004.pt",         # a checkpoint without its checksum record
                      "write:model.pt",                 # training done, final weights not yet in place
                      "write:pretrain-text.done.json"],  # everything but the marker
                     between=truncate_newest)
    # The run after the 2nd kill found the .pt without a record; the one after the 3rd the truncated file.
    assert f"warning: {named / 'step-00000004.pt'} has no checksum record" in res[2].stderr
    assert f"warning: {named / 'step-00000006.pt'} fails its checksum (truncated or corrupted); using the previous checkpoint" in res[3].stderr
    assert "resuming from" in res[3].stdout and "at step 4" in res[3].stdout
    # The last run resumed at the final step with nothing left to train, and still finished properly.
    a, b = ref / "ref" / "run", cwd / "run"
    assert_same_files(files(a, "towers/text"), files(b, "towers/text"))
    assert metric_rows(a / "towers/text/metrics.jsonl") == metric_rows(b / "towers/text/metrics.jsonl")
    assert_same_marker(a, b, "pretrain-text.done.json")


def test_fuse_killed_three_times_and_a_corrupted_checkpoint(ref):
    tag = "zipper-freeze-text"
    cwd = copy_before(ref, "fuse", ["fused", "decode", "eval", "judges", "stages/fuse-*", "stages/decode-*",
                                    "stages/eval-*"])
    ckpt = cwd / "run" / "fused" / tag / "ckpt"

    def corrupt_newest(i, run):
        if i == 1:  # checkpoints 2 and 4 exist: flip bytes in the middle of the newest, same length
            newest = sorted(ckpt.glob("step-*.pt"))[-1]
            data = bytearray(newest.read_bytes())
            data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
            newest.write_bytes(bytes(data))

    res = kill_chain(cwd, FUSE, f"fuse-{tag}.done.json",
                     ["step:1",                        # one step logged, no checkpoint yet
                      "wrote:step-00000004.json",      # checkpoint 4 complete
                      f"write:fuse-{tag}.done.json"],
                     between=corrupt_newest)
    assert "fails its checksum" in res[2].stderr and "step-00000004.pt" in res[2].stderr
    a, b = ref / "ref" / "run", cwd / "run"
    assert_same_files(files(a, f"fused/{tag}"), files(b, f"fused/{tag}"))
    assert metric_rows(a / f"fused/{tag}/metrics.jsonl") == metric_rows(b / f"fused/{tag}/metrics.jsonl")
    assert_same_marker(a, b, f"fuse-{tag}.done.json")


def test_decode_killed_three_times_including_vocoder_training(ref):
    cwd = copy_before(ref, "dec", ["decode/tts", "stages/decode-tts.*", "tokenizers/speech/vocoder", "eval", "judges",
                                   "stages/eval-*"])
    kill_chain(cwd, DECODE_TTS, "decode-tts.done.json",
               ["wrote:vocoder.pt",             # the unit vocoder trained, its marker not written
                "wrote:*.wav#2",                # two of the four WAVs written, no hypotheses
                "write:decode-tts.done.json"])  # everything but the marker
    a, b = ref / "ref" / "run", cwd / "run"
    assert_same_files(files(a, "decode/tts", "tokenizers/speech/vocoder"),
                      files(b, "decode/tts", "tokenizers/speech/vocoder"))
    assert_same_marker(a, b, "decode-tts.done.json")


def test_eval_killed_three_times_including_judge_training(ref):
    cwd = copy_before(ref, "eval", ["eval", "judges", "stages/eval-*"])
    kill_chain(cwd, EVAL, "eval-all.done.json",
               ["wrote:step-00000010.json",     # the CTC judge's last checkpoint, its weights not exported
                "write:report.json",            # scores computed, the report not in place
                "write:eval-all.done.json"])
    a, b = ref / "ref" / "run", cwd / "run"
    assert_same_files(files(a, "eval/all", "judges"), files(b, "eval/all", "judges"))
    assert_same_marker(a, b, "eval-all.done.json")


def test_killed_for_real_by_a_separate_process(ref):
    """The hook is read by the installed entry point too: a plain `python -m zipper_cli.cli` process."""
    cwd = copy_before(ref, "sub", ["decode/asr", "stages/decode-asr.*"])
    res = zipper(*DECODE_ASR, cwd=cwd, kill_at="write:hyp.jsonl", subprocess_=True)
    assert res.killed and not (cwd / "run" / "stages" / "decode-asr.done.json").exists()
    zipper(*DECODE_ASR, cwd=cwd)
    assert_same_files(files(ref / "ref" / "run", "decode/asr"), files(cwd / "run", "decode/asr"))
