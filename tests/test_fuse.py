"""`zipper fuse`: the aligned subsets and task mix, both architectures end to end on a tiny run,
the frozen tower kept bitwise, and the errors a user can meet."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import make_small_manifest
from zipper_cli.atomic import read_jsonl
from zipper_cli.checkpoint import load_checkpoint
from zipper_cli.errors import ZipperError
from zipper_cli.shards import load_role
from zipper_cli.fusion_data import (ASR, LM, TTS, Example, make_examples, make_rehearsal, nested_subset, parse_task_mix,
                                   tower_batch, with_other_text)
from zipper_cli.speech_tokenizer import SpeechTokenizerConfig
from zipper_cli.stages.fuse import FuseConfig, fuse, load_fused
from zipper_cli.stages.pretrain import PretrainConfig, load_tower, pretrain
from zipper_cli.stages.tokenize import TokenizeConfig, tokenize
from zipper_cli.text_tokenizer import TextTokenizerConfig
from zipper_cli.trainer import TrainConfig


def test_nested_subsets():
    ids = [f"u{i}" for i in range(1000)]
    small, big = nested_subset(ids, 0, fraction=0.01), nested_subset(ids, 0, fraction=0.1)
    assert len(small) == 10 and len(big) == 100 and set(small) <= set(big)
    assert nested_subset(list(reversed(ids)), 0, count=10) == small  # independent of input order
    assert nested_subset(ids, 1, count=10) != small
    with pytest.raises(ZipperError, match=r"--aligned-fraction must be in \(0, 1\] \(got 1.5\)"):
        nested_subset(ids, 0, fraction=1.5)
    with pytest.raises(ZipperError, match="--aligned-count must be between 1 and 1000"):
        nested_subset(ids, 0, count=0)


def test_task_mix_and_tower_batches():
    utts = [{"id": f"u{i}", "text": np.arange(3) + 5, "speech": np.arange(4)} for i in range(100)]
    ex = make_examples(utts, parse_task_mix("1:1.26"), seed=0)
    assert sum(e.task == TTS for e in ex) == 100 and sum(e.task == ASR for e in ex) == 79
    with pytest.raises(ZipperError, match="--task-mix must look like ASR:TTS"):
        parse_task_mix("half")
    asr = Example(ASR, np.array([7, 8]), np.array([0, 1, 2]), "a")
    tts = Example(TTS, np.array([7, 8]), np.array([0, 1, 2]), "b")
    tok, valid, order, tgt = tower_batch([asr, tts], "text")
    # ASR: text is the output, teacher-forced, after all 5 speech tokens; TTS: text read whole, first.
    assert tok.tolist() == [[2, 7, 8, 0], [2, 7, 8, 3]] and tgt.tolist() == [[7, 8, 3, -100], [-100] * 4]
    assert order[0, :3].tolist() == [5, 6, 7] and order[1].tolist() == [0, 1, 2, 3]
    assert valid.tolist() == [[True, True, True, False], [True] * 4]
    tok, valid, order, tgt = tower_batch([asr, tts], "speech")
    assert tok.tolist() == [[1, 3, 4, 5, 2], [1, 3, 4, 5, 0]] and order[1, :4].tolist() == [4, 5, 6, 7]
    assert tgt.tolist() == [[-100] * 5, [3, 4, 5, 2, -100]]


def test_other_text_gives_each_tts_example_a_different_text_and_keeps_its_speech():
    texts = [[5, 6], [5, 6], [7], [5, 6]]  # the neighbour may say the same: the next different one is taken
    ex = [Example(TTS, np.array(t), np.arange(i + 2), f"u{i}") for i, t in enumerate(texts)]
    got = with_other_text(ex)
    assert [e.pieces.tolist() for e in got] == [[7], [7], [5, 6], [7]]
    assert all(g.uid == e.uid and g.task == TTS and np.array_equal(g.units, e.units) for g, e in zip(got, ex))
    same = [Example(TTS, np.array([5]), np.arange(3), f"s{i}") for i in range(2)]
    assert [e.pieces.tolist() for e in with_other_text(same)] == [[5], [5]]  # nothing else to give
    assert with_other_text([]) == []


def test_rehearsal_examples_are_speech_first_with_an_empty_text():
    utts = [{"id": f"s{i}", "text": None, "speech": np.arange(i + 1)} for i in range(4)]
    ex = make_rehearsal(utts, 10, seed=0, max_units=3)
    assert len(ex) == 10 and all(e.task == LM and len(e.pieces) == 0 for e in ex)
    counts = sorted(Counter(e.uid for e in ex).values())
    assert counts == [2, 2, 3, 3]  # cycles through whole passes: no utterance twice before each once
    assert max(len(e.units) for e in ex) == 3  # cut to max_units
    assert [e.uid for e in make_rehearsal(utts, 10, seed=0)] == [e.uid for e in ex]  # seeded
    lm = Example(LM, np.zeros(0, dtype=np.int64), np.array([0, 1, 2]), "s")
    tok, valid, order, tgt = tower_batch([lm], "speech")  # the speech tower's LM: first, all targets
    assert tok.tolist() == [[1, 3, 4, 5]] and tgt.tolist() == [[3, 4, 5, 2]] and order.tolist() == [[0, 1, 2, 3]]
    tok, valid, order, tgt = tower_batch([lm], "text")  # [begin][end] after the speech, nothing to predict
    assert tok.tolist() == [[2, 3]] and tgt.tolist() == [[-100, -100]] and order.tolist() == [[5, 6]]


def test_rehearsal_rows_are_the_speech_tower_alone():
    """An LM example sees no text (its text comes after the speech), so the fused model's speech logits for
    it are the speech tower's own, however far the fusion modules have trained; its loss is that tower's
    cross-entropy, with no CTC or clock term."""
    from test_generate import make_zipper
    from zipper_cli.models.zipper import ZipperConfig
    from zipper_cli.fusion_losses import ZipperLoss

    # make_zipper randomises the fusion modules and opens the gates: a fusion that has trained.
    model = make_zipper(zcfg=ZipperConfig(n_cross=2, ctc_head=True, input_proj=(), xattn_pos={"text": 1.0, "speech": 0.5},
                                          xattn_clock=True))
    g = np.random.default_rng(0)
    lm = [Example(LM, np.zeros(0, dtype=np.int64), g.integers(0, 37, n), f"s{n}") for n in (5, 9)]
    batch = {m: tuple(t for t in tower_batch(lm, m)[:3]) for m in ("text", "speech")}
    with torch.no_grad():
        fused = model(batch)["speech"]
        alone = model.towers["speech"](batch["speech"][0])
        assert torch.equal(fused, alone)
        tgt = tower_batch(lm, "speech")[3]
        ce = torch.nn.functional.cross_entropy(alone.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum")
        loss, n = ZipperLoss(ctc_weight=1.0, ctc_tts_weight=1.0, clock_weight=1.0)(model, lm, "cpu")
    assert n == 5 + 9 + 2 and loss.item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    run = root / "run"
    tokenize(run, TokenizeConfig(corpus=(f"manifest:{make_small_manifest(root)}",),
                                 text=TextTokenizerConfig(vocab_size=40), speech=SpeechTokenizerConfig(k=16)))
    for tower in ("text", "speech"):
        pretrain(run, PretrainConfig(tower=tower, size="tiny", train=TrainConfig(
            max_steps=10, lr=3e-3, warmup_steps=1, max_tokens=256, eval_every=10, ckpt_every=10)))
    return run


def small_fuse(**kw) -> FuseConfig:
    train = TrainConfig(max_steps=30, lr=3e-3, warmup_steps=2, max_tokens=512, eval_every=15, ckpt_every=15)
    return FuseConfig(**({"train": train} | kw))


def test_zipper_and_baseline_train_and_frozen_text_tower_is_kept(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    z = fuse(run, small_fuse())
    assert z["trainable_params"] < z["params"]
    for task in ("asr", "tts"):
        assert z["final"][f"dev_{task}_loss"] < z["initial"][f"dev_{task}_loss"]
    # The frozen text tower inside the fused checkpoint is bitwise the pretrained one ...
    fused = load_checkpoint(run / "fused" / "zipper-freeze-text" / "model.pt")
    tower = load_checkpoint(run / "towers" / "text" / "model.pt")
    assert all(torch.equal(fused[f"towers.text.{k}"], v) for k, v in tower.items())
    # ... so text-only logits through the fused model equal the pretrained tower's.
    model, meta = load_fused(run / "fused" / "zipper-freeze-text")
    alone, _ = load_tower(run / "towers" / "text")
    x = torch.randint(4, 30, (3, 9))
    assert torch.equal(model.unimodal_logits("text", x), alone(x))
    assert meta["arch"] == "zipper" and (run / "fused" / "zipper-freeze-text" / "gates.png").exists()
    gates = [v for k, v in json.loads((run / "stages" / "fuse-zipper-freeze-text.done.json").read_text())
             ["outputs"]["final"].items() if k.startswith("gate/")]
    assert gates and any(g != 0 for g in gates)
    # The final losses are the last step's evaluation (read once, not recomputed), and that evaluation scored
    # the final model.
    last = read_jsonl(run / "fused" / "zipper-freeze-text" / "metrics.jsonl")[-1]
    assert last["step"] == 30 and all(z["final"][k] == v for k, v in last.items() if k.startswith(("dev_", "gate/"))
                                      and k != "dev_loss" and k != "dev_ppl")
    # Fusion is the identity at step 0, so another utterance's text gives the same TTS loss (up to float
    # rounding: other text lengths batch and pad the speech differently). How much it differs at the end
    # is a measurement (README); 30 steps on this fixture barely open the gates.
    other = "dev_tts_other_text_loss"
    assert z["initial"][other] == pytest.approx(z["initial"]["dev_tts_loss"], rel=1e-5)
    assert z["final"][other] > 0
    assert json.loads((run / "fused" / "zipper-freeze-text" / "initial.json").read_text())[other] == z["initial"][other]

    sd = fuse(run, small_fuse(arch="single-decoder", freeze="none"))
    assert sd["trainable_params"] == sd["params"]
    for task in ("asr", "tts"):
        assert sd["final"][f"dev_{task}_loss"] < sd["initial"][f"dev_{task}_loss"]
    assert sd["initial"]["dev_tts_other_text_loss"] != sd["initial"]["dev_tts_loss"]  # one decoder reads it all
    model, meta = load_fused(run / "fused" / "single-decoder")
    assert meta["arch"] == "single-decoder"


def test_both_towers_frozen_trains_only_the_fusion_modules(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    cfg = small_fuse(freeze="speech,text", train=TrainConfig(max_steps=3, lr=3e-3, warmup_steps=1, max_tokens=512,
                                                             eval_every=3, ckpt_every=3))
    assert cfg.resolved_tag() == "zipper-freeze-text-speech"
    z = fuse(run, cfg)
    fused = load_checkpoint(run / "fused" / "zipper-freeze-text-speech" / "model.pt")
    for name in ("text", "speech"):
        tower = load_checkpoint(run / "towers" / name / "model.pt")
        assert all(torch.equal(fused[f"towers.{name}.{k}"], v) for k, v in tower.items())
    n_towers = sum(v.numel() for k, v in fused.items() if k.startswith("towers."))
    assert z["trainable_params"] == z["params"] - n_towers
    assert any(g != 0 for k, g in z["final"].items() if k.startswith("gate/"))


def test_cross_attention_positions_on_the_data_axis(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    cfg = small_fuse(tag="pos", xattn_pos="auto", xattn_prior=8.0, train=TrainConfig(
        max_steps=3, lr=3e-3, warmup_steps=1, max_tokens=512, eval_every=3, ckpt_every=3))
    fuse(run, cfg)
    model, meta = load_fused(run / "fused" / "pos")
    utts = [u for u in load_role(run, "aligned") if u["text"] is not None and u["speech"] is not None]
    ratio = sum(len(u["text"]) + 2 for u in utts) / sum(len(u["speech"]) + 2 for u in utts)
    assert meta["zipper"]["xattn_pos"] == {"text": 1.0, "speech": pytest.approx(ratio, abs=1e-6)}
    assert model.cfg.xattn_prior == 8.0 and model.fusion[0]["text<-speech"].offset is not None


def test_clock_loss_is_the_squared_log_ratio_of_clock_end_to_text_length():
    from zipper_cli.models.tower import Tower, tower_preset
    from zipper_cli.models.zipper import Zipper, ZipperConfig
    from zipper_cli.fusion_losses import ZipperLoss

    torch.manual_seed(0)
    towers = {"text": Tower(tower_preset("tiny", 40)), "speech": Tower(tower_preset("tiny", 30))}
    model = Zipper.from_towers(ZipperConfig(n_cross=1, input_proj=(), xattn_pos={"text": 1.0, "speech": 0.5},
                                            xattn_clock=True), towers)
    exs = [Example(ASR, np.arange(4, 9), np.arange(3, 15), "a"), Example(TTS, np.arange(4, 7), np.arange(3, 9), "b")]
    ce, n = ZipperLoss()(model, exs, "cpu")
    with_clock, n2 = ZipperLoss(clock_weight=2.0)(model, exs, "cpu")
    # At init the clock runs at 0.5 per speech token. Tower inputs: the input modality with its begin and
    # end tokens (+2), the teacher-forced output with its begin token (+1).
    n_speech = [len(exs[0].units) + 2, len(exs[1].units) + 1]
    n_text = [len(exs[0].pieces) + 1, len(exs[1].pieces) + 2]
    expected = sum(np.log(0.5 * s / t) ** 2 for s, t in zip(n_speech, n_text))
    assert n == n2
    torch.testing.assert_close(with_clock - ce, torch.tensor(2.0 * expected, dtype=ce.dtype), atol=1e-4, rtol=1e-4)


def test_learned_clock_trains_and_is_recorded(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    cfg = small_fuse(tag="clock", xattn_pos="learned", xattn_prior=8.0, gate_init=0.5, clock_weight=1.0, train=TrainConfig(
        max_steps=3, lr=3e-3, warmup_steps=1, max_tokens=512, eval_every=3, ckpt_every=3))
    fuse(run, cfg)
    model, meta = load_fused(run / "fused" / "clock")
    assert meta["zipper"]["xattn_clock"] is True and set(meta["zipper"]["xattn_pos"]) == {"text", "speech"}
    assert model.clock["speech"].weight.abs().sum() > 0  # trained from zero


def test_fuse_errors(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run, ignore=shutil.ignore_patterns("pretrain-speech.done.json"))
    with pytest.raises(ZipperError, match=r"zipper fuse needs stage 'pretrain-speech' finished in .*; run `zipper pretrain` first"):
        fuse(run, small_fuse())
    with pytest.raises(ZipperError, match="--arch single-decoder trains all parameters"):
        fuse(run, small_fuse(arch="single-decoder"))
    with pytest.raises(ZipperError, match=r"--freeze must be text, speech, text,speech or none \(got 'both'\)"):
        fuse(run, small_fuse(freeze="both"))
    with pytest.raises(ZipperError, match=r"--xattn-pos must be auto, learned or none \(got 'on'\)"):
        fuse(run, small_fuse(xattn_pos="on"))
    with pytest.raises(ZipperError, match="--xattn-prior needs --xattn-pos"):
        fuse(run, small_fuse(xattn_prior=8.0))
    with pytest.raises(ZipperError, match="--xattn-pos and --xattn-prior are Zipper options"):
        fuse(run, small_fuse(arch="single-decoder", freeze="none", xattn_pos="auto"))
    with pytest.raises(ZipperError, match=r"--clock-weight needs --xattn-pos learned \(it trains the learned clock\)"):
        fuse(run, small_fuse(xattn_pos="auto", clock_weight=0.5))
    with pytest.raises(ZipperError, match=r"--clock-weight must be >= 0 \(got -1.0\)"):
        fuse(run, small_fuse(xattn_pos="learned", clock_weight=-1.0))
    with pytest.raises(ZipperError, match=r"--tower-lr-mult is a Zipper option \(the single decoder is one network: use --lr\)"):
        fuse(run, small_fuse(arch="single-decoder", freeze="none", train=TrainConfig(tower_lr_mult=0.1)))
    with pytest.raises(ZipperError, match=r"--tower-lr-mult must be > 0 \(got 0.0\)"):
        fuse(run, small_fuse(train=TrainConfig(tower_lr_mult=0.0)))
    with pytest.raises(ZipperError, match=r"--ctc-tts-weight must be >= 0 \(got -1.0\)"):
        fuse(run, small_fuse(ctc_tts_weight=-1.0))
    with pytest.raises(ZipperError, match=r"--ctc-tts-weight is a Zipper option"):
        fuse(run, small_fuse(arch="single-decoder", freeze="none", ctc_tts_weight=1.0))


def test_ctc_weights_apply_per_task_and_linearly():
    """--ctc-weight scores ASR examples and --ctc-tts-weight TTS examples, each adding its weight times the
    examples' CTC losses: on a mixed batch the two terms are those of the one-task batches."""
    from test_generate import make_zipper
    from zipper_cli.models.zipper import ZipperConfig
    from zipper_cli.fusion_losses import ZipperLoss

    model = make_zipper(zcfg=ZipperConfig(n_cross=2, ctc_head=True))
    g = np.random.default_rng(0)
    ex = {task: [Example(task, g.integers(4, 90, n), g.integers(0, 37, 3 * n + 5), f"{task}{n}") for n in (3, 6)]
          for task in (ASR, TTS)}

    def loss(examples, **kw):
        with torch.no_grad():
            return ZipperLoss(**kw)(model, examples, "cpu")[0].item()

    for task, own, other in ((ASR, "ctc_weight", "ctc_tts_weight"), (TTS, "ctc_tts_weight", "ctc_weight")):
        ce = loss(ex[task])
        one = loss(ex[task], **{own: 1.0}) - ce
        assert one > 0
        assert loss(ex[task], **{own: 2.5}) - ce == pytest.approx(2.5 * one, rel=1e-6)  # float32 sums
        assert loss(ex[task], **{other: 7.0}) == ce  # the other task's weight leaves these examples alone
    mixed = ex[ASR] + ex[TTS]
    parts = [loss(ex[t], ctc_weight=0.5, ctc_tts_weight=2.0) - loss(ex[t]) for t in (ASR, TTS)]
    assert loss(mixed, ctc_weight=0.5, ctc_tts_weight=2.0) - loss(mixed) == pytest.approx(sum(parts), rel=1e-5)


