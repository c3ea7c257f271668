"""The CUDA path: generation on the GPU is the CPU's (greedy, beam, joint CTC, cached and not); a training
step on the GPU is the CPU's to float tolerance. Skipped where no CUDA device is present: CI has none. On a
GPU machine the rest of the suite covers the CLI on CUDA too, since --device auto picks it for training and
decoding."""

import dataclasses

import pytest
import torch

from test_generate import CFG, make_zipper, rand_inputs, toks
from zipper_cli.generate import GenerationConfig, SingleDecoderGenerator, TowerGenerator, ZipperGenerator
from zipper_cli.models.single_decoder import SingleDecoderVocab, build_single_decoder
from zipper_cli.models.tower import Tower, tower_preset
from zipper_cli.models.zipper import ZipperConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    # TF32 matmuls round to 10 mantissa bits: the CPU comparisons below need full float32/float64 products.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def same_generations(a, b, tol):
    assert toks(a) == toks(b)
    assert [r.ended for r in a] == [r.ended for r in b]
    assert [r.logprob for r in a] == pytest.approx([r.logprob for r in b], abs=tol)


@pytest.mark.parametrize("strategy,ctc", [("greedy", 0.0), ("beam", 0.0), ("greedy", 0.5), ("beam", 0.5)])
def test_zipper_generation_on_cuda_is_the_cpus(strategy, ctc):
    zcfg = ZipperConfig(n_cross=2, ctc_head=True)
    cpu = ZipperGenerator(make_zipper(zcfg=zcfg))  # float64; the same seed builds the same weights twice
    gpu = ZipperGenerator(make_zipper(zcfg=zcfg).cuda())
    cfg = dataclasses.replace(CFG, strategy=strategy, beam=3, ctc_weight=ctc)
    for in_m, outs in (("speech", ["text"]), ("speech", ["text", "speech"])) + ((("text", ["speech"]),) if not ctc else ()):
        inputs = rand_inputs(in_m, [3, 14, 0, 9])
        ref = cpu.generate(inputs, in_m, outs, cfg)
        got = gpu.generate(inputs, in_m, outs, cfg)
        same_generations(got, ref, 1e-4)  # float64 weights; the towers normalise and rotate in float32
        same_generations(gpu.generate(inputs, in_m, outs, dataclasses.replace(cfg, use_cache=False)), ref, 1e-4)


def test_float32_tower_and_single_decoder_on_cuda():
    torch.manual_seed(0)
    tower = Tower(tower_preset("tiny", 97, n_kv_head=2)).eval()
    prompts = rand_inputs("text", [5, 1, 12])
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4)
    ref = TowerGenerator(tower, "text").generate(prompts, cfg=cfg)
    same_generations(TowerGenerator(tower.cuda(), "text").generate(prompts, cfg=cfg), ref, 1e-3)

    torch.manual_seed(1)
    vocab = SingleDecoderVocab(97, 40)
    single = build_single_decoder(Tower(tower_preset("tiny", 97)), vocab).eval().double()
    inputs = rand_inputs("speech", [4, 11])
    ref = SingleDecoderGenerator(single, vocab).generate(inputs, "speech", ["text"], cfg)
    got = SingleDecoderGenerator(single.cuda(), vocab).generate(inputs, "speech", ["text"], cfg)
    same_generations(got, ref, 1e-4)


def test_training_step_on_cuda_is_the_cpus():
    """Loss and every gradient of a float32 step (the update itself is AdamW's, elementwise)."""
    torch.manual_seed(0)
    cpu = Tower(tower_preset("tiny", 97))
    gpu = Tower(tower_preset("tiny", 97)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randint(0, 97, (4, 33))
    losses = []
    for model in (cpu, gpu):
        xs = x.to(next(model.parameters()).device)
        loss = torch.nn.functional.cross_entropy(model(xs[:, :-1]).flatten(0, 1), xs[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-6, rtol=1e-4, msg=name)
