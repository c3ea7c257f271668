"""Joint CTC/attention decoding (--ctc-weight): the search with CTC prefix scores is cached == uncached,
batched == one by one, one beam == greedy; the CTC posteriors are the training forward's; CTC pulls the
transcript to what the speech says; bad requests are exact errors."""

import dataclasses

import numpy as np
import pytest
import torch

from test_generate import one_thread  # noqa: F401 (its autouse fixture: one thread for tiny models)
from test_generate import CFG, N_UNITS, V_TEXT, make_zipper, rand_inputs, randomize, toks
from zipper_cli.ctc_prefix import CTCPrefixScorer
from zipper_cli.errors import ZipperError
from zipper_cli.fusion_data import Example, tower_batch
from zipper_cli.generate import GenerationConfig, SingleDecoderGenerator, ZipperGenerator
from zipper_cli.models.single_decoder import SingleDecoderVocab, build_single_decoder
from zipper_cli.models.tower import Tower, tower_preset
from zipper_cli.models.zipper import ZipperConfig


@pytest.fixture(scope="module")
def ctc_zipper():
    model = make_zipper(zcfg=ZipperConfig(n_cross=2, ctc_head=True))
    torch.manual_seed(3)
    randomize(model.ctc_head, std=3.0)  # peaked posteriors, so the CTC term changes choices
    return model


CTC = dataclasses.replace(CFG, ctc_weight=0.5)


def test_ctc_changes_the_transcript_and_one_beam_is_greedy(ctc_zipper):
    gen = ZipperGenerator(ctc_zipper)
    inputs = rand_inputs("speech", [12, 30, 5, 21])
    plain = gen.generate(inputs, "speech", ["text"], CFG)
    joint = gen.generate(inputs, "speech", ["text"], CTC)
    assert toks(joint) != toks(plain)
    beam1 = gen.generate(inputs, "speech", ["text"], dataclasses.replace(CTC, strategy="beam", beam=1))
    assert toks(beam1) == toks(joint)
    assert [r.logprob for r in beam1] == pytest.approx([r.logprob for r in joint], abs=1e-6)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_ctc_cached_equals_uncached_and_batched_equals_one_by_one(ctc_zipper, strategy):
    gen = ZipperGenerator(ctc_zipper)
    inputs = rand_inputs("speech", [12, 30, 0, 5, 21], seed=1)
    cfg = dataclasses.replace(CTC, strategy=strategy, beam=3)
    ref = gen.generate(inputs, "speech", ["text", "speech"], cfg)
    for other in (dataclasses.replace(cfg, use_cache=False), dataclasses.replace(cfg, batch_size=1)):
        got = gen.generate(inputs, "speech", ["text", "speech"], other)
        assert toks(got) == toks(ref)
        assert [r.logprob for r in got] == pytest.approx([r.logprob for r in ref], abs=1e-6)


def test_ctc_posteriors_are_the_training_forwards(ctc_zipper):
    """The scorer reads the CTC head exactly as the training loss does, whatever the text is."""
    inputs = rand_inputs("speech", [7, 15, 1], seed=2)
    scorer = ZipperGenerator(ctc_zipper).ctc_scorer(inputs)
    pieces = rand_inputs("text", [4, 9, 2], seed=3)
    examples = [Example("asr", np.asarray(p) % (V_TEXT - 4) + 4, np.asarray(u), str(i)) for i, (p, u) in enumerate(zip(pieces, inputs))]
    batch = {m: tower_batch(examples, m)[:3] for m in ("text", "speech")}
    with torch.no_grad():
        ctc = ctc_zipper(batch, with_ctc=True)["ctc"].float().log_softmax(-1)
    for i, u in enumerate(inputs):
        n = len(u) + 2  # [begin] units [end]
        torch.testing.assert_close(scorer.x[i, :n], ctc[i, :n], atol=1e-5, rtol=0)


