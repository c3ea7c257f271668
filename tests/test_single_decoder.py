import numpy as np
import pytest
import torch

from zipper_cli.errors import ZipperError
from zipper_cli.models.single_decoder import SingleDecoderVocab, build_single_decoder, extend_tower
from zipper_cli.models.tower import Tower, tower_preset
from zipper_cli.text_tokenizer import BOS_ID, EOS_ID, PAD_ID
from zipper_cli.vocab import SPEECH_BOA, SPEECH_EOA, speech_vocab_size


V_TEXT, N_UNITS = 50, 20
V_SPEECH = speech_vocab_size(N_UNITS)  # 23


def text_tower(seed=0):
    torch.manual_seed(seed)
    return Tower(tower_preset("tiny", V_TEXT)).eval()


def test_vocab_layout():
    v = SingleDecoderVocab(V_TEXT, V_SPEECH)
    assert (v.asr_tag, v.tts_tag, v.size, v.n_new) == (73, 74, 75, 25)
    assert v.text([0, 7, 49]).tolist() == [0, 7, 49]
    assert v.speech([0, SPEECH_BOA, SPEECH_EOA, 3, 22]).tolist() == [PAD_ID, 51, 52, 53, 72]
    assert v.to_speech([51, 53, 72]).tolist() == [SPEECH_BOA, 3, 22]
    with pytest.raises(ZipperError):
        v.text([50])
    with pytest.raises(ZipperError):
        v.speech([23])
    with pytest.raises(ZipperError):
        v.to_speech([7])


def test_asr_and_tts_examples():
    v = SingleDecoderVocab(V_TEXT, V_SPEECH)
    units, pieces = [0, 5, 19], [10, 11]
    ids, mask = v.asr_example(units, pieces)
    boa, eoa = V_TEXT + SPEECH_BOA, V_TEXT + SPEECH_EOA
    assert ids.tolist() == [v.asr_tag, boa, 53, 58, 72, eoa, BOS_ID, 10, 11, EOS_ID]
    assert mask.tolist() == [False] * 7 + [True] * 3  # text pieces and eos
    assert ids.dtype == np.int64 and mask.dtype == bool

    ids, mask = v.tts_example(pieces, units)
    assert ids.tolist() == [v.tts_tag, BOS_ID, 10, 11, EOS_ID, boa, 53, 58, 72, eoa]
    assert mask.tolist() == [False] * 6 + [True] * 4  # units and eoa
    assert ids.max() < v.size


@torch.no_grad()
def test_extend_tower_keeps_rows_and_text_logits():
    base = text_tower()
    v = SingleDecoderVocab(V_TEXT, V_SPEECH)
    ext = build_single_decoder(base, v)
    assert ext.cfg.vocab_size == v.size and ext.wte.weight.shape == (v.size, 64)
    old = base.wte.weight
    assert torch.equal(ext.wte.weight[:V_TEXT], old)
    for (k, a), (k2, b) in zip(base.state_dict().items(), ext.state_dict().items()):
        assert k == k2
        if k != "wte.weight":
            assert torch.equal(a, b), k
    new = ext.wte.weight[V_TEXT:]
    # Mean of the old rows plus small noise scaled to their spread: close to the mean, yet all distinct.
    z = (new - old.mean(0)) / old.std(0)  # noise in units of the old rows' per-dimension std
    assert 0 < z.abs().max() < 0.1 * 6  # noise scale 0.1
    assert torch.unique(new, dim=0).shape[0] == v.n_new
    x = torch.randint(0, V_TEXT, (2, 11))
    assert torch.equal(ext(x)[..., :V_TEXT], base(x))
    # reproducible and the caller's tower untouched
    assert torch.equal(extend_tower(base, v.n_new).wte.weight, ext.wte.weight)
    assert base.cfg.vocab_size == V_TEXT
    # --dropout reaches the baseline's layers (the paper's 0.1) and acts only in training.
    drop = build_single_decoder(base, v, dropout=0.1).eval()
    assert drop.cfg.dropout == 0.1 and base.cfg.dropout == 0.0
    assert torch.equal(drop(x)[..., :V_TEXT], base(x))
    assert not torch.equal(drop.train()(x), drop.train()(x))


def test_extended_tower_trains_all_parameters():
    ext = build_single_decoder(text_tower(), SingleDecoderVocab(V_TEXT, V_SPEECH)).train()
    assert all(p.requires_grad for p in ext.parameters())
    ids, _ = SingleDecoderVocab(V_TEXT, V_SPEECH).asr_example([1, 2, 3], [5, 6])
    x = torch.as_tensor(ids)[None]
    logits = ext(x[:, :-1])
    torch.nn.functional.cross_entropy(logits[0], x[0, 1:]).backward()
    assert all(p.grad is not None for p in ext.parameters())
    with pytest.raises(ZipperError):
        build_single_decoder(text_tower(), SingleDecoderVocab(V_TEXT + 1, V_SPEECH))