def test_speech_input_noise_corrupts_only_tts_inputs_in_training():
    """--speech-input-noise replaces TTS examples' input units (never specials, never ASR or LM rows, never
    targets) at about its rate, in training mode only: dev losses are the clean teacher-forced ones."""
    from test_generate import make_zipper
    from zipper_cli.models.zipper import ZipperConfig
    from zipper_cli.fusion_losses import ZipperLoss, corrupt_units
    from zipper_cli.vocab import SPEECH_OFFSET

    g = np.random.default_rng(0)
    ex = [Example(task, g.integers(4, 90, 5), g.integers(0, 37, 400), f"{task}") for task in (ASR, TTS, LM)]
    tokens, valid, _, targets = tower_batch(ex, "speech")
    torch.manual_seed(0)
    noisy = corrupt_units(tokens, [e.task == TTS for e in ex], 0.3, 37 + SPEECH_OFFSET)
    assert torch.equal(noisy[[0, 2]], tokens[[0, 2]])  # ASR and LM rows untouched
    changed = noisy[1] != tokens[1]
    assert not changed[tokens[1] < SPEECH_OFFSET].any()  # begin and pad stay
    assert (noisy[1][tokens[1] >= SPEECH_OFFSET] >= SPEECH_OFFSET).all()  # units become units
    assert 0.2 < changed.float().sum() / (tokens[1] >= SPEECH_OFFSET).sum() < 0.35  # 0.3 x (1 - 1/37)

    model = make_zipper(zcfg=ZipperConfig(n_cross=2))
    ex = [Example(task, g.integers(4, 90, 5), g.integers(0, 37, 30), f"{task}") for task in (ASR, TTS)]

    def loss(examples, train, **kw):
        model.train(train)
        torch.manual_seed(1)
        with torch.no_grad():
            return ZipperLoss(**kw)(model, examples, "cpu")[0].item()

    assert loss(ex, False, speech_input_noise=0.5) == loss(ex, False)  # evaluation: clean
    assert loss(ex, True, speech_input_noise=0.5) != loss(ex, True)
    assert loss(ex[:1], True, speech_input_noise=0.5) == loss(ex[:1], True)  # ASR: nothing to corrupt
    with pytest.raises(ZipperError, match=r"^--speech-input-noise must be in \[0, 1\) \(got 1.0\)$"):
        FuseConfig(speech_input_noise=1.0).validate()
    with pytest.raises(ZipperError, match="^--speech-input-noise is a Zipper option"):
        FuseConfig(speech_input_noise=0.1, arch="single-decoder", freeze="none").validate()


