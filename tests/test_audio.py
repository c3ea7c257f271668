"""Audio reading: formats, rates and channels accepted; every problem is a reject with a reason."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from conftest import write_wav
from zipper_cli.audio import AudioLimits, AudioReject, read_audio


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_wav_subtypes_read(tmp_path, subtype):
    wav = read_audio(str(write_wav(tmp_path / "a.wav", 1.0, subtype=subtype)))
    assert wav.dtype == np.float32 and wav.shape == (16000,)


def test_48k_stereo_is_resampled_and_mixed(tmp_path):
    wav = read_audio(str(write_wav(tmp_path / "a.wav", 1.5, sr=48000, channels=2)))
    assert wav.shape == (24000,)


def test_flac_and_segment(tmp_path):
    path = write_wav(tmp_path / "a.flac", 2.0)
    assert read_audio(str(path), start=0.5, end=1.5).shape == (16000,)


def _reason(path, limits=AudioLimits(), **kw):
    with pytest.raises(AudioReject) as e:
        read_audio(str(path), limits, **kw)
    return e.value.reason, e.value.detail


def test_rejects(tmp_path):
    good = write_wav(tmp_path / "good.wav", 1.0)
    (tmp_path / "trunc.wav").write_bytes(good.read_bytes()[:30])
    (tmp_path / "random.flac").write_bytes(np.random.default_rng(0).bytes(4000))
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    nan = np.full(16000, 0.1, np.float32)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    write_wav(tmp_path / "short.wav", 0.1)
    write_wav(tmp_path / "long.wav", 40.0)
    assert _reason(tmp_path / "missing.wav")[0] == "missing_file"
    assert _reason(tmp_path / "trunc.wav")[0] == "unreadable"
    assert _reason(tmp_path / "random.flac")[0] == "unreadable"
    assert _reason(tmp_path / "empty.wav")[0] == "empty_audio"
    assert _reason(tmp_path / "silent.wav")[0] == "silent"
    assert _reason(tmp_path / "nan.wav")[0] == "nan_samples"
    reason, detail = _reason(tmp_path / "short.wav")
    assert reason == "too_short" and "--min-seconds 0.3" in detail
    reason, detail = _reason(tmp_path / "long.wav")
    assert reason == "too_long" and "long.wav: 40.0 s > --max-seconds 30.0" in detail
    assert _reason(good, start=2.0, end=3.0)[0] == "empty_audio"
    for _, detail in [_reason(tmp_path / n) for n in ("trunc.wav", "random.flac")]:
        assert "\n" not in detail
