import pytest
import torch
import torch.nn.functional as F

from zipper_cli.errors import ZipperError
from zipper_cli.models.tower import Tower, tower_preset
from zipper_cli.models.zipper import GatedCrossBlock, Zipper, ZipperConfig, cross_mask


V_TEXT, V_SPEECH = 97, 40


def make_towers(seed=0):
    # Different widths and depths so the width projection g and the layer alignment are exercised.
    torch.manual_seed(seed)
    text = Tower(tower_preset("tiny", V_TEXT)).eval()  # 64 wide, 2 layers
    speech = Tower(tower_preset("tiny", V_SPEECH, n_embd=48, n_layer=3)).eval()
    return {"text": text, "speech": speech}


def make_zipper(towers=None, **cfg):
    cfg = {"n_cross": 2, **cfg}
    model = Zipper.from_towers(ZipperConfig(**cfg), towers or make_towers())
    return model.eval()


def open_gates(model, value=0.5):
    with torch.no_grad():
        for blocks in model.fusion:
            for b in blocks.values():
                b.alpha.fill_(value)
                b.beta.fill_(value)


def asr_batch(B=2, Ts=7, Tt=5, seed=0):
    """[speech][text]: speech orders 0..Ts-1, text Ts..Ts+Tt-1; all valid."""
    g = torch.Generator().manual_seed(seed)
    speech = torch.randint(0, V_SPEECH, (B, Ts), generator=g)
    text = torch.randint(0, V_TEXT, (B, Tt), generator=g)
    s_order = torch.arange(Ts).expand(B, Ts)
    t_order = torch.arange(Ts, Ts + Tt).expand(B, Tt)
    return {
        "speech": (speech, torch.ones(B, Ts, dtype=torch.bool), s_order),
        "text": (text, torch.ones(B, Tt, dtype=torch.bool), t_order),
    }


def tts_batch(B=2, Ts=7, Tt=5, seed=0):
    b = asr_batch(B, Ts, Tt, seed)
    (s, sv, _), (t, tv, _) = b["speech"], b["text"]
    return {"text": (t, tv, torch.arange(Tt).expand(B, Tt)), "speech": (s, sv, torch.arange(Tt, Tt + Ts).expand(B, Ts))}


# --- identity at initialisation ------------------------------------------------------------------------


@torch.no_grad()
def test_init_fused_equals_towers_alone_without_input_proj():
    towers = make_towers()
    model = make_zipper(towers, input_proj=())
    batch = asr_batch()
    out = model(batch)
    for name in ("text", "speech"):
        assert torch.equal(out[name], towers[name](batch[name][0]))


@torch.no_grad()
def test_init_with_input_proj_differs_only_by_the_projection():
    # With input projections on, h0 = ReLU(MLP(embed(x))) replaces embed(x), so the fused output is NOT
    # the tower alone (measured: the logits differ). The gates are still zero, so the fused output is
    # bitwise the tower's blocks and head applied to the projected embeddings: the projection is the
    # only difference.
    towers = make_towers()
    model = make_zipper(towers)
    batch = asr_batch()
    out = model(batch)
    for name, tower in model.towers.items():
        tokens = batch[name][0]
        assert not torch.allclose(out[name], towers[name](tokens))
        x = model.input_proj[name](tower.embed(tokens))
        assert (x >= 0).all()  # the paper's ReLU(MLP(.)) form
        rope, _ = tower.block_inputs(tokens.shape[1])
        for block in tower.blocks:
            x = block(x, rope)
        assert torch.equal(out[name], tower.head(x))


# --- masking ------------------------------------------------------------------------------------------