def test_rehearsal_trains_on_the_speech_role_and_logs_the_towers_drift(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    z = fuse(run, small_fuse(tag="r", rehearsal=0.5, train=TrainConfig(max_steps=6, lr=3e-3, warmup_steps=1,
                                                                      max_tokens=512, eval_every=3, ckpt_every=3)))
    # Step 0: the fused model is its towers, so the conditional TTS loss is the speech tower's LM loss.
    assert z["initial"]["dev_lm_loss"] == pytest.approx(z["initial"]["dev_tts_loss"], rel=1e-6)
    assert z["final"]["dev_lm_loss"] != z["initial"]["dev_lm_loss"]  # the speech tower trained
    rows = [json.loads(x) for x in (run / "fused" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("dev_lm_loss" in r for r in rows if "dev_asr_loss" in r)
    done = json.loads((run / "stages" / "fuse-r.done.json").read_text())
    assert done["config"]["rehearsal"] == 0.5
    with pytest.raises(ZipperError, match=r"^--rehearsal must be >= 0 \(got -1.0\)$"):
        fuse(run, small_fuse(rehearsal=-1.0))
    msg = "--rehearsal trains the speech tower of a Zipper: it needs --arch zipper and a --freeze that leaves"
    with pytest.raises(ZipperError, match=msg):
        fuse(run, small_fuse(rehearsal=1.0, freeze="text,speech"))
    with pytest.raises(ZipperError, match=msg):
        fuse(run, small_fuse(rehearsal=1.0, arch="single-decoder", freeze="none"))


def test_aligned_subset_tag_and_resume(pretrained, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        shutil.copytree(pretrained, run)
    # --speech-input-noise draws from torch's generator: resume must restore it to continue exactly
    cfg = small_fuse(aligned_count=5, freeze="none", speech_input_noise=0.3,
                     train=TrainConfig(max_steps=4, lr=3e-3, warmup_steps=1,
                                                                       max_tokens=256, eval_every=2, ckpt_every=2,
                                                                       device="cpu"))  # bitwise: see test_pretrain
    fuse(a, cfg)
    fuse(b, cfg)
    out = b / "fused" / "zipper-freeze-none-n5"
    for p in list((out / "ckpt").glob("step-00000004.*")) + [out / "model.pt", b / "stages" / "fuse-zipper-freeze-none-n5.done.json"]:
        p.unlink()
    fuse(b, cfg)
    wa = load_checkpoint(a / "fused" / "zipper-freeze-none-n5" / "model.pt")
    wb = load_checkpoint(out / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((out / "config.json").read_text())["aligned_utterances"] == 5
    # Resumed after its last step (killed before model.pt): no step left to run, so the final losses are
    # evaluated afresh, and equal those scored by the last step.
    done = b / "stages" / "fuse-zipper-freeze-none-n5.done.json"
    final = json.loads(done.read_text())["outputs"]["final"]
    (out / "model.pt").unlink()
    done.unlink()
    assert fuse(b, cfg)["final"] == final


def test_zipper_under_two_gloo_processes_equals_one_process(pretrained, tmp_path):
    # Batches hold one task, so every step leaves one cross-attention direction unused: DDP has to be
    # told (find_unused_parameters) or the second process's run fails.
    import os
    import subprocess
    import sys

    runs = {n: tmp_path / n for n in ("one", "two")}
    for r in runs.values():
        shutil.copytree(pretrained, r)
    args = ["fuse", "--freeze", "text", "--steps", "4", "--max-tokens", "512", "--eval-every", "2",
            "--ckpt-every", "2", "--lr", "3e-3", "--warmup", "1", "--device", "cpu", "--ctc-weight", "0.3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "zipper_cli.cli", *args, "--run-dir", str(runs["one"])], check=True,
                   capture_output=True, timeout=600, env=env)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "zipper_cli.cli", *args, "--run-dir", str(runs["two"])],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    w1, w2 = (load_checkpoint(r / "fused" / "zipper-freeze-text" / "model.pt") for r in runs.values())
    # Equal up to float rounding: the all-reduce sums gradients in another order, and Adam divides by
    # sqrt(v), so weights whose gradients are near zero can move by a few 1e-5 (seen once: 1.4e-5). A real
    # DDP bug (no averaging, wrong shards) moves weights by about lr x steps = 1e-2.
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-4)


def test_clock_align_loss_is_gated_by_the_ctc_head_and_trains_the_clock(monkeypatch):
    """--clock-align-weight adds weight x (Huber distance of the speech clock from the CTC forced alignment)
    on ASR examples whose transcript the CTC head reads; none while the head reads none of them."""
    from test_generate import make_zipper
    from zipper_cli.models.zipper import ZipperConfig
    from zipper_cli import fusion_losses
    from zipper_cli.fusion_losses import ZipperLoss

    model = make_zipper(dtype=torch.float32, zcfg=ZipperConfig(n_cross=2, ctc_head=True, input_proj=(),
                                                               xattn_pos={"text": 1.0, "speech": 0.5}, xattn_clock=True))
    g = np.random.default_rng(0)
    ex = [Example(ASR, g.integers(4, 90, n), g.integers(0, 37, 3 * n + 5), f"a{n}") for n in (3, 6)]
    ex += [Example(TTS, g.integers(4, 90, 4), g.integers(0, 37, 17), "t")]

    def loss(**kw):
        return ZipperLoss(ctc_weight=1.0, **kw)(model, ex, "cpu")[0]

    base = loss().item()
    monkeypatch.setattr(fusion_losses, "ALIGN_MAX_NATS", 0.0)  # the head reads nothing yet: no alignment term
    assert loss(clock_align_weight=5.0).item() == base
    monkeypatch.setattr(fusion_losses, "ALIGN_MAX_NATS", float("inf"))
    one = loss(clock_align_weight=1.0).item() - base
    assert one > 0 and loss(clock_align_weight=3.0).item() - base == pytest.approx(3 * one, rel=1e-4)
    model.zero_grad()
    (loss(clock_align_weight=1.0) - loss()).backward()
    assert model.clock["speech"].weight.grad.abs().sum() > 0  # it is the clock that learns from it


def test_clock_align_errors(pretrained, tmp_path):
    msg = r"--clock-align-weight needs --xattn-pos learned \(the clock it trains\) and --ctc-weight \(the CTC head that aligns\)"
    with pytest.raises(ZipperError, match=msg):
        fuse(tmp_path / "run", small_fuse(xattn_pos="auto", ctc_weight=1.0, clock_align_weight=1.0))
    with pytest.raises(ZipperError, match=msg):
        fuse(tmp_path / "run", small_fuse(xattn_pos="learned", clock_align_weight=1.0))
    with pytest.raises(ZipperError, match=r"--clock-align-weight must be >= 0 \(got -1.0\)"):
        fuse(tmp_path / "run", small_fuse(xattn_pos="learned", ctc_weight=1.0, clock_align_weight=-1.0))
