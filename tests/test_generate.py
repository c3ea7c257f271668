"""Generation: cached == uncached, decoding == training masking, beams, batching, lengths, sampling."""

import dataclasses

import numpy as np
import pytest
import torch

from zipper_cli.errors import ZipperError
from zipper_cli.fusion_data import Example, tower_batch
from zipper_cli.generate import (
    GenerationConfig,
    SingleDecoderGenerator,
    TowerGenerator,
    ZipperGenerator,
    parse_modality_map,
)
from zipper_cli.models.single_decoder import SingleDecoderVocab, build_single_decoder
from zipper_cli.models.tower import Tower, tower_preset
from zipper_cli.models.zipper import Zipper, ZipperConfig



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: threads only add overhead, and on a loaded machine oversubscription is very slow.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


V_TEXT, V_SPEECH = 97, 40  # speech: 37 units
N_UNITS = V_SPEECH - 3


def randomize(module, std=1.0):
    """Unit-scale weights: at the default 0.02 a random model's greedy output ignores its input."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std if "wte" in name else std / p.shape[1] ** 0.5)


def make_zipper(seed=0, dtype=torch.float64, zcfg=None):
    """Tiny towers of different widths/depths, gates open (0.5) so cross-attention matters; end tokens'
    embeddings scaled up so that some outputs end before their maximum length (seed 0: a mix).
    float64 by default: with unit-scale weights, float32 rounding differences between the cached and the
    uncached paths (different matmul shapes) grow to ~3e-5 on logits of magnitude ~10; in float64 the
    comparison can be strict (the towers still normalise and rotate in float32, identically on both)."""
    torch.manual_seed(seed)
    text = Tower(tower_preset("tiny", V_TEXT)).eval()
    randomize(text)
    speech = Tower(tower_preset("tiny", V_SPEECH, n_embd=48, n_layer=3)).eval()
    randomize(speech)
    model = Zipper.from_towers(zcfg or ZipperConfig(n_cross=2), {"text": text, "speech": speech}).eval()
    randomize(model.fusion), randomize(model.input_proj)
    with torch.no_grad():
        for blocks in model.fusion:
            for b in blocks.values():
                b.alpha.fill_(0.5)
                b.beta.fill_(0.5)
        model.towers["text"].wte.weight[3] *= 2.0  # eos
        model.towers["speech"].wte.weight[2] *= 2.5  # eoa
    return model.to(dtype)


@pytest.fixture(scope="module")
def zipper():
    return make_zipper()


@pytest.fixture(scope="module")
def single():
    torch.manual_seed(1)
    vocab = SingleDecoderVocab(V_TEXT, V_SPEECH)
    model = build_single_decoder(Tower(tower_preset("tiny", V_TEXT)), vocab).eval()
    randomize(model)
    with torch.no_grad():
        model.wte.weight[3] *= 2.0
        model.wte.weight[V_TEXT + 2] *= 2.0
    return model.double(), vocab


def rand_inputs(modality, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    hi = N_UNITS if modality == "speech" else V_TEXT
    return [torch.randint(0, hi, (n,), generator=g).tolist() for n in lengths]


def toks(results):
    return [[r.tolist() for r in res.tokens] for res in results]


def assert_same(a, b, tol=1e-5):
    """Identical tokens and flags; logits within tol."""
    assert toks(a) == toks(b)
    assert [r.ended for r in a] == [r.ended for r in b]
    for x, y in zip(a, b):
        assert len(x.logits) == len(y.logits)
        for p, q in zip(x.logits, y.logits):
            torch.testing.assert_close(p, q, atol=tol, rtol=0)


CFG = GenerationConfig(max_new_tokens=10, batch_size=8)
NOCACHE = dataclasses.replace(CFG, use_cache=False)


# --- cached == uncached ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 2e-4)])
def test_tower_continuation_cached_equals_uncached(dtype, tol):
    torch.manual_seed(0)
    tower = Tower(tower_preset("tiny", V_TEXT, n_kv_head=2)).eval()  # GQA too
    randomize(tower, 2.0)
    gen = TowerGenerator(tower.to(dtype), "text")
    prompts = rand_inputs("text", [5, 1, 12, 0])
    a = gen.generate(prompts, cfg=CFG, return_logits=True)
    b = gen.generate(prompts, cfg=NOCACHE, return_logits=True)
    assert_same(a, b, tol)
    assert all(r.outputs == ["text"] for r in a)
    assert any(len(set(t[0])) > 1 for t in toks(a)), "degenerate test model"


@pytest.mark.parametrize("input_modality,outputs", [
    ("speech", ["text"]), ("text", ["speech"]), ("speech", ["text", "speech"]), ("text", ["speech", "text"]),
    ("speech", ["speech", "text"]),  # continue the speech, then transcribe everything
])
def test_zipper_cached_equals_uncached(zipper, input_modality, outputs):
    inputs = rand_inputs(input_modality, [3, 9, 14, 6, 0, 11])
    gen = ZipperGenerator(zipper)
    a = gen.generate(inputs, input_modality, outputs, CFG, return_logits=True)
    b = gen.generate(inputs, input_modality, outputs, NOCACHE, return_logits=True)
    assert_same(a, b)
    # The input matters (cross-attention is on): first-step logits differ between examples.
    assert (a[0].logits[0] - a[1].logits[0]).abs().max() > 0.1


def test_zipper_float32_cached_equals_uncached():
    """The float32 fast path (rotary as a matmul, fused rms_norm) against the float32 training forward."""
    model = make_zipper(dtype=torch.float32)
    inputs = rand_inputs("speech", [3, 9, 0])
    gen = ZipperGenerator(model)
    a = gen.generate(inputs, "speech", ["text", "speech"], CFG, return_logits=True)
    b = gen.generate(inputs, "speech", ["text", "speech"], NOCACHE, return_logits=True)
    assert_same(a, b, 2e-4)


@pytest.mark.parametrize("clock", [False, True])
@pytest.mark.parametrize("task", ["asr", "tts"])
def test_zipper_with_cross_attention_positions_cached_equals_uncached_and_training(task, clock):
    """--xattn-pos auto|learned, --xattn-prior: the cache rotates each key once at its own position and
    each query at its own (a learned clock carried from step to step); the result is the uncached
    decode's and the training forward's at every step."""
    model = make_zipper(zcfg=ZipperConfig(n_cross=2, xattn_pos={"text": 1.0, "speech": 0.37}, xattn_prior=4.0,
                                          xattn_clock=clock))
    if clock:  # content-dependent rates (the clock starts constant)
        with torch.no_grad():
            model.clock["speech"].weight.normal_(0, 0.5)
    in_m, out_m = ("speech", "text") if task == "asr" else ("text", "speech")
    inputs = rand_inputs(in_m, [5, 12, 0, 9])
    gen = ZipperGenerator(model)
    a = gen.generate(inputs, in_m, [out_m, in_m], CFG, return_logits=True)
    assert_same(a, gen.generate(inputs, in_m, [out_m, in_m], NOCACHE, return_logits=True))
    res = gen.generate(inputs, in_m, [out_m], CFG, return_logits=True)
    for x, r in zip(inputs, res):
        out = r.tokens[0]
        ex = Example(task, *((out, np.asarray(x)) if task == "asr" else (np.asarray(x), out)), "u")
        with torch.no_grad():
            full = model({m: tower_batch([ex], m)[:3] for m in ("text", "speech")})[out_m][0]
        for i, step in enumerate(r.logits):
            torch.testing.assert_close(step, full[i], atol=1e-5, rtol=0)


def test_single_decoder_two_outputs_cached_equals_uncached(single):
    model, vocab = single
    inputs = rand_inputs("speech", [4, 10, 0])
    gen = SingleDecoderGenerator(model, vocab)
    a = gen.generate(inputs, "speech", ["text", "speech"], CFG, return_logits=True)
    assert_same(a, gen.generate(inputs, "speech", ["text", "speech"], NOCACHE, return_logits=True))
    for r in a:
        assert r["text"] is r.tokens[0] and r["speech"] is r.tokens[1]
        assert all(0 <= u < N_UNITS for u in r["speech"])
        assert all(0 < p < V_TEXT and p not in (2, 3) for p in r["text"])  # no pad / bos / eos


@pytest.mark.parametrize("task", ["asr", "tts"])
def test_single_decoder_cached_equals_uncached_and_teacher_forcing(single, task):
    model, vocab = single
    in_m, out_m = ("speech", "text") if task == "asr" else ("text", "speech")
    inputs = rand_inputs(in_m, [4, 10, 0, 7])
    gen = SingleDecoderGenerator(model, vocab)
    a = gen.generate(inputs, in_m, [out_m], CFG, return_logits=True)
    b = gen.generate(inputs, in_m, [out_m], NOCACHE, return_logits=True)
    assert_same(a, b)
    # Every step's logits are the training layout's (asr_example / tts_example) at that position.
    for x, r in zip(inputs, a):
        out = r.tokens[0]
        assert out.size == 0 or (out.min() >= 0 and out.max() < (V_TEXT if out_m == "text" else N_UNITS))
        ids, loss_mask = vocab.asr_example(x, out) if task == "asr" else vocab.tts_example(x, out)
        with torch.no_grad():
            full = model(torch.as_tensor(ids[:-1])[None])[0]
        start = int(np.argmax(loss_mask)) - 1  # position of the output's begin token
        for i, step in enumerate(r.logits):
            torch.testing.assert_close(step, full[start + i], atol=1e-5, rtol=0)


# --- decoding reproduces the training masking ------------------------------------------------------------


@pytest.mark.parametrize("task", ["asr", "tts"])
def test_zipper_steps_equal_training_forward(zipper, task):
    """Zipper.forward on the teacher-forced example (fusion_data.tower_batch) gives, at every output
    position, the logits the decoder used to choose that token: the first step proves the prefill's
    masking, the later ones the incremental cross-attention cache."""
    in_m, out_m = ("speech", "text") if task == "asr" else ("text", "speech")
    inputs = rand_inputs(in_m, [5, 12, 0])
    res = ZipperGenerator(zipper).generate(inputs, in_m, [out_m], CFG, return_logits=True)
    for x, r in zip(inputs, res):
        out = r.tokens[0]
        pieces, units = (out, np.asarray(x)) if task == "asr" else (np.asarray(x), out)
        ex = Example(task, pieces, units, "u")
        batch = {m: tower_batch([ex], m)[:3] for m in ("text", "speech")}
        with torch.no_grad():
            full = zipper(batch)[out_m][0]
        assert len(r.logits) == len(out) + r.ended[0]
        for i, step in enumerate(r.logits):
            torch.testing.assert_close(step, full[i], atol=1e-5, rtol=0)


# --- beams ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_modality,outputs", [("speech", ["text"]), ("speech", ["text", "speech"])])
def test_beam_one_is_greedy_and_more_beams_score_higher(zipper, input_modality, outputs):
    inputs = rand_inputs(input_modality, [3, 9, 14, 0])
    gen = ZipperGenerator(zipper)
    cfg = dataclasses.replace(CFG, length_penalty=0.0)
    greedy = gen.generate(inputs, input_modality, outputs, cfg)
    beam1 = gen.generate(inputs, input_modality, outputs, dataclasses.replace(cfg, strategy="beam", beam=1))
    assert toks(beam1) == toks(greedy)
    assert [r.logprob for r in beam1] == pytest.approx([r.logprob for r in greedy], abs=1e-6)
    beam4 = gen.generate(inputs, input_modality, outputs, dataclasses.replace(cfg, strategy="beam", beam=4))
    assert all(b.logprob >= g.logprob - 1e-6 for b, g in zip(beam4, greedy))
    assert any(b.logprob > g.logprob + 1e-3 for b, g in zip(beam4, greedy))
    nocache = dataclasses.replace(cfg, strategy="beam", beam=4, use_cache=False)
    assert toks(gen.generate(inputs, input_modality, outputs, nocache)) == toks(beam4)


def test_learned_clock_survives_beam_reorders_and_batching():
    """--xattn-pos learned: the cache carries one clock per row; beams reorder it, batching pads around it."""
    model = make_zipper(zcfg=ZipperConfig(n_cross=2, xattn_pos={"text": 1.0, "speech": 0.37}, xattn_prior=4.0,
                                          xattn_clock=True))
    with torch.no_grad():
        model.clock["speech"].weight.normal_(0, 0.5)  # content-dependent rates
    inputs = rand_inputs("text", [4, 11, 0, 7])
    gen = ZipperGenerator(model)
    cfg = dataclasses.replace(CFG, strategy="beam", beam=4, length_penalty=0.0)
    beam = gen.generate(inputs, "text", ["speech", "text"], cfg)
    nocache = gen.generate(inputs, "text", ["speech", "text"], dataclasses.replace(cfg, use_cache=False))
    assert toks(beam) == toks(nocache)
    assert [r.logprob for r in beam] == pytest.approx([r.logprob for r in nocache], abs=1e-6)
    batched = gen.generate(inputs, "text", ["speech"], CFG, return_logits=True)
    single = gen.generate(inputs, "text", ["speech"], dataclasses.replace(CFG, batch_size=1), return_logits=True)
    assert_same(batched, single)


def test_beam_length_penalty_and_single_decoder(single):
    model, vocab = single
    gen = SingleDecoderGenerator(model, vocab)
    inputs = rand_inputs("speech", [6, 2])
    greedy = gen.generate(inputs, "speech", ["text"], CFG)
    beam1 = gen.generate(inputs, "speech", ["text"], dataclasses.replace(CFG, strategy="beam", beam=1))
    assert toks(beam1) == toks(greedy)
    beam3 = gen.generate(inputs, "speech", ["text"], dataclasses.replace(CFG, strategy="beam", beam=3,
                                                                         length_penalty=1.0))
    for r in beam3:
        n = sum(len(t) for t in r.tokens) + sum(r.ended)
        assert r.score == pytest.approx(r.logprob / ((5 + n) / 6))


# --- batching, lengths, edge inputs -----------------------------------------------------------------------


def test_batched_equals_one_by_one_ragged(zipper):
    inputs = rand_inputs("speech", [3, 17, 0, 8, 1])
    gen = ZipperGenerator(zipper)
    batched = gen.generate(inputs, "speech", ["text", "speech"], CFG, return_logits=True)
    single = gen.generate(inputs, "speech", ["text", "speech"], dataclasses.replace(CFG, batch_size=1),
                          return_logits=True)
    assert_same(batched, single)


def test_end_token_switching_and_max_length(zipper):
    inputs = rand_inputs("speech", [3, 9, 14, 6, 0, 11])
    res = ZipperGenerator(zipper).generate(inputs, "speech", ["text", "speech"], CFG)
    # The model is built so that some transcripts end by eos and others run to the maximum.
    assert any(r.ended[0] for r in res) and not all(r.ended[0] for r in res)
    for r in res:
        assert r.outputs == ["text", "speech"] and r.max_len == [10, 10]
        for t, ended, cap in zip(r.tokens, r.ended, r.max_len):
            assert ended or len(t) == cap  # stopped early only at the end token
            assert len(t) <= cap
        assert all(0 < p < V_TEXT and p not in (0, 2, 3) for p in r.tokens[0])  # no pad / bos / eos
        assert all(0 <= u < N_UNITS for u in r.tokens[1])
    assert any(r.ended[0] and len(r.tokens[1]) > 0 for r in res)  # switched to speech after eos


def test_length_limits_from_ratios(zipper):
    cfg = GenerationConfig(max_len_ratio={"text": 0.5, "speech": 3.0}, max_len_min={"text": 4, "speech": 5})
    gen = ZipperGenerator(zipper)
    res = gen.generate(rand_inputs("speech", [2, 30]), "speech", ["text"], cfg)
    assert [r.max_len for r in res] == [[4], [15]]
    res = gen.generate(rand_inputs("text", [1, 4]), "text", ["speech"], cfg)
    assert [r.max_len for r in res] == [[5], [12]]
    res = gen.generate(rand_inputs("speech", [8]), "speech", ["text", "speech"], cfg)
    assert res[0].max_len == [4, 8]  # speech after speech input: same modality, ratio 1


def test_length_limits_scale_with_the_unit_rate(zipper):
    """Speech lengths in the flags are 25 Hz units: at 50 Hz the same flags allow the same durations."""
    cfg = GenerationConfig(max_len_ratio={"text": 0.5, "speech": 3.0}, max_len_min={"text": 4, "speech": 5},
                           unit_rate=50.0)
    gen = ZipperGenerator(zipper)
    res = gen.generate(rand_inputs("speech", [2, 30]), "speech", ["text"], cfg)
    assert [r.max_len for r in res] == [[4], [8]]  # 30 units at 50 Hz = 15 at 25 Hz: 0.5 * 15 pieces
    res = gen.generate(rand_inputs("text", [1, 4]), "text", ["speech"], cfg)
    assert [r.max_len for r in res] == [[10], [24]]  # floor 5 -> 10 units, 3 * 4 pieces -> 24 units
    res = gen.generate(rand_inputs("speech", [8]), "speech", ["text", "speech"], cfg)
    assert res[0].max_len == [4, 10]  # same modality: the input length, above the scaled floor
    assert cfg.max_len("speech", "text", 4) == 2 * dataclasses.replace(cfg, unit_rate=25.0).max_len("speech", "text", 4)


def test_default_speech_limit_leaves_short_sentences_three_seconds():
    """A 5-piece sentence may take 3 s of speech at any unit rate; a long one 0.4 s per piece."""
    assert GenerationConfig().max_len("speech", "text", 5) == 75
    assert GenerationConfig(unit_rate=50.0).max_len("speech", "text", 5) == 150
    assert GenerationConfig().max_len("speech", "text", 20) == 200


def test_decode_reads_the_unit_rate_of_the_runs_tokenizer(tmp_path):
    from zipper_cli.stages.decode import speech_unit_rate

    assert speech_unit_rate(tmp_path) == 25.0  # a text-only run: no speech tokenizer
    path = tmp_path / "tokenizers" / "speech" / "tokenizer.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"kind": "ctc-kmeans", "frame_rate": 50.0}')
    assert speech_unit_rate(tmp_path) == 50.0
    path.write_text('{"kind": "ctc-kmeans"}')
    with pytest.raises(ZipperError, match=f"{path}: cannot read the speech tokenizer's unit rate"):
        speech_unit_rate(tmp_path)


def test_empty_input(zipper):
    gen = ZipperGenerator(zipper)
    for in_m, out_m in (("speech", "text"), ("text", "speech")):
        a = gen.generate([[]], in_m, [out_m], CFG, return_logits=True)
        b = gen.generate([[]], in_m, [out_m], NOCACHE, return_logits=True)
        assert_same(a, b)


def test_long_input_cut_with_warning_or_error(zipper):
    gen = ZipperGenerator(zipper)
    max_len = zipper.towers["speech"].cfg.max_seq_len  # 256
    inputs = rand_inputs("speech", [max_len - 7, 5])
    # TTS-style room check: [speech input] then speech continuation after a transcript.
    with pytest.warns(UserWarning, match="cut to fit max_seq_len"):
        res = gen.generate(inputs, "speech", ["text", "speech"], CFG)
    # speech tower: boa + 249 units + eoa = 251 positions, boa of the output, then at most 4 more fed.
    assert res[0].max_len == [10, 5] and res[1].max_len == [10, 10]
    assert len(res[0].tokens[1]) <= 5
    with pytest.raises(ZipperError, match="input 0: 255 speech tokens leave no room"):
        gen.generate(rand_inputs("speech", [max_len - 1]), "speech", ["text", "speech"], CFG)
    with pytest.raises(ZipperError, match="out of range"):
        gen.generate([[N_UNITS]], "speech", ["text"], CFG)


def test_tower_fills_max_seq_len_exactly():
    torch.manual_seed(0)
    tower = Tower(tower_preset("tiny", V_TEXT, max_seq_len=24)).eval().double()
    gen = TowerGenerator(tower, "text")
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16)
    # Positions used: bos + 8 pieces + 15 generated tokens fed back = 24 = max_seq_len (the 16th
    # generated token is never fed, so it needs no position).
    res = gen.generate(rand_inputs("text", [8]), cfg=cfg)
    assert len(res[0].tokens[0]) == 16 and not res[0].ended[0] and res[0].max_len == [16]
    with pytest.warns(UserWarning):
        res = gen.generate(rand_inputs("text", [10]), cfg=cfg)
    assert res[0].max_len == [14]
    ref = gen.generate(rand_inputs("text", [10]), cfg=dataclasses.replace(cfg, max_new_tokens=14, use_cache=False))
    assert toks(res) == toks(ref)


# --- sampling ---------------------------------------------------------------------------------------------


def test_sampling_seeded_reproducible_and_batch_independent(zipper):
    gen = ZipperGenerator(zipper)
    inputs = rand_inputs("speech", [3, 9, 14, 6])
    cfg = dataclasses.replace(CFG, strategy="sample", temperature=1.5, top_p=0.95, seed=7)
    a = gen.generate(inputs, "speech", ["text", "speech"], cfg)
    assert toks(a) == toks(gen.generate(inputs, "speech", ["text", "speech"], cfg))
    one = gen.generate(inputs, "speech", ["text", "speech"], dataclasses.replace(cfg, batch_size=1))
    assert toks(one) == toks(a)
    other = gen.generate(inputs, "speech", ["text", "speech"], dataclasses.replace(cfg, seed=8))
    assert toks(other) != toks(a)
    greedy = gen.generate(inputs, "speech", ["text", "speech"], CFG)
    assert toks(a) != toks(greedy)
    top1 = gen.generate(inputs, "speech", ["text", "speech"], dataclasses.replace(cfg, top_k=1))
    assert toks(top1) == toks(greedy)


def test_sampling_respects_top_k_and_modality(single):
    model, vocab = single
    gen = SingleDecoderGenerator(model, vocab)
    cfg = GenerationConfig(strategy="sample", top_k=3, temperature=3.0, max_new_tokens=30, seed=3)
    res = gen.generate(rand_inputs("text", [5, 8]), "text", ["speech"], cfg, return_logits=True)
    allowed = torch.zeros(vocab.size, dtype=torch.bool)
    allowed[V_TEXT + 3:V_TEXT + V_SPEECH] = True
    allowed[V_TEXT + 2] = True  # eoa
    for r in res:
        ids = [int(u) + V_TEXT + 3 for u in r.tokens[0]] + ([V_TEXT + 2] if r.ended[0] else [])
        for step, tok in zip(r.logits, ids):
            top = step.masked_fill(~allowed, float("-inf")).topk(3).indices.tolist()
            assert tok in top


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,flag", [
    (dict(strategy="nucleus"), "--strategy"), (dict(beam=0), "--beam"), (dict(temperature=0), "--temperature"),
    (dict(top_k=-1), "--top-k"), (dict(top_p=0), "--top-p"), (dict(max_len_ratio={"text": 0}), "--max-len-ratio"),
    (dict(unit_rate=0.0), "unit rate"),
    (dict(max_len_min={"audio": 3}), "--max-len-min"), (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(batch_size=0), "--batch-size"), (dict(length_penalty=float("nan")), "--length-penalty"),
    (dict(guidance=-1.0), "--guidance"),
])
def test_config_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ZipperError, match=flag):
        GenerationConfig(**kwargs).validate()


def test_parse_modality_map_and_bad_requests(zipper):
    assert parse_modality_map("text=0.5,speech=12", "--max-len-ratio") == {"text": 0.5, "speech": 12.0}
    with pytest.raises(ZipperError, match="--max-len-ratio"):
        parse_modality_map("0.5", "--max-len-ratio")
    with pytest.raises(ZipperError, match="--max-len-min"):
        parse_modality_map("text=x", "--max-len-min", int)
    gen = ZipperGenerator(zipper)
    with pytest.raises(ZipperError, match="unknown modality"):
        gen.generate([[1]], "speech", ["image"])
    with pytest.raises(ZipperError, match="consecutive"):
        gen.generate([[1]], "speech", ["text", "text"])


def test_decode_weight_layout_follows_parameter_changes():
    """The cached engines keep a decode-time copy of the weights between calls: an in-place parameter
    update (an optimizer step, load_state_dict) must invalidate it."""
    torch.manual_seed(0)
    tower = Tower(tower_preset("tiny", V_TEXT)).eval()
    randomize(tower, 2.0)
    gen = TowerGenerator(tower, "text")  # float32 on CPU: transposed copies with folded norm weights
    prompts = rand_inputs("text", [5, 9])
    before = gen.generate(prompts, cfg=CFG, return_logits=True)
    with torch.no_grad():
        tower.blocks[0].norm1.weight.mul_(3.0)
        tower.blocks[1].mlp.up.weight.mul_(-1.0)
    after = gen.generate(prompts, cfg=CFG, return_logits=True)
    assert_same(after, gen.generate(prompts, cfg=NOCACHE, return_logits=True), 2e-4)
    assert not torch.allclose(before[0].logits[0], after[0].logits[0])


def test_zipper_unimodal_continuation_is_the_tower_alone(zipper):
    prompts = rand_inputs("text", [4, 9])
    a = ZipperGenerator(zipper).generate(prompts, "text", ["text"], CFG)
    b = TowerGenerator(zipper.towers["text"], "text").generate(prompts, cfg=CFG)
    assert toks(a) == toks(b)


# --- classifier-free guidance (--guidance) ---------------------------------------------------------------


def test_guidance_chooses_from_the_guided_log_probs_cached_and_uncached(zipper):
    """Each speech step's scores are (1 + g) log p(unit | text, units) - g log p(unit | units), the second
    from the speech tower alone on the units so far; the cached and uncached engines agree."""
    g = 1.5
    inputs = rand_inputs("text", [5, 12, 0])
    gen = ZipperGenerator(zipper)
    res = gen.generate(inputs, "text", ["speech"], dataclasses.replace(CFG, guidance=g), return_logits=True)
    ref = gen.generate(inputs, "text", ["speech"], dataclasses.replace(NOCACHE, guidance=g), return_logits=True)
    assert_same(res, ref)
    for x, r in zip(inputs, res):
        ex = Example("tts", np.asarray(x), r.tokens[0], "u")
        batch = {m: tower_batch([ex], m)[:3] for m in ("text", "speech")}
        with torch.no_grad():
            cond = zipper(batch)["speech"][0].float().log_softmax(-1)
            alone = zipper.towers["speech"](batch["speech"][0])[0].float().log_softmax(-1)
        assert len(r.logits) == len(r.tokens[0]) + r.ended[0]
        for i, step in enumerate(r.logits):
            torch.testing.assert_close(step, (1 + g) * cond[i] - g * alone[i], atol=1e-5, rtol=0)
    assert toks(gen.generate(inputs, "text", ["speech"], CFG)) != toks(res)  # it changes what is chosen


def test_guidance_with_beams_and_its_errors(zipper, single):
    gen = ZipperGenerator(zipper)
    inputs = rand_inputs("text", [4, 9, 7])
    beam = dataclasses.replace(CFG, strategy="beam", beam=3, guidance=2.0)
    assert toks(gen.generate(inputs, "text", ["speech"], beam)) == toks(
        gen.generate(inputs, "text", ["speech"], dataclasses.replace(beam, use_cache=False)))
    one = gen.generate(inputs, "text", ["speech"], dataclasses.replace(beam, beam=1))
    assert toks(one) == toks(gen.generate(inputs, "text", ["speech"], dataclasses.replace(CFG, guidance=2.0)))
    with pytest.raises(ZipperError, match=r"^--guidance steers speech outputs \(TTS\): it needs speech among --outputs$"):
        gen.generate(rand_inputs("speech", [4]), "speech", ["text"], dataclasses.replace(CFG, guidance=1.0))
    model, vocab = single
    with pytest.raises(ZipperError, match=r"^--guidance needs a Zipper \(its speech tower alone is the unconditional"):
        SingleDecoderGenerator(model, vocab).generate(inputs, "text", ["speech"], dataclasses.replace(CFG, guidance=1.0))


# --- best of N by the CTC head (--best-of) -----------------------------------------------------------------


def test_best_of_keeps_the_sample_the_ctc_head_reads_as_the_text():
    """--best-of N samples each input N times (copy j of input i is example i * N + j) and keeps the copy
    whose units give the input text the highest CTC log-likelihood under the model's CTC head."""
    model = make_zipper(zcfg=ZipperConfig(n_cross=2, ctc_head=True))
    gen = ZipperGenerator(model)
    inputs = rand_inputs("text", [4, 7, 5])
    N = 4
    sample = dataclasses.replace(CFG, strategy="sample", seed=3)
    best = gen.generate(inputs, "text", ["speech"], dataclasses.replace(sample, best_of=N))
    copies = [x for x in inputs for _ in range(N)]
    cands = gen.generate(copies, "text", ["speech"], sample)
    scores = []
    for c, x in zip(cands, copies):  # the CTC log-likelihood, from the training forward of an ASR example
        ex = Example("asr", np.zeros(0, dtype=np.int64), c.tokens[0], "u")
        batch = {m: tower_batch([ex], m)[:3] for m in ("text", "speech")}
        with torch.no_grad():
            lp = model(batch, with_ctc=True)["ctc"][0].float().log_softmax(-1)
        scores.append(-torch.nn.functional.ctc_loss(lp, torch.tensor(x), (lp.shape[0],), (len(x),), reduction="sum").item())
    assert len({tuple(c.tokens[0].tolist()) for c in cands}) > len(inputs)  # the samples differ
    for i, b in enumerate(best):
        k = max(range(i * N, i * N + N), key=lambda j: scores[j])
        assert b.tokens[0].tolist() == cands[k].tokens[0].tolist()
    assert toks(gen.generate(inputs, "text", ["speech"], dataclasses.replace(sample, best_of=1))) == toks(
        gen.generate(inputs, "text", ["speech"], sample))


