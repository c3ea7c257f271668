"""`zipper pretrain`: learning, exact resume, SIGTERM, non-finite loss, DDP == one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_small_manifest

from zipper_cli.checkpoint import latest_checkpoint, load_checkpoint
from zipper_cli.errors import ZipperError
from zipper_cli.stages.pretrain import PretrainConfig, load_tower, pretrain
from zipper_cli.stages.tokenize import TokenizeConfig, tokenize
from zipper_cli.speech_tokenizer import SpeechTokenizerConfig
from zipper_cli.text_tokenizer import TextTokenizerConfig
from zipper_cli.devices import autocast_for, cpu_multiplies_bf16, slow_bf16_warning
from zipper_cli.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """One tokenized run directory shared by this module's tests (copied before writing)."""
    root = tmp_path_factory.mktemp("tok")
    manifest = make_small_manifest(root)
    run = root / "run"
    tokenize(run, TokenizeConfig(corpus=(f"manifest:{manifest}",), text=TextTokenizerConfig(vocab_size=40),
                                 speech=SpeechTokenizerConfig(k=16)))
    return run


def fresh(tokenized: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tokenized, run, ignore=shutil.ignore_patterns("towers", "pretrain-*"))
    return run


def cfg(tower="text", **train_kw) -> PretrainConfig:
    kw = dict(max_steps=4, lr=3e-3, warmup_steps=1, max_tokens=128, eval_every=2, ckpt_every=2, seed=1)
    return PretrainConfig(tower=tower, size="tiny", train=TrainConfig(**(kw | train_kw)))


def weights(run: Path, tower="text") -> dict:
    return load_checkpoint(run / "towers" / tower / "model.pt")


def losses(run: Path, tower="text") -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "towers" / tower / "metrics.jsonl").read_text().splitlines()]


def test_both_towers_learn_and_rebuild_from_config(tokenized, tmp_path):
    run = fresh(tokenized, tmp_path)
    for tower in ("text", "speech"):
        out = pretrain(run, cfg(tower, max_steps=40, eval_every=20, ckpt_every=20, max_tokens=256))
        assert out["dev_ppl"] < out["unigram_dev_ppl"]
        model, meta = load_tower(run / "towers" / tower)
        assert meta["modality"] == tower and (run / "towers" / tower / "loss.png").stat().st_size > 1000
        first, last = losses(run, tower)[0], losses(run, tower)[-1]
        assert last < first
    assert pretrain(run, cfg("text", max_steps=40, eval_every=20, ckpt_every=20, max_tokens=256)) is None  # done


def test_resume_equals_uninterrupted(tokenized, tmp_path):
    a = fresh(tokenized, tmp_path / "a")
    # On CPU, where the kernels are deterministic (bitwise): on a GPU, atomics in some backward kernels
    # make even two uninterrupted runs differ in the last bits.
    pretrain(a, cfg(device="cpu"))
    b = fresh(tokenized, tmp_path / "b")
    pretrain(b, cfg(device="cpu"))
    # Turn b into "stopped after step 2": drop what came later, then rerun the same command.
    out = b / "towers" / "text"
    for p in list((out / "ckpt").glob("step-00000004.*")) + [out / "model.pt", b / "stages" / "pretrain-text.done.json"]:
        p.unlink()
    torch.manual_seed(12345)  # the resumed run must restore its own RNG state, not use the caller's
    pretrain(b, cfg(device="cpu"))
    assert losses(a) == losses(b) and len(losses(b)) == 4
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_changed_config_over_unfinished_checkpoints_is_refused(tokenized, tmp_path):
    run = fresh(tokenized, tmp_path)
    pretrain(run, cfg())
    (run / "stages" / "pretrain-text.done.json").unlink()
    with pytest.raises(ZipperError, match=r"holds checkpoints of an unfinished run with a different config \(train.lr: 0.003 -> 0.001\)"):
        pretrain(run, cfg(lr=1e-3))
    assert pretrain(run, cfg(lr=1e-3), force=True)["steps"] == 4


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    calls = {"n": 0}

    def loss_fn(m, batch, device):
        calls["n"] += 1
        out = m(torch.ones(len(batch), 4, device=device)).pow(2).sum()
        return (out * float("nan") if calls["n"] == 3 else out), len(batch)

    loss_fn.count_targets = lambda e: 1
    examples = list(range(8))
    with pytest.raises(ZipperError, match=r"non-finite training loss \(nan\) at step 3; stopped before the update; "
                                          r"the last good checkpoint \(step 2\) is kept"):
        train(tmp_path, model, examples, [], [1] * 8, loss_fn,
              TrainConfig(max_steps=5, max_tokens=8, ckpt_every=2, eval_every=100, warmup_steps=0), log=lambda *_: None)
    step, state = latest_checkpoint(tmp_path / "ckpt")
    assert step == 2 and "model" in state


