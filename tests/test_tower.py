import pytest
import torch
import torch.nn.functional as F

from zipper_cli.errors import ZipperError
from zipper_cli.models import Tower, TowerConfig, tower_preset



def make_tower(seed=0, wide_logits=False, **overrides):
    torch.manual_seed(seed)
    cfg = tower_preset("tiny", vocab_size=97, **overrides)
    model = Tower(cfg).eval()
    if wide_logits:
        # At GPT-2 init logits are nearly equal and greedy just repeats the input token; larger
        # weights give varied continuations with top-1/top-2 margins far above rounding noise.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 if name == "wte.weight" else 0.3)
    return model


def greedy_uncached(model, prompt, n):
    seq = prompt
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1]:]


def greedy_cached(model, prompt, n):
    B, T = prompt.shape
    model.setup_cache(B, T + n)
    logits = model(prompt, input_pos=torch.arange(T))
    out = []
    for i in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, input_pos=torch.tensor([T + i]))
    model.clear_cache()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@torch.no_grad()
def test_cached_logits_match_full_forward(n_kv_head):
    model = make_tower(n_kv_head=n_kv_head)
    B, P, N = 3, 7, 13
    tokens = torch.randint(0, 97, (B, P + N))
    full = model(tokens)
    model.setup_cache(B, P + N + 5)
    assert model.blocks[0].attn.kv_cache.k.shape == (B, n_kv_head, P + N + 5, 16)
    steps = [model(tokens[:, :P], input_pos=torch.arange(P))]  # prefill
    for t in range(P, P + N):  # one token at a time
        steps.append(model(tokens[:, t:t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2])
@torch.no_grad()
def test_greedy_cached_equals_uncached(n_kv_head):
    model = make_tower(seed=1, wide_logits=True, n_kv_head=n_kv_head)
    prompt = torch.randint(0, 97, (2, 5))
    a = greedy_uncached(model, prompt, 20)
    b = greedy_cached(model, prompt, 20)
    assert torch.equal(a, b)
    assert len(a.unique()) > 5  # a real trajectory, not one token repeated


@torch.no_grad()
def test_per_row_positions_decode_ragged_batch():
    # Right-padded prompts of lengths 6 and 3; each row continues from its own length.
    model = make_tower(seed=2, n_kv_head=2)
    lens = [6, 3]
    seqs = [torch.randint(0, 97, (1, 10)) for _ in lens]
    prompt = torch.zeros(2, 6, dtype=torch.long)
    for i, L in enumerate(lens):
        prompt[i, :L] = seqs[i][0, :L]
    model.setup_cache(2, 12)
    logits = model(prompt, input_pos=torch.arange(6))
    for i, L in enumerate(lens):
        torch.testing.assert_close(logits[i, :L], model.forward(seqs[i])[0, :L], atol=1e-5, rtol=1e-5)
    pos = torch.tensor(lens)
    for _ in range(3):  # feed the true next token of each row at its own position
        nxt = torch.stack([seqs[i][0, p] for i, p in enumerate(pos.tolist())]).view(2, 1)
        step = model(nxt, input_pos=pos.view(2, 1))
        for i, p in enumerate(pos.tolist()):
            ref = model.forward(seqs[i][:, :p + 1])[0, -1]
            torch.testing.assert_close(step[i, 0], ref, atol=1e-5, rtol=1e-5)
        pos = pos + 1


@torch.no_grad()
def test_reorder_cache_for_beams():
    model = make_tower(seed=3)
    tokens = torch.randint(0, 97, (2, 8))
    model.setup_cache(2, 8)
    model(tokens[:, :7], input_pos=torch.arange(7))
    model.reorder_cache(torch.tensor([1, 1]))  # both beams continue row 1
    out = model(tokens[1:, 7:].expand(2, 1), input_pos=torch.tensor([7]))
    ref = model.forward(tokens[1:])[0, -1]
    torch.testing.assert_close(out[0, 0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 0], ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_errors_and_clear():
    model = make_tower()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))
    model.setup_cache(1, 4)
    with pytest.raises(ZipperError, match="past the KV cache length 4"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([4]))
    assert not any("kv_cache" in k for k in model.state_dict())  # caches never checkpointed
    model.clear_cache()
    assert model.blocks[0].attn.kv_cache is None and model.cache_len == 0
    with pytest.raises(ZipperError, match="max_seq_len 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


@torch.no_grad()
def test_causality():
    model = make_tower(seed=4)
    a = torch.randint(0, 97, (2, 16))
    b = a.clone()
    b[:, 10:] = (b[:, 10:] + 1) % 97
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :10], lb[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_tied_embedding():
    model = make_tower()
    h = torch.randn(2, 5, 64)
    torch.testing.assert_close(model.head(h), model.norm_f(h) @ model.wte.weight.T)
    # only one copy in the state dict and the parameter count
    assert [k for k in model.state_dict() if "wte" in k or "head" in k] == ["wte.weight"]
    assert model.num_params() == model.cfg.num_params()
    # the output head sends gradient into the embedding rows of tokens never seen as input
    tokens = torch.zeros(1, 4, dtype=torch.long)
    model(tokens).logsumexp(-1).sum().backward()
    assert model.wte.weight.grad[5].abs().sum() > 0


def test_overfits_tiny_batch():
    torch.manual_seed(0)
    model = Tower(tower_preset("tiny", vocab_size=64)).train()
    tokens = torch.randint(0, 64, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.1


def test_bf16_autocast_runs_with_cache():
    model = make_tower(seed=5)
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(tokens)
        model.setup_cache(2, 9)
        pre = model(tokens[:, :8], input_pos=torch.arange(8))
        last = model(tokens[:, 8:], input_pos=torch.tensor([8]))
    assert full.dtype == torch.bfloat16 and model.blocks[0].attn.kv_cache.k.dtype == torch.float32
    torch.testing.assert_close(torch.cat([pre, last], 1).float(), full.float(), atol=0.15, rtol=0.05)


def test_config_round_trip_and_unknown_key():
    cfg = tower_preset("demo", vocab_size=515, n_kv_head=2, dropout=0.1)
    d = cfg.to_dict()
    assert d["ffn_hidden"] == 704 and d["n_kv_head"] == 2
    assert TowerConfig.from_dict(d) == cfg
    with pytest.raises(ZipperError, match="unknown key 'x' \\(made by a newer zipper\\?\\)"):
        TowerConfig.from_dict({**d, "x": 1})
    d.pop("n_head")
    with pytest.raises(ZipperError, match="missing key 'n_head'"):
        TowerConfig.from_dict(d)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=384, n_head=5), r"n_embd \(384\) must be divisible by n_head \(5\)"),
        (dict(n_embd=64, n_head=4, n_kv_head=3), r"n_head \(4\) must be divisible by n_kv_head \(3\)"),
        (dict(n_embd=60, n_head=4), r"head_dim .* must be even"),
        (dict(n_embd=64, n_head=4, n_layer=0), r"n_layer \(0\) must be a positive integer"),
        (dict(n_embd=64, n_head=4, dropout=1.0), r"dropout \(1.0\) must be in \[0, 1\)"),
        (dict(n_embd=64, n_head=4, vocab_size=0), r"vocab_size \(0\)"),
    ],
)
def test_validate_names_the_field(kwargs, message):
    base = dict(vocab_size=10, n_embd=64, n_layer=2, n_head=4)
    with pytest.raises(ZipperError, match=message):
        TowerConfig(**{**base, **kwargs}).validate()