def test_cross_modal_causality_interleaved_orders():
    # Interleaved linear order: text at 0, 3, 6, 9, 12; speech fills the gaps. Text position 2 (order 6)
    # may see speech 0..3 (orders 1, 2, 4, 5) only, directly or through any path of blocks and fusion.
    model = make_zipper(input_proj=("text", "speech"))
    open_gates(model)
    B, Tt, Ts = 1, 5, 8
    t_order = torch.tensor([[0, 3, 6, 9, 12]])
    s_order = torch.tensor([[1, 2, 4, 5, 7, 8, 10, 11]])
    batch = {
        "text": (torch.randint(0, V_TEXT, (B, Tt)), torch.ones(B, Tt, dtype=torch.bool), t_order),
        "speech": (torch.randint(0, V_SPEECH, (B, Ts)), torch.ones(B, Ts, dtype=torch.bool), s_order),
    }
    emb = {}
    hook = model.towers["speech"].wte.register_forward_hook(lambda m, i, o: emb.setdefault("s", o))
    try:
        for t, n_before in ((2, 4), (0, 0), (4, 8)):
            emb.clear()
            out = model(batch)
            grad, = torch.autograd.grad(out["text"][0, t].logsumexp(-1), emb["s"])  # [1, Ts, 48]
            per_pos = grad.abs().sum(-1)[0]
            assert torch.isfinite(grad).all()
            assert (per_pos[n_before:] == 0).all(), (t, per_pos)  # exactly zero after it
            assert (per_pos[:n_before] > 0).all(), (t, per_pos)  # every earlier speech token matters
    finally:
        hook.remove()


def test_fully_masked_rows_give_exact_zero_update_and_finite_grads():
    torch.manual_seed(0)
    tcfg = make_towers()
    block = GatedCrossBlock(tcfg["text"].cfg, tcfg["speech"].cfg, n_head=4, proj_layers=3, dropout=0.0)
    with torch.no_grad():
        block.alpha.fill_(0.7)
        block.beta.fill_(-0.4)
    x = torch.randn(2, 5, 64, requires_grad=True)
    ctx = torch.randn(2, 6, 48, requires_grad=True)
    mask = torch.rand(2, 5, 6) > 0.5
    mask[0, 1] = False  # one empty row
    mask[1] = False  # a whole example with nothing to attend to
    mask[0, 0] = True
    y = block(x, ctx, mask)
    empty = ~mask.any(-1)
    assert torch.isfinite(y).all()
    assert torch.equal(y[empty], x[empty])  # the whole fusion update is exactly zero
    assert not torch.equal(y[~empty], x[~empty])
    gx, gctx = torch.autograd.grad((y * torch.randn_like(y)).sum(), (x, ctx), retain_graph=True)
    assert torch.isfinite(gx).all() and torch.isfinite(gctx).all()
    assert (gctx[1] == 0).all()  # example 1 attends to nothing: its context gets no gradient
    # Gradient through an empty row is the identity (residual only).
    gx_rows, = torch.autograd.grad(y[empty].sum(), x)
    assert torch.equal(gx_rows[empty], torch.ones_like(gx_rows[empty]))


@torch.no_grad()
def test_first_modality_in_linear_order_is_its_tower_alone():
    # TTS order: text comes entirely first, so every text row is empty and (input projections off) the
    # fused text logits are bitwise the text tower's, even with open gates; speech does change.
    towers = make_towers()
    model = make_zipper(towers, input_proj=())
    open_gates(model)
    batch = tts_batch()
    out = model(batch)
    assert torch.equal(out["text"], towers["text"](batch["text"][0]))
    assert not torch.allclose(out["speech"], towers["speech"](batch["speech"][0]))


@torch.no_grad()
def test_padding_is_never_attended():
    model = make_zipper()
    open_gates(model)
    batch = asr_batch(B=2, Ts=7, Tt=5)
    s, sv, so = batch["speech"]
    sv = sv.clone()
    sv[0, 4:] = False  # example 0 has 4 real speech tokens, then padding
    so = so.clone()
    so[0, 4:] = 0  # padding even claims to come first: only `valid` keeps it out
    ref = model({**batch, "speech": (s, sv, so)})
    s2 = s.clone()
    s2[0, 4:] = (s2[0, 4:] + 5) % V_SPEECH
    out = model({**batch, "speech": (s2, sv, so)})
    assert torch.equal(out["text"], ref["text"])
    assert torch.equal(out["speech"][:, :4], ref["speech"][:, :4])
    assert torch.equal(out["speech"][1], ref["speech"][1])
    # Sanity: with the padding marked valid, the same change does reach the text.
    sv_all = torch.ones_like(sv)
    a = model({**batch, "speech": (s, sv_all, so)})["text"]
    b = model({**batch, "speech": (s2, sv_all, so)})["text"]
    assert not torch.equal(a, b)