def test_best_of_batches_count_inputs_and_give_the_outputs_of_one_input_at_a_time(monkeypatch):
    """--batch-size counts inputs with --best-of, as with --beam: a batch runs batch_size * N rows."""
    import zipper_cli.generate as generate_module

    gen = ZipperGenerator(make_zipper(zcfg=ZipperConfig(n_cross=2, ctc_head=True)))
    inputs = rand_inputs("text", [4, 7, 5])
    cfg = dataclasses.replace(CFG, strategy="sample", seed=3, best_of=4)
    rows, loop = [], generate_module.sample_loop

    def counting_loop(gen_, plan, engine, batch, *args):
        rows.append(len(batch))
        return loop(gen_, plan, engine, batch, *args)

    monkeypatch.setattr(generate_module, "sample_loop", counting_loop)
    two = gen.generate(inputs, "text", ["speech"], dataclasses.replace(cfg, batch_size=2))
    assert rows == [8, 4]
    rows.clear()
    one = gen.generate(inputs, "text", ["speech"], dataclasses.replace(cfg, batch_size=1))
    assert rows == [4, 4, 4]
    assert toks(two) == toks(one)


def test_best_of_errors(zipper):
    with pytest.raises(ZipperError, match=r"^--best-of picks among sampled outputs: it needs --strategy sample$"):
        GenerationConfig(best_of=2).validate()
    with pytest.raises(ZipperError, match=r"^--best-of \(0\) must be a positive integer$"):
        GenerationConfig(best_of=0).validate()
    cfg = GenerationConfig(strategy="sample", best_of=2, max_new_tokens=5)
    with pytest.raises(ZipperError, match=r"^--best-of needs a Zipper fused with --ctc-weight"):
        ZipperGenerator(zipper).generate(rand_inputs("text", [3]), "text", ["speech"], cfg)  # no CTC head
    with pytest.raises(ZipperError, match=r"^--best-of reads sampled speech back as the input text: it needs text in"):
        ZipperGenerator(zipper).generate(rand_inputs("speech", [3]), "speech", ["text"], cfg)
