"""Speech tokenizer and k-means: features, clustering, the saved artifact, and pretrained-model loading
with weights the tests make themselves (nothing is downloaded)."""

import json

import numpy as np
import pytest
import torch
import torchaudio

from zipper_cli.errors import ZipperError
from zipper_cli.kmeans import Reservoir, _lloyd, assign, kmeans
from zipper_cli.speech_features import features
from zipper_cli.speech_tokenizer import (
    SpeechTokenizer,
    SpeechTokenizerConfig,
    check_units_match,
    dedup_units,
    fit_speech_tokenizer,
)

SR = 16_000


def synth_wav(seconds: float, seed: int) -> np.ndarray:
    """Sine sweeps, noise bursts and near-silence in random 0.1-0.4 s segments: distinct spectra for k-means."""
    rng = np.random.default_rng(seed)
    out, n = [], int(seconds * SR)
    while sum(map(len, out)) < n:
        m = int(rng.uniform(0.1, 0.4) * SR)
        t = np.arange(m) / SR
        kind = rng.integers(3)
        if kind == 0:
            f0, f1 = rng.uniform(100, 4000, size=2)
            seg = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1])))
        elif kind == 1:
            seg = 0.3 * rng.standard_normal(m)
        else:
            seg = 0.001 * rng.standard_normal(m)
        out.append(seg)
    return np.concatenate(out)[:n].astype(np.float32)


def blobs(n_per, centers, noise, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + noise * torch.randn(n_per, centers.shape[1], generator=g) for c in centers])
    y = torch.arange(len(centers)).repeat_interleave(n_per)
    return x, y


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These problems are tiny: on a busy 2-core machine a second intra-op thread only waits at barriers.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mel_tok():
    cfg = SpeechTokenizerConfig(k=16, frame_rate=25)
    return fit_speech_tokenizer(cfg, [synth_wav(4, s) for s in range(3)], log=lambda s: None)


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("rate", [25, 50, 100])
def test_mel_features_shape_and_frame_rate(rate):
    wav = synth_wav(2.0, 0)  # 32000 samples -> 1 + 32000 // 160 = 201 frames at 100 Hz
    f = features(SpeechTokenizerConfig(frame_rate=rate), wav)
    stack = 100 // rate
    assert f.dtype == torch.float32
    assert f.shape == (201 // stack, 80 * stack)
    # per-utterance normalisation: each mel bin of the 100 Hz frames has mean 0 and std 1
    lm = features(SpeechTokenizerConfig(frame_rate=100), wav)
    assert torch.allclose(lm.mean(0), torch.zeros(80), atol=1e-4)
    assert torch.allclose(lm.std(0, unbiased=False), torch.ones(80), atol=1e-3)
    # stacking concatenates consecutive 100 Hz frames in time order
    assert torch.equal(f[1, :80], lm[stack])


def test_short_and_silent_audio():
    cfg = SpeechTokenizerConfig(frame_rate=25)
    assert features(cfg, np.zeros(100, np.float32)).shape == (0, 320)
    f = features(cfg, np.zeros(SR, np.float32))  # silence: no NaN from zero variance
    assert f.shape == (25, 320) and torch.isfinite(f).all()


# ----------------------------------------------------------------------------- k-means


def test_kmeans_deterministic_per_seed():
    x = torch.randn(3000, 20, generator=torch.Generator().manual_seed(0))
    a, b, c = kmeans(x, 32, seed=1), kmeans(x, 32, seed=1), kmeans(x, 32, seed=2)
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)


def test_kmeans_recovers_separated_clusters():
    centers = 10 * torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    x, y = blobs(250, centers, 0.5, seed=4)
    res = kmeans(x, 8, seed=0)
    labels, _ = assign(x, res.centroids)
    # every true cluster maps to exactly one unit and vice versa
    pairs = set(zip(y.tolist(), labels.tolist()))
    assert len(pairs) == 8 and len({p[1] for p in pairs}) == 8
    assert abs(res.inertia - 16 * 0.25) < 0.5  # = D * noise^2
    assert not res.minibatch


def test_minibatch_kmeans_inertia_close_to_lloyd():
    centers = 6 * torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    x, _ = blobs(400, centers, 1.0, seed=6)  # 12,800 points
    full = kmeans(x, 32, seed=0)
    mb = kmeans(x, 32, seed=0, full_batch_max=5000, batch_size=1024)
    assert mb.minibatch and not full.minibatch
    assert mb.inertia < 1.1 * full.inertia
    assert mb.inertia < 1.2 * 16  # near the noise floor D * noise^2