def test_cross_mask_rule():
    order_q = torch.tensor([[0, 5, 9]])
    order_kv = torch.tensor([[1, 4, 6, 8]])
    valid = torch.tensor([[True, True, False, True]])
    m = cross_mask(order_q, valid, order_kv)
    assert m.tolist() == [[[False] * 4, [True, True, False, False], [True, True, False, True]]]


# --- freezing and training ------------------------------------------------------------------------------


def fused_loss(model, batch):
    out = model(batch)
    return sum(F.cross_entropy(out[n][:, :-1].flatten(0, 1), batch[n][0][:, 1:].flatten()) for n in out)


def test_frozen_tower_unchanged_and_unimodal_bitwise_after_training():
    towers = make_towers()
    model = make_zipper(towers)
    model.train()
    model.freeze(["text"])
    trainable = {id(p) for p in model.trainable_parameters()}
    text_params = list(model.towers["text"].parameters())
    assert not trainable & {id(p) for p in text_params}
    assert {id(p) for p in model.input_proj.parameters()} <= trainable
    assert {id(p) for p in model.fusion.parameters()} <= trainable
    assert {id(p) for p in model.towers["speech"].parameters()} <= trainable
    assert all(not p.requires_grad for p in text_params)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    # Example 0 ASR, example 1 TTS: with only one order, the modality that comes first never attends,
    # so its fusion blocks would (rightly) get no gradient.
    asr, tts = asr_batch(B=1, Ts=6, Tt=4), tts_batch(B=1, Ts=6, Tt=4, seed=1)
    batch = {n: tuple(torch.cat([a, b]) for a, b in zip(asr[n], tts[n])) for n in asr}
    for _ in range(3):
        opt.zero_grad()
        fused_loss(model, batch).backward()
        opt.step()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if k.startswith("towers.text."):
            assert not changed, k
        elif k.startswith(("fusion.", "input_proj.", "towers.speech.")):
            assert changed, k
    gates = [b.alpha for blocks in model.fusion for b in blocks.values()]
    assert all(g.item() != 0 for g in gates)

    model.eval()
    x = torch.randint(0, V_TEXT, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.unimodal_logits("text", x), towers["text"](x))
        # from_towers deep-copied: the caller's speech tower kept its pretrained weights
        assert not torch.equal(model.towers["speech"].wte.weight, towers["speech"].wte.weight)