def _cli(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "zipper_cli.cli", "pretrain", "--run-dir", str(run), "--tower", "text", "--size", "tiny",
            "--lr", "3e-3", "--warmup", "1", "--max-tokens", "128", "--seed", "1", *extra]


def test_sigterm_saves_a_checkpoint_that_resumes(tokenized, tmp_path):
    a = fresh(tokenized, tmp_path / "a")
    b = fresh(tokenized, tmp_path / "b")
    args = ("--steps", "150", "--eval-every", "1000", "--ckpt-every", "1000")
    subprocess.run(_cli(a, *args), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cli(b, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = b / "towers" / "text" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "checkpoint saved" in err and "Traceback" not in err, err
    step, _ = latest_checkpoint(b / "towers" / "text" / "ckpt")
    assert 5 <= step < 150
    subprocess.run(_cli(b, *args), check=True, capture_output=True, timeout=600)
    assert losses(a) == losses(b)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_gloo_processes_equal_one_process(tokenized, tmp_path):
    one = fresh(tokenized, tmp_path / "one")
    two = fresh(tokenized, tmp_path / "two")
    args = ("--steps", "6", "--eval-every", "3", "--ckpt-every", "3", "--device", "cpu")
    subprocess.run(_cli(one, *args), check=True, capture_output=True, timeout=600)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *_cli(two, *args)[1:]], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for x, y in zip(losses(one), losses(two)):
        assert x == pytest.approx(y, rel=1e-4)
    w1, w2 = weights(one), weights(two)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    dev1 = json.loads((one / "stages" / "pretrain-text.done.json").read_text())["outputs"]["dev_loss"]
    dev2 = json.loads((two / "stages" / "pretrain-text.done.json").read_text())["outputs"]["dev_loss"]
    assert dev1 == pytest.approx(dev2, rel=1e-4)


ZEN3_FLAGS = "flags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
ZEN4_FLAGS = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
NEOVERSE_V1 = "Features\t: fp asimd sve bf16 i8mm\n"


def test_native_bf16_is_read_from_the_cpu_flags_and_bf16_where_it_is_emulated_warns():
    assert cpu_multiplies_bf16(ZEN3_FLAGS * 2) is False
    assert cpu_multiplies_bf16(ZEN4_FLAGS) is True and cpu_multiplies_bf16(NEOVERSE_V1) is True
    assert cpu_multiplies_bf16("flags: avx512_bf16x\n") is False  # whole flags only
    assert cpu_multiplies_bf16() in (True, False, None)  # this machine's own answer, whatever it is
    line = slow_bf16_warning(TrainConfig(precision="bf16"), "cpu", ZEN3_FLAGS)
    assert line.startswith("warning: --precision bf16 on a CPU without native bf16") and "--precision auto or fp32" in line
    assert slow_bf16_warning(TrainConfig(precision="bf16"), "cpu", ZEN4_FLAGS) is None
    assert slow_bf16_warning(TrainConfig(precision="bf16"), "cuda", ZEN3_FLAGS) is None
    for precision in ("auto", "fp32"):
        assert slow_bf16_warning(TrainConfig(precision=precision), "cpu", ZEN3_FLAGS) is None


def test_precision_bf16_on_cpu_autocasts_with_the_math_attention_path():
    """--precision bf16 on a CPU: autocast, and attention by matmul + softmax rather than CPU flash
    attention, whose bf16 backward is slow; fp32 (auto on CPU) leaves both alone."""
    q, k, v = (torch.randn(2, 2, 6, 8, requires_grad=True) for _ in range(3))
    with autocast_for(TrainConfig(precision="bf16"), "cpu"):
        assert torch.is_autocast_enabled("cpu")
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert y.dtype == torch.bfloat16 and "Flash" not in type(y.grad_fn).__name__
    y.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    for precision in ("auto", "fp32"):
        with autocast_for(TrainConfig(precision=precision), "cpu"):
            assert not torch.is_autocast_enabled("cpu")
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert y.dtype == torch.float32