def test_empty_cluster_is_reseeded():
    x, _ = blobs(200, torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), 0.3, seed=0)
    c0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1e4, 1e4]])  # the third centre wins nothing
    c, _ = _lloyd(x, c0, max_iter=50, tol=1e-6, log=None)
    counts = torch.bincount(assign(x, c)[0], minlength=3)
    assert (counts > 0).all()


def test_reservoir_is_uniform_and_seeded():
    def sample(seed):
        r = Reservoir(1000, torch.Generator().manual_seed(seed))
        for s in range(0, 20_000, 700):
            r.add(torch.arange(s, min(s + 700, 20_000), dtype=torch.float32).unsqueeze(1))
        return r.frames()[:, 0]

    a = sample(0)
    assert a.shape == (1000,) and a.unique().numel() == 1000
    assert abs(a.mean().item() - 10_000) < 800  # a uniform sample of 0..19999, not the first 1000 rows
    assert torch.equal(a, sample(0)) and not torch.equal(a, sample(1))


# ----------------------------------------------------------------------------- the artifact


def test_encode_units_in_range(mel_tok):
    wav = synth_wav(3.0, 10)
    u = mel_tok.encode(wav)
    assert u.dtype == np.int16 and u.ndim == 1
    assert len(u) == (1 + len(wav) // 160) // 4  # 25 Hz
    assert 0 <= u.min() and u.max() < 16 and len(np.unique(u)) > 3
    assert mel_tok.vocab_size == 16 and mel_tok.frame_rate == 25.0


def test_save_load_round_trip(mel_tok, tmp_path):
    mel_tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["centroids.npy", "tokenizer.json"]
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["checksum"] == mel_tok.checksum and meta["kind"] == "mel-kmeans"
    assert {"toolkit_version", "torch_version", "config"} <= meta.keys()
    tok = SpeechTokenizer.load(tmp_path / "tok")
    assert tok.checksum == mel_tok.checksum and tok.cfg == mel_tok.cfg
    wav = synth_wav(2.0, 11)
    assert np.array_equal(tok.encode(wav), mel_tok.encode(wav))


def test_tampered_artifact_is_refused(mel_tok, tmp_path):
    d = tmp_path / "tok"
    mel_tok.save(d)
    c = np.load(d / "centroids.npy")
    c[0, 0] += 1e-3
    np.save(d / "centroids.npy", c)
    with pytest.raises(ZipperError, match="centroids.npy"):
        SpeechTokenizer.load(d)

    mel_tok.save(d)
    meta = json.loads((d / "tokenizer.json").read_text())
    meta["config"]["dedup"] = True  # a setting that changes the units, edited by hand
    (d / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ZipperError, match="tokenizer.json"):
        SpeechTokenizer.load(d)

    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ZipperError, match="tokenizer.json.*corrupt"):
        SpeechTokenizer.load(d)

    mel_tok.save(d)
    (d / "centroids.npy").write_bytes((d / "centroids.npy").read_bytes()[:100])
    with pytest.raises(ZipperError, match="centroids.npy"):
        SpeechTokenizer.load(d)
    with pytest.raises(ZipperError, match="no speech tokenizer"):
        SpeechTokenizer.load(tmp_path / "nowhere")


def test_check_units_match():
    check_units_match("a" * 64, "a" * 64, "tokens/speech")
    with pytest.raises(ZipperError) as e:
        check_units_match("def456" + "0" * 58, "abc123" + "0" * 58, "tokens/speech/shard-0.npy")
    assert str(e.value) == (
        "units in tokens/speech/shard-0.npy were made by speech tokenizer abc123000000.. but this run's "
        "tokenizer is def456000000..; re-run zipper tokenize --force"
    )


def test_dedup(mel_tok):
    assert dedup_units(np.array([5, 5, 2, 2, 2, 5, 7, 7], np.int16)).tolist() == [5, 2, 5, 7]
    assert dedup_units(np.zeros(0, np.int16)).size == 0
    cfg = SpeechTokenizerConfig(k=16, frame_rate=25, dedup=True)
    tok = SpeechTokenizer(cfg, mel_tok.centroids)
    wav = synth_wav(3.0, 12)
    u = tok.encode(wav)
    assert np.array_equal(u, dedup_units(mel_tok.encode(wav)))
    assert (u[1:] != u[:-1]).all()
    assert tok.checksum != mel_tok.checksum  # dedup changes the units, so the artifact's identity