def test_optimizer_groups_tower_lr_mult_and_gates():
    from zipper_cli.trainer import optimizer_groups

    model = make_zipper(make_towers())
    model.freeze(["text"])
    groups = optimizer_groups(model, weight_decay=0.1, scalar_lr_mult=10.0, tower_lr_mult=0.1)
    mult = {id(p): (g["lr_mult"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(mult) == sum(len(g["params"]) for g in groups)  # each parameter in one group
    assert not {id(p) for p in model.towers["text"].parameters()} & set(mult)  # frozen: not handed over
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult, decay = mult[id(p)]
        assert lr_mult == pytest.approx((0.1 if name.startswith("towers.speech.") else 1.0)
                                        * (10.0 if p.dim() == 0 else 1.0)), name
        assert decay == (0.1 if p.dim() >= 2 else 0.0), name
    # A plain tower (pretraining) has no towers: the multiplier does not apply
    tower = make_towers()["speech"]
    assert {g["lr_mult"] for g in optimizer_groups(tower, 0.1, 10.0, tower_lr_mult=0.1)} == {1.0}


def test_freeze_sets_exactly_the_named_towers_and_share():
    towers = make_towers()
    model = Zipper.from_towers(ZipperConfig(n_cross=1), towers, share=True)
    assert model.towers["text"] is towers["text"]
    model.freeze(["speech"])
    model.freeze(["text"])
    assert all(p.requires_grad for p in model.towers["speech"].parameters())
    assert not any(p.requires_grad for p in model.towers["text"].parameters())
    model.freeze([])
    assert len(model.trainable_parameters()) == len(list(model.parameters()))
    with pytest.raises(ZipperError, match="--freeze"):
        model.freeze(["video"])


# --- config -------------------------------------------------------------------------------------------


def test_config_round_trip_and_validation():
    cfg = ZipperConfig(cross_every={"text": 1, "speech": 2}, input_proj=("speech",), proj_layers=2, dropout=0.1)
    d = cfg.to_dict()
    assert d["towers"] == ["text", "speech"] and d["input_proj"] == ["speech"]
    assert ZipperConfig.from_dict(d) == cfg
    assert ZipperConfig.from_dict(ZipperConfig().to_dict()) == ZipperConfig()
    pos = ZipperConfig(xattn_pos={"text": 1.0, "speech": 0.2}, xattn_prior=8.0)
    assert ZipperConfig.from_dict(pos.to_dict()) == pos
    with pytest.raises(ZipperError, match="unknown key 'n_heads'"):
        ZipperConfig.from_dict({**d, "n_heads": 3})
    bad = [
        (dict(n_cross=0), "--n-cross"),
        (dict(n_cross=2, cross_every={"text": 1, "speech": 1}), "exclusive"),
        (dict(cross_every={"text": 1}), "--cross-every"),
        (dict(cross_every={"text": 1, "speech": 0}), "--cross-every-speech"),
        (dict(input_proj=("txt",)), "--input-proj"),
        (dict(proj_layers=0), "--proj-layers"),
        (dict(xattn_heads=-1), "--xattn-heads"),
        (dict(dropout=1.0), "--dropout"),
        (dict(towers=("text",)), "towers"),
        (dict(towers=("text", "text")), "towers"),
        (dict(towers=("a.b", "c")), "tower name"),
        (dict(xattn_pos={"text": 1.0}), "--xattn-pos needs a scale for every tower"),
        (dict(xattn_pos={"text": 1.0, "speech": 0.0}), "--xattn-pos: the speech scale"),
        (dict(xattn_prior=-1.0), "--xattn-prior"),
        (dict(xattn_prior=4.0), "--xattn-prior needs --xattn-pos"),
    ]
    for kwargs, flag in bad:
        with pytest.raises(ZipperError, match=flag):
            ZipperConfig(**kwargs).validate()


def test_cross_points_for_different_depths():
    pts = ZipperConfig(n_cross=2).cross_points({"text": 2, "speech": 3})
    assert pts == {"text": [1, 2], "speech": [2, 3]}  # 1.5 rounds up
    assert ZipperConfig().cross_points({"text": 12, "speech": 6}) == {"text": [3, 6, 9, 12], "speech": [2, 3, 5, 6]}
    assert ZipperConfig(n_cross=1).cross_points({"text": 4, "speech": 7}) == {"text": [4], "speech": [7]}
    every = ZipperConfig(cross_every={"text": 2, "speech": 3}).cross_points({"text": 8, "speech": 12})
    assert every == {"text": [2, 4, 6, 8], "speech": [3, 6, 9, 12]}
    with pytest.raises(ZipperError, match="same number"):
        ZipperConfig(cross_every={"text": 2, "speech": 2}).cross_points({"text": 8, "speech": 12})
    with pytest.raises(ZipperError, match="--n-cross"):
        ZipperConfig(n_cross=3).cross_points({"text": 2, "speech": 3})
    # The model wires the blocks accordingly: 2 points, one block per direction at each.
    model = make_zipper()
    assert model.points == {"text": [1, 2], "speech": [2, 3]}
    assert [sorted(b) for b in model.fusion] == [["speech<-text", "text<-speech"]] * 2
    g = model.fusion[0]["text<-speech"].g
    assert g[0].in_features == 48 and g[-1].out_features == 64


def test_bad_heads_and_batch():
    with pytest.raises(ZipperError, match="--xattn-heads"):
        make_zipper(xattn_heads=5)
    model = make_zipper()
    with pytest.raises(ZipperError, match="batch"):
        model({"text": asr_batch()["text"]})


@torch.no_grad()
def test_from_configs_loads_state_dict_and_three_towers():
    model = make_zipper()
    open_gates(model)
    clone = Zipper.from_configs(model.cfg, {n: t.cfg for n, t in model.towers.items()}).eval()
    clone.load_state_dict(model.state_dict())
    batch = asr_batch()
    out, out2 = model(batch), clone(batch)
    assert all(torch.equal(out[n], out2[n]) for n in out)

    # Written for N towers: three towers get a block per ordered pair, and still start as the identity.
    towers = make_towers()
    torch.manual_seed(1)
    towers["video"] = Tower(tower_preset("tiny", 30, n_embd=32, n_layer=2)).eval()
    cfg = ZipperConfig(towers=("text", "speech", "video"), n_cross=2, input_proj=())
    model = Zipper.from_towers(cfg, towers).eval()
    assert len(model.fusion[0]) == 6 and "video<-speech" in model.fusion[1]
    batch = {**asr_batch(Ts=7, Tt=5), "video": (torch.randint(0, 30, (2, 4)), torch.ones(2, 4, dtype=torch.bool),
                                                 torch.arange(12, 16).expand(2, 4))}
    out = model(batch)
    assert all(torch.equal(out[n], towers[n](batch[n][0])) for n in towers)
    open_gates(model)
    assert not torch.equal(model(batch)["video"], out["video"])


# --- the auxiliary CTC head ------------------------------------------------------------------------------


def test_ctc_head_leaves_logits_alone_and_feeds_g_from_the_first_step():
    from zipper_cli.fusion_losses import ZipperLoss
    from zipper_cli.fusion_data import ASR, Example

    torch.manual_seed(0)
    model = make_zipper(ctc_head=True, input_proj=()).train()
    batch = asr_batch()
    with torch.no_grad():
        plain, with_ctc = model(batch), model(batch, with_ctc=True)
    assert all(torch.equal(plain[n], with_ctc[n]) for n in ("text", "speech"))
    assert with_ctc["ctc"].shape == (2, 7, V_TEXT)  # [B, T_speech, V_text]
    with pytest.raises(ZipperError, match="no CTC head"):
        make_zipper()(batch, with_ctc=True)

    # The loss is linear in the weight; the CTC part alone is the CTC of the head's outputs.
    ex = [Example(ASR, torch.randint(4, V_TEXT, (4,)).numpy(), torch.randint(0, V_SPEECH - 3, (12,)).numpy(), f"u{i}")
          for i in range(3)]
    l0, n = ZipperLoss(0.0)(model.eval(), ex, "cpu")
    l1, _ = ZipperLoss(1.0)(model, ex, "cpu")
    l3, _ = ZipperLoss(3.0)(model, ex, "cpu")
    assert n == 15 and torch.allclose(l3 - l0, 3 * (l1 - l0), rtol=1e-4) and (l1 - l0) > 0

    # With zero gates the cross-attention's projection g gets no gradient from cross-entropy; the CTC
    # loss reaches it from the first step (the reason the option exists).
    g = model.fusion[-1]["text<-speech"].g[0].weight
    for weight, moves in ((0.0, False), (0.3, True)):
        model.zero_grad(set_to_none=True)
        ZipperLoss(weight)(model, ex, "cpu")[0].backward()
        assert (g.grad is not None and bool(g.grad.abs().sum() > 0)) == moves
    # The head is saved with the model and rebuilt from the config.
    again = Zipper.from_configs(model.cfg, {n: t.cfg for n, t in model.towers.items()})
    again.load_state_dict(model.state_dict())
    assert ZipperConfig.from_dict(model.cfg.to_dict()).ctc_head is True


# --- positions in cross-attention (--xattn-pos, --xattn-prior) ----------------------------------------------


POS = {"xattn_pos": {"text": 1.0, "speech": 0.25}, "xattn_prior": 8.0}


@torch.no_grad()
def test_init_with_cross_attention_positions_still_equals_towers_alone():
    towers = make_towers()
    model = make_zipper(towers, input_proj=(), **POS)
    for batch in (asr_batch(), tts_batch()):
        out = model(batch)
        for name in ("text", "speech"):
            assert torch.equal(out[name], towers[name](batch[name][0]))


@torch.no_grad()
def test_prior_starts_cross_attention_on_the_shared_axis_diagonal():
    """With the learned projections at zero only the prior's offset is left: text query t then scores
    speech key s highest where s * 0.25 == t, and the score depends on the distance on the shared axis
    only. Without positions the same block scores every key alike (the paper's position-blind start)."""
    towers = make_towers()
    block = make_zipper(towers, **POS).fusion[0]["text<-speech"]
    for lin in (block.q, block.kv):
        lin.weight.zero_()
    x, ctx = torch.randn(1, 6, 64), torch.randn(1, 24, 48)
    k, _ = block.context_kv(ctx, torch.arange(24) * 0.25)  # speech positions on the shared axis
    q = block._position(block.q(block.norm(x)).view(1, 6, block.n_head, block.head_dim).transpose(1, 2),
                        torch.arange(6))
    scores = (q @ k.transpose(-1, -2))[0] / block.head_dim ** 0.5  # [H, T, S]
    assert torch.equal(scores.argmax(-1), (4 * torch.arange(6)).expand(block.n_head, 6))
    torch.testing.assert_close(scores[:, 0, 0], torch.full((block.n_head,), 8.0))  # the prior at distance 0
    torch.testing.assert_close(scores[:, 1, 4:20], scores[:, 2, 8:24])  # same distances, same scores
    blind = make_zipper(towers).fusion[0]["text<-speech"]
    blind.kv.weight.zero_()
    kb, _ = blind.context_kv(ctx)
    assert (kb == 0).all()  # no offset, no rotation: every key scores 0 against any query


def test_positions_are_required_when_configured():
    block = make_zipper(**POS).fusion[0]["text<-speech"]
    with pytest.raises(ValueError, match="pass the tokens' positions"):
        block.context_kv(torch.randn(1, 3, 48))


def test_open_gates_over_zero_branches_start_as_identity_and_learn_from_step_0():
    """--gate-init: tanh gates open, branch outputs at zero: bitwise the towers alone at step 0, but the
    output projections get gradient at once (with closed gates, the paper's, they get exactly none)."""
    towers = make_towers()
    for gate_init, learns in ((0.5, True), (0.0, False)):
        model = make_zipper(towers, input_proj=(), gate_init=gate_init)
        batch = asr_batch()
        out = model(batch)
        for name in ("text", "speech"):
            assert torch.equal(out[name], towers[name](batch[name][0]))
        block = model.fusion[-1]["text<-speech"]
        assert block.alpha.item() == gate_init and block.beta.item() == gate_init
        g_proj, g_down = torch.autograd.grad(out["text"].logsumexp(-1).sum(), (block.proj.weight, block.ffw.proj.weight))
        assert bool(g_proj.abs().sum() > 0) == learns and bool(g_down.abs().sum() > 0) == learns
    with pytest.raises(ZipperError, match="--gate-init"):
        ZipperConfig(gate_init=float("nan")).validate()


# --- learned clock (--xattn-pos learned) ---------------------------------------------------------------


CLOCK = {"xattn_pos": {"text": 1.0, "speech": 0.25}, "xattn_prior": 8.0, "xattn_clock": True}


@torch.no_grad()
def test_learned_clock_starts_as_the_fixed_rate_and_is_causal():
    towers = make_towers()
    fixed, clocked = make_zipper(towers, **POS), make_zipper(towers, **CLOCK)
    clocked.load_state_dict(fixed.state_dict(), strict=False)  # same fusion weights; the clock at its init
    open_gates(fixed), open_gates(clocked)
    for batch in (asr_batch(), tts_batch()):
        a, b = fixed(batch), clocked(batch)
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
    h = torch.randn(2, 9, 48)
    valid = torch.ones(2, 9, dtype=torch.bool)
    pos, end = clocked.axis_positions("speech", torch.arange(9), h, valid)
    torch.testing.assert_close(pos, (0.25 * torch.arange(9.0)).expand(2, 9))
    torch.testing.assert_close(end, torch.full((2,), 0.25 * 9))
    text_pos, text_end = clocked.axis_positions("text", torch.arange(4), torch.randn(2, 4, 64), valid[:, :4])
    assert torch.equal(text_pos, torch.arange(4.0)) and text_end is None  # the first tower is the axis

    clocked.clock["speech"].weight.normal_(0, 0.5)
    pos, end = clocked.axis_positions("speech", torch.arange(9), h, valid)
    steps = pos.diff(dim=1)
    assert (steps > 0).all() and steps.std() > 0.05  # increasing, at a rate that follows the content
    # Causal: a token's place depends only on the tokens before it; padding adds nothing; decoding in
    # pieces (start = the clock so far) gives the same places.
    head, _ = clocked.axis_positions("speech", torch.arange(5), h[:, :5], valid[:, :5])
    torch.testing.assert_close(head, pos[:, :5])
    padded = valid.clone()
    padded[0, 6:] = False
    p2, e2 = clocked.axis_positions("speech", torch.arange(9), h, padded)
    torch.testing.assert_close(p2[0, :7], pos[0, :7])
    torch.testing.assert_close(e2[0], pos[0, 6])
    tail, end2 = clocked.axis_positions("speech", torch.arange(5, 9), h[:, 5:], valid[:, 5:], start=pos[:, 5])
    torch.testing.assert_close(tail, pos[:, 5:])
    torch.testing.assert_close(end2, end)


def test_learned_clock_learns_from_the_cross_attention():
    model = make_zipper(input_proj=(), gate_init=0.5, **CLOCK)
    with torch.no_grad():
        for blocks in model.fusion:
            for b in blocks.values():
                b.proj.weight.normal_(0, 0.05)  # a branch that reads the attention (zero at init)
    fused_loss(model, asr_batch()).backward()
    assert model.clock["speech"].weight.grad.abs().sum() > 0
    assert "text" not in model.clock  # the first tower is the axis


@torch.no_grad()
def test_learned_clock_end_is_reported_per_tower():
    model = make_zipper(input_proj=(), **CLOCK)  # the clock reads the tower's own states from its embedding on
    model.clock["speech"].weight.normal_(0, 0.5)
    batch = asr_batch(B=2, Ts=7)
    batch["speech"][1][1, 5:] = False  # row 1: 5 speech tokens
    out = model(batch, with_clock=True)
    assert set(out["clock"]) == {"speech"} and torch.equal(out["text"], model(batch)["text"])
    h = model._run_blocks("speech", model.towers["speech"].embed(batch["speech"][0]),
                          model.towers["speech"].block_inputs(7)[0], 0, model.points["speech"][0])
    torch.testing.assert_close(out["clock"]["speech"], model.axis_positions("speech", torch.arange(7), h,
                                                                            batch["speech"][1])[1])
    with pytest.raises(ZipperError, match=r"this Zipper has no learned clock \(built without --xattn-pos learned\)"):
        make_zipper(**POS)(batch, with_clock=True)


def test_learned_clock_config():
    with pytest.raises(ZipperError, match=r"the learned clock \(--xattn-pos learned\) needs the shared axis's scales"):
        ZipperConfig(xattn_clock=True).validate()
    cfg = ZipperConfig(**CLOCK)
    assert ZipperConfig.from_dict(cfg.to_dict()) == cfg