def test_presets():
    with pytest.raises(ZipperError, match="unknown tower preset 'XL' \\(valid: tiny, demo, S, L\\)"):
        tower_preset("XL", vocab_size=10)
    with pytest.raises(ZipperError, match="unknown tower config field 'width'"):
        tower_preset("tiny", vocab_size=10, width=3)
    with pytest.raises(ZipperError, match="n_embd \\(100\\) must be divisible by n_head \\(3\\)"):
        tower_preset("tiny", vocab_size=10, n_embd=100, n_head=3)
    assert tower_preset("tiny", 10, n_layer=3).n_layer == 3
    demo = tower_preset("demo", 1000)
    assert 2.5e6 < demo.num_params() - 1000 * demo.n_embd < 4e6
    assert Tower(demo).num_params() == demo.num_params()
    s = tower_preset("S", 1000)
    assert 85e6 < s.num_params() < 115e6
    with torch.device("meta"):
        assert Tower(s).num_params() == s.num_params()
    gqa = tower_preset("S", 1000, n_kv_head=4)
    with torch.device("meta"):
        assert Tower(gqa).num_params() == gqa.num_params() < s.num_params()
    assert 0.85e9 < tower_preset("L", 1000).num_params() < 1.2e9


def test_num_params_trainable_and_flops():
    model = make_tower()
    n = model.num_params()
    model.wte.weight.requires_grad_(False)
    assert model.num_params(trainable_only=True) == n - 97 * 64
    c = model.cfg
    assert model.flops_per_token(128) == 6 * n + 12 * c.n_layer * c.n_embd * 128