def test_ctc_pulls_the_transcript_to_what_the_posteriors_say(ctc_zipper, monkeypatch):
    """Posteriors that spell a known label sequence: with a high CTC weight greedy and beam search
    transcribe exactly it (the random attention model alone says something else), and end there."""
    targets = [[5, 9, 9, 17], [40, 6], [11, 12, 13, 14, 15]]

    def spelled(inputs):
        out = []
        for t in targets:
            frames = []
            for k, lab in enumerate(t):
                frames += [lab, lab, 0] if k + 1 < len(t) and t[k + 1] == lab else [lab, 0]
            x = torch.full((len(frames) + 3, V_TEXT), -9.0)
            x[torch.arange(len(frames)), torch.tensor(frames)] = 0.0
            x[len(frames):, 0] = 0.0
            out.append(x.log_softmax(-1))
        return CTCPrefixScorer(out)

    gen = ZipperGenerator(ctc_zipper)
    monkeypatch.setattr(gen, "ctc_scorer", spelled)
    inputs = rand_inputs("speech", [10, 10, 10], seed=4)
    assert toks(gen.generate(inputs, "speech", ["text"], CFG)) != [[t] for t in targets]
    for cfg in (dataclasses.replace(CFG, ctc_weight=0.9), dataclasses.replace(CFG, ctc_weight=1.0, strategy="beam")):
        res = gen.generate(inputs, "speech", ["text"], cfg)
        assert toks(res) == [[t] for t in targets]
        assert all(r.ended == [True] for r in res)


def test_ctc_bad_requests_are_exact_errors(ctc_zipper):
    with pytest.raises(ZipperError, match=r"^--ctc-weight \(1.5\) must be in \[0, 1\]$"):
        GenerationConfig(ctc_weight=1.5).validate()
    with pytest.raises(ZipperError, match="^--ctc-weight works with --strategy greedy or beam, not sample$"):
        GenerationConfig(ctc_weight=0.3, strategy="sample").validate()
    gen = ZipperGenerator(ctc_zipper)
    with pytest.raises(ZipperError, match=r"it needs speech in and text as the first output, not text -> speech$"):
        gen.generate([[1, 2]], "text", ["speech"], CTC)
    with pytest.raises(ZipperError, match=r"not speech -> speech,text$"):
        gen.generate([[1, 2]], "speech", ["speech", "text"], CTC)
    no_head = "^--ctc-weight needs a Zipper fused with --ctc-weight > 0 \\(a CTC head on its speech tower\\); this model has none$"
    with pytest.raises(ZipperError, match=no_head):
        ZipperGenerator(make_zipper()).generate([[1, 2]], "speech", ["text"], CTC)
    vocab = SingleDecoderVocab(V_TEXT, N_UNITS + 3)
    single = build_single_decoder(Tower(tower_preset("tiny", V_TEXT)), vocab).eval()
    with pytest.raises(ZipperError, match=no_head):
        SingleDecoderGenerator(single, vocab).generate([[1, 2]], "speech", ["text"], CTC)


def test_ctc_prebeam_smaller_than_the_vocabulary(ctc_zipper, monkeypatch):
    """With fewer CTC candidates than labels (large vocabularies), the rest are -inf: one beam is still
    greedy, cached still uncached, and the chosen tokens are among the attention's top candidates."""
    import zipper_cli.generate_search as gs

    monkeypatch.setattr(gs, "CTC_CANDIDATES", 5)
    gen = ZipperGenerator(ctc_zipper)
    inputs = rand_inputs("speech", [12, 30, 5], seed=5)
    greedy = gen.generate(inputs, "speech", ["text"], CTC, return_logits=True)
    beam1 = gen.generate(inputs, "speech", ["text"], dataclasses.replace(CTC, strategy="beam", beam=1))
    assert toks(beam1) == toks(greedy)
    beam3 = dataclasses.replace(CTC, strategy="beam", beam=3)
    nocache = gen.generate(inputs, "speech", ["text"], dataclasses.replace(beam3, use_cache=False))
    assert toks(gen.generate(inputs, "speech", ["text"], beam3)) == toks(nocache)
    end = 3  # text eos
    for r in greedy:
        for logits, tok in zip(r.logits, list(r.tokens[0]) + ([end] if r.ended[0] else [])):
            masked = logits.float().masked_fill(~gen.allowed("text"), float("-inf"))  # raw logits: mask them
            masked[end] = float("-inf")
            if tok != end:
                assert tok in masked.topk(5).indices.tolist()
