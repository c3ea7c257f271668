"""Unit vocoder: shapes, batching, training, save/load, resume, Griffin-Lim, config errors, ensure_vocoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import speechlike
from zipper_cli.atomic import write_jsonl
from zipper_cli.errors import Interrupted, ZipperError
from zipper_cli.shards import Shard, write_index, write_shard
from zipper_cli.speech_features import log_mel
from zipper_cli.speech_tokenizer import SpeechTokenizerConfig, fit_speech_tokenizer
from zipper_cli.vocoder import (
    UnitVocoder,
    VocoderConfig,
    ensure_vocoder,
    griffin_lim,
    griffin_lim_many,
    load_vocoder,
    train_vocoder,
)

TINY = dict(vocab_size=16, channels=48, layers=3, dilations=(1, 2), post_channels=32, batch_size=8,
            segment_seconds=1.0, lr=3e-3, warmup_steps=10, gl_iters=8)


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def corpus():
    """Synthetic harmonic audio and its units from a tiny K=16, 25 Hz mel-kmeans tokenizer."""
    wavs = [speechlike(1.2 + 0.1 * (i % 4), seed=i) for i in range(10)]
    tok = fit_speech_tokenizer(SpeechTokenizerConfig(k=16, max_fit_frames=2000), wavs, log=quiet)
    return tok, [(tok.encode(w), w) for w in wavs]


def cfg(**kw) -> VocoderConfig:
    return VocoderConfig(**{**TINY, **kw})


def test_shapes_per_frame_rate():
    torch.manual_seed(0)
    for rate, up in ((25.0, 4), (50.0, 2), (100.0, 1)):
        model = UnitVocoder(cfg(frame_rate=rate))
        assert model.upsample == up
        out = model(torch.randint(0, 16, (2, 7)))
        assert out.shape == (2, 7 * up, 80)
        assert model.mel(np.arange(5) % 16).shape == (5 * up, 80)


def test_padded_batch_matches_single_sequences():
    torch.manual_seed(0)
    model = UnitVocoder(cfg()).eval()
    seqs = [np.random.default_rng(i).integers(0, 16, size=n) for i, n in enumerate((3, 11, 7, 0))]
    together = model.mels(seqs, batch_size=4)
    for s, m in zip(seqs, together):
        alone = model.mels([s])[0]
        assert m.shape == (len(s) * 4, 80)
        torch.testing.assert_close(m, alone, rtol=1e-5, atol=1e-5)


def test_units_out_of_range_are_refused():
    model = UnitVocoder(cfg())
    with pytest.raises(ZipperError, match="units outside 0..15"):
        model.mel(np.array([1, 16]))


def test_training_reduces_loss_and_round_trips(corpus, tmp_path):
    _, pairs = corpus
    model = train_vocoder(pairs, cfg(steps=150), tmp_path / "v", quiet)
    meta = json.loads((tmp_path / "v" / "config.json").read_text())
    assert meta["steps"] == 150 and not (tmp_path / "v" / "train.pt").exists()
    assert meta["train_l1"] < 0.7 * meta["first_l1"], meta
    loaded = load_vocoder(tmp_path / "v")
    units = pairs[0][0]
    torch.testing.assert_close(loaded.mel(units), model.mel(units), rtol=0, atol=0)
    wav_a, wav_b = model.vocode(units), loaded.vocode(units)
    assert np.array_equal(wav_a, wav_b)
    assert wav_a.dtype == np.float32 and wav_a.size == len(units) * 640
    assert np.isfinite(wav_a).all() and np.abs(wav_a).max() <= 1.0
    # the trained vocoder predicts the held-in spectral envelope (the mel cepstrum its loss weighs) better
    # than the mean frame does (on this synthetic audio of gliding harmonics the fine structure is the
    # mean frame's to win: with envelope_weight 0 the plain log-mel L1 beats it too, 0.73 against 0.79)
    from zipper_cli.vocoder_train import mel_cepstrum_basis

    true = log_mel(pairs[0][1])[: len(units) * 4]
    basis = mel_cepstrum_basis(80, model.cfg.envelope_cepstra)
    assert ((loaded.mel(units) - true) @ basis).abs().mean() < 0.9 * ((true - true.mean(0)) @ basis).abs().mean()
    # a rerun with the same training config and data loads the finished vocoder instead of training;
    # Griffin-Lim settings are inference-only and are taken from the new config
    lines = []
    again = train_vocoder(pairs, cfg(steps=150, gl_iters=4), tmp_path / "v", lines.append)
    assert any("already trained" in x for x in lines)
    assert again.cfg.gl_iters == 4
    torch.testing.assert_close(again.mel(units), model.mel(units), rtol=0, atol=0)


def test_resume_after_interruption_continues_exactly(corpus, tmp_path):
    _, pairs = corpus
    c = cfg(steps=40, save_every=10)
    straight = train_vocoder(pairs, c, tmp_path / "a", quiet)
    with pytest.raises(Interrupted):
        train_vocoder(pairs, c, tmp_path / "b", quiet, stop_after=25)
    assert (tmp_path / "b" / "train.pt").exists() and not (tmp_path / "b" / "config.json").exists()
    lines = []
    resumed = train_vocoder(pairs, c, tmp_path / "b", lines.append)
    assert any("resuming" in x and "step 25" in x for x in lines), lines
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # a checkpoint from another config is not resumed
    with pytest.raises(Interrupted):
        train_vocoder(pairs, cfg(steps=40, save_every=10, lr=1e-3), tmp_path / "c", quiet, stop_after=5)
    lines = []
    train_vocoder(pairs, cfg(steps=12, save_every=10), tmp_path / "c", lines.append)
    assert any("another config" in x for x in lines)


def test_griffin_lim_gives_finite_audio_of_the_right_length():
    wav = speechlike(1.0, seed=3)
    lm = log_mel(wav)
    out = griffin_lim(lm, n_iter=8)
    assert out.dtype == np.float32 and out.size == lm.shape[0] * 160
    assert np.isfinite(out).all() and 0 < np.abs(out).max() <= 1.0
    assert np.array_equal(out, griffin_lim(lm, n_iter=8))  # seeded phase: deterministic
    # louder than full scale is scaled down, never clipped into distortion
    assert np.abs(griffin_lim(lm + 6.0, n_iter=4)).max() <= 1.0
    assert griffin_lim(torch.zeros(1, 80)).size == 160


def test_griffin_lim_many_in_processes_equals_one_by_one_in_order():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.randn(256, 256) @ torch.randn(256, 256)  # the parent has used its thread pool before the fork
    torch.set_num_threads(threads)
    mels = [log_mel(speechlike(0.2 + 0.1 * (i % 5), seed=i)) for i in range(9)]  # lengths out of order
    mels[4] = torch.as_tensor(mels[4])  # tensors and arrays alike
    one_by_one = [griffin_lim(m, n_iter=4) for m in mels]
    for workers in (2, 1):
        out = griffin_lim_many(mels, n_iter=4, workers=workers)
        assert len(out) == len(mels)
        for a, b in zip(out, one_by_one):
            assert np.array_equal(a, b)
    assert griffin_lim_many([], n_iter=4) == []


@pytest.mark.parametrize("field, value, words", [
    ("kernel_size", 4, "kernel_size 4: must be odd"),
    ("frame_rate", 30.0, "frame_rate 30.0: 100 / frame_rate must be a whole number"),
    ("dilations", (), "dilations []"),
    ("steps", 0, "steps 0: must be >= 1"),
    ("gl_momentum", 1.0, "gl_momentum 1.0"),
    ("envelope_weight", -1.0, "envelope_weight -1.0: must be >= 0"),
    ("envelope_cepstra", 81, "envelope_cepstra 81: must be between 1 and n_mels"),
])
def test_config_validation_names_the_field(field, value, words):
    with pytest.raises(ZipperError, match=f"vocoder config: {words}".replace("[", r"\[").replace("]", r"\]")):
        VocoderConfig(**{field: value}).validate()


def test_config_json_round_trip():
    c = cfg(dilations=(1, 3, 9))
    assert VocoderConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ZipperError, match="unknown fields"):
        VocoderConfig.from_dict({"nope": 1})


def _fake_run(run_dir: Path, tok, pairs) -> None:
    """A run directory as `zipper tokenize` leaves it: tokenizer, manifests with audio, token shards."""
    import soundfile as sf

    tok.save(run_dir / "tokenizers" / "speech")
    for role, name, part in (("speech", "train-speech", pairs[:6]), ("aligned", "aligned", pairs[6:])):
        rows, ids, units = [], [], []
        for i, (u, w) in enumerate(part):
            uid = f"{role}-{i}"
            path = run_dir / "audio" / f"{uid}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, w, 16000, subtype="FLOAT")
            rows.append({"id": uid, "audio": str(path), "start": None, "end": None})
            ids.append(uid)
            units.append(u)
        write_jsonl(run_dir / "data" / f"{name}.jsonl", rows)
        role_dir = run_dir / "tokens" / role
        write_shard(role_dir / "shard-00000.npz", Shard(ids, [None] * len(ids), units, [1.0] * len(ids), "",
                                                        tok.checksum, []))
        write_index(role_dir, {"shards": ["shard-00000.npz"]})


def test_ensure_vocoder_trains_once_then_loads(corpus, tmp_path):
    tok, pairs = corpus
    _fake_run(tmp_path, tok, pairs)
    small = VocoderConfig(**{**TINY, "steps": 20})
    lines = []
    model = ensure_vocoder(tmp_path, lines.append, small)
    marker = json.loads((tmp_path / "tokenizers" / "speech" / "vocoder" / "vocoder.json").read_text())
    assert marker["tokenizer_checksum"] == tok.checksum and marker["utterances"] == len(pairs)
    assert any("first use" in x for x in lines)
    lines = []
    again = ensure_vocoder(tmp_path, lines.append, small)
    assert not any("training" in x for x in lines), lines
    units = pairs[0][0]
    torch.testing.assert_close(again.mel(units), model.mel(units), rtol=0, atol=0)
    # another tokenizer checksum: the old vocoder is stale and is retrained
    meta_path = tmp_path / "tokenizers" / "speech" / "vocoder" / "vocoder.json"
    meta_path.write_text(json.dumps({**marker, "tokenizer_checksum": "0" * 64}))
    lines = []
    ensure_vocoder(tmp_path, lines.append, small)
    assert any("another speech tokenizer" in x for x in lines)


def test_ensure_vocoder_needs_a_tokenizer(tmp_path):
    with pytest.raises(ZipperError, match="no speech tokenizer"):
        ensure_vocoder(tmp_path, quiet)


def test_vocoders_stored_by_earlier_versions_still_load(corpus, tmp_path):
    """A vocoder whose config.json / vocoder.json hold a retired field at its "off" value (mel_floor 0.0)
    is loaded and reused as before; another value of it is refused with a clear error, and
    ensure_vocoder retrains instead of failing."""
    from zipper_cli.vocoder import run_vocoder

    tok, pairs = corpus
    _fake_run(tmp_path, tok, pairs)
    small = VocoderConfig(**{**TINY, "steps": 20})
    model = ensure_vocoder(tmp_path, quiet, small)
    voc_dir = tmp_path / "tokenizers" / "speech" / "vocoder"
    for name, keys in (("config.json", ("config",)), ("vocoder.json", ("config", "training_config"))):
        meta = json.loads((voc_dir / name).read_text())
        for k in keys:
            meta[k]["mel_floor"] = 0.0
        if name == "config.json":
            meta["signature"]["config"]["mel_floor"] = 0.0
        (voc_dir / name).write_text(json.dumps(meta))
    for again in (ensure_vocoder(tmp_path, lambda m: pytest.fail(m), small), run_vocoder(tmp_path, log=quiet),
                  load_vocoder(voc_dir)):
        torch.testing.assert_close(again.mel(pairs[0][0]), model.mel(pairs[0][0]), rtol=0, atol=0)
    # train_vocoder: the same data and config under an earlier version's signature is loaded, not retrained
    c, other = cfg(steps=5), tmp_path / "other"
    train_vocoder(pairs, c, other, quiet)
    meta = json.loads((other / "config.json").read_text())
    meta["signature"]["config"]["mel_floor"] = 0.0
    (other / "config.json").write_text(json.dumps(meta))
    lines = []
    train_vocoder(pairs, c, other, lines.append)
    assert any("already trained" in x for x in lines), lines
    meta = json.loads((voc_dir / "config.json").read_text())
    meta["config"]["mel_floor"] = meta["signature"]["config"]["mel_floor"] = 1e-4
    (voc_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ZipperError, match=r"config.json: vocoder config: mel_floor=0.0001 is no longer supported"):
        load_vocoder(voc_dir)
    marker = json.loads((voc_dir / "vocoder.json").read_text())
    marker["config"]["mel_floor"] = marker["training_config"]["mel_floor"] = 1e-4
    (voc_dir / "vocoder.json").write_text(json.dumps(marker))
    lines = []
    ensure_vocoder(tmp_path, lines.append, small)
    assert any("retraining" in x for x in lines), lines


def test_speaker_rows_default_voice_and_mixed_batches():
    """Speaker labels pick embedding rows; None and unknown labels are the default voice (row 0), exactly;
    a padded batch of mixed speakers equals each sequence alone; averaged vocoders ignore labels."""
    torch.manual_seed(0)
    model = UnitVocoder(cfg(speakers=("kal", "slt", "awb"))).eval()
    units = np.arange(9) % 16
    kal, slt = model.mel(units, "kal"), model.mel(units, "slt")
    assert not torch.equal(kal, slt)
    for default in (None, "nobody"):
        assert torch.equal(model.mel(units, default), kal)
    seqs = [np.random.default_rng(i).integers(0, 16, size=n) for i, n in enumerate((3, 11, 7))]
    labels = ["slt", "awb", None]
    together = model.mels(seqs, batch_size=4, speakers=labels)
    for s, spk, m in zip(seqs, labels, together):
        torch.testing.assert_close(m, model.mel(s, spk), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 speaker labels for 3 unit sequences"):
        model.mels(seqs, speakers=["kal", "slt"])
    averaged = UnitVocoder(cfg()).eval()
    assert averaged.speaker is None and torch.equal(averaged.mel(units, "slt"), averaged.mel(units))
    with pytest.raises(ZipperError, match="speakers: labels must be distinct"):
        cfg(speakers=("a", "a")).validate()


def test_speaker_embedding_recovers_a_voice_the_units_do_not_carry(corpus, tmp_path):
    """Two 'speakers' share every unit sequence, one 12 dB quieter: the units cannot tell them apart, so an
    averaged vocoder predicts the middle for both, while the speaker-conditioned one predicts each."""
    _, pairs = corpus
    data = [(u, w, "loud") for u, w in pairs] + [(u, w * 0.25, "quiet") for u, w in pairs]
    errors = {}
    for name, c in (("averaged", cfg(steps=150)), ("by_speaker", cfg(steps=150, speakers=("loud", "quiet")))):
        model = train_vocoder(data, c, tmp_path / name, quiet)
        errs = []
        for u, w, spk in data:
            true = log_mel(w)[: len(u) * 4]
            errs.append(float((model.mel(u, spk) - true).abs().mean()))
        errors[name] = np.mean(errs)
    # 12 dB is a log-mel shift of log(16) = 2.77: the averaged model is off by about half of it
    assert errors["by_speaker"] < 0.75 * errors["averaged"], errors  # measured 0.81 against 1.44


def test_ensure_vocoder_conditions_on_the_manifest_speakers(corpus, tmp_path):
    """Speakers come from the manifests, most frequent first; a vocoder stored before speakers existed
    (no by_speaker field) still loads as the averaged voice it is, without retraining."""
    from zipper_cli.atomic import read_jsonl
    from zipper_cli.vocoder import training_speakers

    tok, pairs = corpus
    _fake_run(tmp_path, tok, pairs)
    for name in ("train-speech", "aligned"):
        path = tmp_path / "data" / f"{name}.jsonl"
        rows = read_jsonl(path)
        write_jsonl(path, [dict(r, speaker="slt" if i % 3 else "kal") for i, r in enumerate(rows)])
    assert training_speakers(tmp_path) == ("slt", "kal")
    small = VocoderConfig(**{**TINY, "steps": 10})
    model = ensure_vocoder(tmp_path, quiet, small)
    assert model.cfg.speakers == ("slt", "kal") and model.speaker is not None
    averaged = ensure_vocoder(tmp_path, quiet, VocoderConfig(**{**TINY, "steps": 10, "by_speaker": False}))
    assert averaged.cfg.speakers == () and averaged.speaker is None
    voc_dir = tmp_path / "tokenizers" / "speech" / "vocoder"
    for name, keys in (("config.json", ("config",)), ("vocoder.json", ("config", "training_config"))):
        meta = json.loads((voc_dir / name).read_text())
        for k in keys:
            del meta[k]["by_speaker"], meta[k]["speakers"]
        if name == "config.json":
            del meta["signature"]["config"]["by_speaker"], meta["signature"]["config"]["speakers"]
        (voc_dir / name).write_text(json.dumps(meta))
    from zipper_cli.vocoder import run_vocoder

    again = run_vocoder(tmp_path, log=lambda m: pytest.fail(m))
    assert again.cfg.by_speaker is False
    torch.testing.assert_close(again.mel(pairs[0][0]), averaged.mel(pairs[0][0]), rtol=0, atol=0)


def test_mel_cepstrum_basis_is_orthonormal_and_blind_to_a_fast_ripple():
    from zipper_cli.vocoder_train import mel_cepstrum_basis

    b = mel_cepstrum_basis(80, 20)  # [80, 20]
    torch.testing.assert_close(b.t() @ b, torch.eye(20), atol=1e-5, rtol=0)
    full = mel_cepstrum_basis(80, 80)
    x = torch.randn(3, 80)
    torch.testing.assert_close(x @ full @ full.t(), x, atol=1e-4, rtol=0)
    ripple = torch.cos(torch.pi * (torch.arange(80) + 0.5) * 40 / 80)  # cepstral index 40: harmonic-like
    assert (ripple @ b).abs().max() < 1e-4


def test_envelope_loss_adds_the_mel_cepstrum_l1_and_reports_the_plain_l1():
    from zipper_cli.vocoder_train import _loss, mel_cepstrum_basis

    torch.manual_seed(0)
    units = torch.randint(0, 16, (2, 6))
    lens = torch.tensor([6, 4])
    speakers = torch.zeros(2, dtype=torch.long)
    plain = UnitVocoder(cfg(envelope_weight=0.0)).eval()
    mels = torch.randn(2, 24, 80)
    loss, l1 = _loss(plain, units, mels, lens, speakers)
    assert loss.item() == l1.item()
    weighted = UnitVocoder(cfg(envelope_weight=2.0, envelope_cepstra=10)).eval()
    weighted.load_state_dict(plain.state_dict())
    loss2, l1_2 = _loss(weighted, units, mels, lens, speakers)
    assert l1_2.item() == l1.item()
    # by hand, over the 6 * 4 + 4 * 4 real frames only
    err = weighted(units, lens, speakers) - mels
    cep = err @ mel_cepstrum_basis(80, 10)
    real = torch.cat([cep[0, :24], cep[1, :16]])
    torch.testing.assert_close(loss2, l1 + 2.0 * real.abs().mean(), rtol=1e-5, atol=1e-6)
    # a target that differs from the prediction only by a fast ripple costs no envelope loss
    with torch.no_grad():
        pred = weighted(units, lens, speakers)
    ripple = 0.5 * torch.cos(torch.pi * (torch.arange(80) + 0.5) * 40 / 80)
    loss3, l1_3 = _loss(weighted, units, pred + ripple, lens, speakers)
    torch.testing.assert_close(loss3, l1_3, rtol=1e-4, atol=1e-5)


def test_vocoders_stored_before_the_envelope_loss_read_as_trained_without_it():
    stored = cfg().to_dict()
    del stored["envelope_weight"], stored["envelope_cepstra"]
    old = VocoderConfig.from_dict(stored)
    assert old.envelope_weight == 0.0
    assert not VocoderConfig.same_training(stored, cfg())  # today's default trains other weights
    assert VocoderConfig.same_training(stored, cfg(envelope_weight=0.0))