def test_too_little_audio_for_k():
    with pytest.raises(ZipperError, match="--units 512"):
        fit_speech_tokenizer(SpeechTokenizerConfig(k=512), [synth_wav(1.0, 0)], log=lambda s: None)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(kind="wavelet"), "--speech-tokenizer"),
    (dict(k=1), "--units"),
    (dict(frame_rate=30), "--frame-rate"),
    (dict(kind="ssl-kmeans", ssl_checkpoint="x.pt", ssl_arch="no_such_model"), "--ssl-arch"),
    (dict(kind="ssl-kmeans", ssl_checkpoint="x.pt", ssl_layer=0), "--ssl-layer"),
    (dict(kind="ssl-kmeans"), "--ssl-checkpoint"),
    (dict(kind="encodec"), "--codec-checkpoint"),
    (dict(kind="encodec", codec_checkpoint="x.th", codec_bandwidth=2.0), "--codec-bandwidth"),
])
def test_validate_names_the_flag(kwargs, flag):
    with pytest.raises(ZipperError, match=flag):
        SpeechTokenizerConfig(**kwargs).validate()


# ----------------------------------------------------------------------------- pretrained models


@pytest.fixture(scope="module")
def hubert_ckpt(tmp_path_factory):
    """A randomly initialised hubert_base (95M parameters) saved the way a user's checkpoint would be."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ssl") / "hubert_base.pt"
    torch.save(torchaudio.models.hubert_base().state_dict(), path)
    yield path
    path.unlink()  # 377 MB: do not leave it in pytest's kept temp dirs


def test_ssl_kmeans_fit_encode_save_load(hubert_ckpt, tmp_path):
    cfg = SpeechTokenizerConfig(kind="ssl-kmeans", k=8, ssl_arch="hubert_base", ssl_layer=3,
                                ssl_checkpoint=str(hubert_ckpt))
    tok = fit_speech_tokenizer(cfg, [synth_wav(1.0, s) for s in range(2)], log=lambda s: None)
    wav = synth_wav(1.0, 5)
    u = tok.encode(wav)
    assert tok.frame_rate == 50.0 and len(u) == 49  # conv front end: (16000 - 400) // 320 + 1
    assert u.dtype == np.int16 and 0 <= u.min() and u.max() < 8
    assert tok.centroids.shape == (8, 768)
    tok.save(tmp_path / "tok")
    back = SpeechTokenizer.load(tmp_path / "tok")
    assert back.checksum == tok.checksum and back.checkpoint_sha256 == tok.checkpoint_sha256
    assert np.array_equal(back.encode(wav), u)


def test_ssl_checkpoint_errors(hubert_ckpt, tmp_path):
    base = dict(kind="ssl-kmeans", k=8, ssl_arch="hubert_base")
    with pytest.raises(ZipperError, match="--ssl-layer 13: hubert_base has layers 1..12"):
        fit_speech_tokenizer(SpeechTokenizerConfig(**base, ssl_layer=13, ssl_checkpoint=str(hubert_ckpt)), [])
    missing = tmp_path / "missing.pt"
    with pytest.raises(ZipperError, match=f"--ssl-checkpoint {missing}: no such file"):
        fit_speech_tokenizer(SpeechTokenizerConfig(**base, ssl_checkpoint=str(missing)), [])
    wrong = tmp_path / "wrong.pt"
    torch.save({"encoder.bogus.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ZipperError, match=f"--ssl-checkpoint {wrong}: keys do not match torchaudio.models.hubert_base"):
        fit_speech_tokenizer(SpeechTokenizerConfig(**base, ssl_checkpoint=str(wrong)), [])
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ZipperError, match=f"--ssl-checkpoint {junk}: cannot read"):
        fit_speech_tokenizer(SpeechTokenizerConfig(**base, ssl_checkpoint=str(junk)), [])


@pytest.fixture(scope="module")
def encodec_ckpt(tmp_path_factory):
    import warnings

    from encodec import EncodecModel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = EncodecModel.encodec_model_24khz(pretrained=False)  # must not touch the network
    path = tmp_path_factory.mktemp("codec") / "encodec_24khz.th"
    torch.save(model.state_dict(), path)
    return path


def test_encodec_units(encodec_ckpt, tmp_path):
    cfg = SpeechTokenizerConfig(kind="encodec", codec_checkpoint=str(encodec_ckpt))
    tok = fit_speech_tokenizer(cfg, [], log=lambda s: None)
    wav = synth_wav(1.0, 7)
    u = tok.encode(wav)
    assert tok.vocab_size == 1024 and tok.frame_rate == 75.0 and tok.centroids is None
    assert len(u) == 75 and u.dtype == np.int16 and 0 <= u.min() and u.max() < 1024
    tok.save(tmp_path / "tok")
    assert not (tmp_path / "tok" / "centroids.npy").exists()
    back = SpeechTokenizer.load(tmp_path / "tok")
    assert back.checksum == tok.checksum and np.array_equal(back.encode(wav), u)
    # a checkpoint that changed after the tokenizer was made is refused when the model is needed
    other = tmp_path / "other.th"
    sd = torch.load(encodec_ckpt, weights_only=True)
    sd[next(iter(sd))] += 1.0
    torch.save(sd, other)
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    meta["config"]["codec_checkpoint"] = str(other)  # paths are not part of the checksum: the file sha is
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(meta))
    moved = SpeechTokenizer.load(tmp_path / "tok")
    with pytest.raises(ZipperError, match=f"--codec-checkpoint {other}: file changed"):
        moved.encode(wav)
    missing = tmp_path / "none.th"
    with pytest.raises(ZipperError, match=f"--codec-checkpoint {missing}: no such file"):
        fit_speech_tokenizer(SpeechTokenizerConfig(kind="encodec", codec_checkpoint=str(missing)), [])


# ----------------------------------------------------------------------------- ctc-kmeans


@pytest.fixture(scope="module")
def ctc_tok(tmp_path_factory):
    """A ctc-kmeans tokenizer: a tiny CTC encoder trained on tone "speech" (test_ctc_judge's task), then k-means."""
    from test_ctc_judge import tiny, tone_pairs
    from zipper_cli.ctc_judge_train import train_ctc_judge

    d = tmp_path_factory.mktemp("ctc") / "tok"
    encoder = train_ctc_judge(tone_pairs(32, seed=1), tone_pairs(4, seed=2), tiny(steps=40, subsample=2),
                              d / "encoder", log=lambda s: None)
    cfg = SpeechTokenizerConfig(kind="ctc-kmeans", k=8, frame_rate=50)
    tok = fit_speech_tokenizer(cfg, [w for w, _ in tone_pairs(8, seed=3)], log=lambda s: None, encoder=encoder)
    tok.save(d)
    return d, tok, encoder


def test_ctc_kmeans_encodes_the_encoder_states_and_round_trips(ctc_tok):
    from test_ctc_judge import tone_pairs
    from zipper_cli.ctc_judge_model import features as ctc_input

    d, tok, encoder = ctc_tok
    wav = tone_pairs(1, seed=9)[0][0]
    u = tok.encode(wav)
    x = ctc_input(wav)
    assert tok.frame_rate == 50.0 and len(u) == -(-x.shape[0] // 2)  # the encoder's stride, 100 Hz / 2
    assert u.dtype == np.int16 and 0 <= u.min() and u.max() < 8 and len(np.unique(u)) > 1
    with torch.no_grad():
        h, _ = encoder.model.hidden(x[None], torch.tensor([x.shape[0]]))
    assert np.array_equal(u, tok.encode_features(h[0]))  # the units are the nearest centroids of those states
    assert tok.checkpoint_sha256 == encoder.version
    back = SpeechTokenizer.load(d)
    assert back.checksum == tok.checksum and np.array_equal(back.encode(wav), u)
    assert sorted(p.name for p in d.iterdir()) == ["centroids.npy", "encoder", "tokenizer.json"]


def test_ctc_kmeans_refuses_another_encoder(ctc_tok, tmp_path):
    import shutil

    from zipper_cli.ctc_judge_train import load_checkpoint

    d = tmp_path / "tok"
    shutil.copytree(ctc_tok[0], d)
    state = load_checkpoint(d / "encoder" / "model.pt")
    state["out.bias"] = state["out.bias"] + 1.0  # retrained, or edited: its checksum changes
    torch.save(state, d / "encoder" / "model.pt")
    with pytest.raises(ZipperError, match="model.pt: weights checksum"):
        SpeechTokenizer.load(d)
    shutil.rmtree(d / "encoder")
    with pytest.raises(ZipperError, match="no trained CTC judge here"):
        SpeechTokenizer.load(d)


def test_ctc_kmeans_validation():
    with pytest.raises(ZipperError, match="--ctc-encoder-steps 0: must be >= 1"):
        SpeechTokenizerConfig(kind="ctc-kmeans", ctc_encoder_steps=0).validate()
    with pytest.raises(ZipperError, match="--frame-rate 30: ctc-kmeans supports 100, 50 or 25 Hz"):
        SpeechTokenizerConfig(kind="ctc-kmeans", frame_rate=30).validate()
