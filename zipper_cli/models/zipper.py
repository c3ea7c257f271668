"""Zipper: decoder towers fused by gated cross-attention (arXiv 2405.18669).

Each tower (text = A, speech = B) keeps its embedding, blocks and tied head. In fused use they run in
lockstep: every tower runs its blocks up to cross point j, then each tower X attends to every other
tower Y's hidden states at Y's cross point j (all taken before round j's updates, so fusion is
symmetric), then they continue. The fusion block is Flamingo's gated cross-attention plus a gated
feed-forward, gates at zero, so at initialisation each tower computes what it computed alone.

Masking follows the example's linear order ([speech][text] for ASR, [text][speech] for TTS): position
t of X attends to position s of Y iff valid_Y[s] and order_Y[s] < order_X[t]. A row with nothing to
attend to gets no fusion update at all (cross-attention and FFW both zeroed), so the modality that comes
first in the linear order computes exactly what its tower computes alone.

Unimodal use bypasses fusion entirely: `model.towers["text"](tokens)` is the tower alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zipper_cli.errors import ZipperError
from zipper_cli.models.tower import RMSNorm, SwiGLU, Tower, TowerConfig, apply_rope, rope_inv_freq
from zipper_cli.models.zipper_config import ZipperConfig

# Rotary base of the cross-attention's shared time axis (xattn_pos), in units of the first tower's
# tokens: frequencies from 1 to ~1/100 per token keep distances up to about 100 text tokens apart.
XATTN_ROPE_BASE = 100.0


def pair_key(x: str, y: str) -> str:
    """ModuleDict key of the fusion block in which tower x attends to tower y."""
    return f"{x}<-{y}"


def relu_mlp(d_in: int, d_out: int, n_layers: int, final_relu: bool) -> nn.Sequential:
    """n_layers Linear layers (hidden width d_out) with ReLU between them, and after the last if asked."""
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(d_in if i == 0 else d_out, d_out, bias=False))
        if i < n_layers - 1 or final_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cross_mask(order_q: torch.Tensor, valid_kv: torch.Tensor, order_kv: torch.Tensor) -> torch.Tensor:
    """order_q [B, T], valid_kv [B, S], order_kv [B, S] -> bool [B, T, S]: query t may attend to key s
    iff s is a real token that comes before t in the example's linear order."""
    return valid_kv[:, None, :] & (order_kv[:, None, :] < order_q[:, :, None])


# ----------------------------------------------------------------------------------------------------


class GatedCrossBlock(nn.Module):
    """Tower X attends to tower Y at one cross point (Flamingo / torchtune style):
        x = x + tanh(alpha) * XAttn(norm(x), norm_ctx(g(ctx)))
        x = x + tanh(beta)  * FFW(norm_ffw(x))
    g maps Y's width to X's width. By default no positions (the paper's block); with use_pos, rotary
    positions of both sides on a shared time axis (given by the caller: Zipper.axis_positions), and
    optionally a diagonal prior (see ZipperConfig).
    Split into context_kv (depends on the context only, position-wise, so a decoding cache can compute it
    once and extend it) and attend (the query side)."""

    def __init__(self, cfg_x: TowerConfig, cfg_y: TowerConfig, n_head: int, proj_layers: int, dropout: float,
                 use_pos: bool = False, prior: float = 0.0):
        super().__init__()
        C = cfg_x.n_embd
        if C % n_head:
            raise ZipperError(f"--xattn-heads ({n_head}) must divide the tower width {C}")
        self.n_head, self.head_dim = n_head, C // n_head
        self.g = relu_mlp(cfg_y.n_embd, C, proj_layers, final_relu=False)
        self.norm_ctx = RMSNorm(C, cfg_x.norm_eps)
        self.norm = RMSNorm(C, cfg_x.norm_eps)
        self.q = nn.Linear(C, C, bias=False)
        self.kv = nn.Linear(C, 2 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.norm_ffw = RMSNorm(C, cfg_x.norm_eps)
        self.ffw = SwiGLU(dataclasses.replace(cfg_x, dropout=dropout))  # same shape as the tower's MLP
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)
        # Scalar gates (0-dim, so weight decay on matrices skips them); tanh(0) = 0: identity at init.
        self.alpha = nn.Parameter(torch.zeros(()))
        self.beta = nn.Parameter(torch.zeros(()))
        # Optional rotary positions on the shared time axis (ZipperConfig.xattn_pos), and the diagonal
        # prior's offset, added to queries and keys alike.
        self.use_pos = use_pos
        if use_pos:
            inv_freq = rope_inv_freq(self.head_dim, XATTN_ROPE_BASE)
            self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, not checkpointed
        self.offset = None
        if prior > 0:
            # Position-only score at distance 0 = hd * c^2 / sqrt(hd) = prior; it falls with distance as
            # the rotations decorrelate (a soft diagonal), and the offset is learned from there.
            self.offset = nn.Parameter(torch.full((C,), (prior / self.head_dim ** 0.5) ** 0.5))

    def _position(self, t: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        """t [B, H, L, hd] (queries or keys); pos [L] or [B, L], the tokens' positions on the shared axis
        -> t plus the prior's offset, rotated by that position."""
        if self.offset is not None:
            t = t + self.offset.view(1, self.n_head, 1, self.head_dim).to(t.dtype)
        if not self.use_pos:
            return t
        if pos is None:
            raise ValueError("this cross-attention uses positions (xattn_pos): pass the tokens' positions")
        angle = pos.float()[..., None] * self.inv_freq  # [B|., L, hd/2]
        return apply_rope(t, angle.cos().unsqueeze(-3), angle.sin().unsqueeze(-3))

    def context_kv(self, ctx: torch.Tensor, pos: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx [B, S, C_y] (Y's hidden states), pos [S] or [B, S] (their positions on the shared axis,
        needed with xattn_pos) -> k, v [B, H, S, hd]. Position-wise: the k, v of a grown context are those
        of the old one concatenated with those of the new positions."""
        B, S, _ = ctx.shape
        k, v = self.kv(self.norm_ctx(self.g(ctx))).split(self.n_head * self.head_dim, dim=-1)
        k = k.view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        v = v.view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        return self._position(k, pos), v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, C] (X's residual stream), k, v from context_kv, mask bool [B, T, S] (True = may attend),
        pos [T] or [B, T] (x's positions on the shared axis, needed with xattn_pos) -> the updated x
        [B, T, C]: both gated branches, zero for rows whose mask is all False."""
        B, T, C = x.shape
        keep = mask.any(dim=-1, keepdim=True)  # [B, T, 1]: rows with at least one key
        # An all-False row would make softmax 0/0 = NaN (forward and backward). Such rows attend to every
        # key instead (finite), and `keep` multiplies their update by exactly 0, which also makes every
        # gradient through them exactly 0. Cheaper than a dummy key slot, same effect.
        attn_mask = (mask | ~keep).unsqueeze(1)  # [B, 1, T, S], broadcast over heads
        q = self.q(self.norm(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        q = self._position(q, pos)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        keep = keep.to(x.dtype)
        x = x + torch.tanh(self.alpha) * self.resid_drop(self.proj(y)) * keep
        # The FFW is zeroed on empty rows too: otherwise the first modality in the linear order would
        # still be changed by fusion (through an FFW of its own states) although it saw nothing.
        return x + torch.tanh(self.beta) * self.ffw(self.norm_ffw(x)) * keep

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor, pos_x: Optional[torch.Tensor] = None,
                pos_y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training use: pos_x, pos_y are both sides' positions on the shared axis (Zipper.axis_positions)."""
        return self.attend(x, *self.context_kv(ctx, pos_y), mask, pos_x)


# ----------------------------------------------------------------------------------------------------


class Zipper(nn.Module):
    """Towers plus fusion modules. Build with `from_towers` (around pretrained towers) or `from_configs`
    (fresh towers, e.g. before loading a checkpoint's state dict). The constructor holds the given
    Tower objects as they are (shared)."""

    def __init__(self, cfg: ZipperConfig, towers: dict[str, Tower]):
        super().__init__()
        self.cfg = cfg.validate()
        names = cfg.towers
        if set(towers) != set(names):
            raise ZipperError(f"zipper: towers {sorted(towers)} do not match the config's {list(names)}")
        self.towers = nn.ModuleDict({n: towers[n] for n in names})
        tcfg = {n: towers[n].cfg for n in names}
        self.points = cfg.cross_points({n: c.n_layer for n, c in tcfg.items()})  # name -> [layer after point j]
        self.pairs = [(x, y) for x in names for y in names if y != x]  # (attending, attended)

        self.input_proj = nn.ModuleDict(
            {n: relu_mlp(tcfg[n].n_embd, tcfg[n].n_embd, cfg.proj_layers, final_relu=True) for n in cfg.input_proj}
        )
        self.fusion = nn.ModuleList(  # fusion[j][pair_key(x, y)]: x attends to y at cross point j
            nn.ModuleDict({
                pair_key(x, y): GatedCrossBlock(tcfg[x], tcfg[y], cfg.xattn_heads or tcfg[x].n_head,
                                                cfg.proj_layers, cfg.dropout, cfg.xattn_pos is not None,
                                                cfg.xattn_prior)
                for x, y in self.pairs
            })
            for _ in range(len(self.points[names[0]]))
        )
        # --xattn-pos learned: each later tower's clock (see axis_positions); the first tower is the axis.
        self.clock = nn.ModuleDict({n: nn.Linear(tcfg[n].n_embd, 1) for n in names[1:]}) if cfg.xattn_clock else None
        a = names[0]
        self.ctc_head = nn.Linear(tcfg[a].n_embd, tcfg[a].vocab_size, bias=False) if cfg.ctc_head else None
        self._init_fusion()

    skips_parameters = True  # forward skips pairs no query can use (and the CTC head unless asked): DDP must know

    @classmethod
    def from_towers(cls, cfg: ZipperConfig, towers: dict[str, Tower], share: bool = False) -> "Zipper":
        """Fuse pretrained towers. By default their weights are deep-copied, so training the fused model
        never changes the caller's towers (which stay usable as the unimodal reference); share=True holds
        the very same modules (saves memory; the caller's towers then train along)."""
        return cls(cfg, {n: t if share else copy.deepcopy(t) for n, t in towers.items()})

    @classmethod
    def from_configs(cls, cfg: ZipperConfig, tower_cfgs: dict[str, TowerConfig]) -> "Zipper":
        return cls(cfg, {n: Tower(c) for n, c in tower_cfgs.items()})

    def _init_fusion(self) -> None:
        # Attention and FFW matrices: normal(0.02), as in the towers. The ReLU MLPs (g, input projections)
        # get He init instead: a 3-deep ReLU stack at std 0.02 shrinks a tiny-width signal ~1000x, below
        # RMSNorm's eps (norm_ctx would then see mostly eps) and far below the embeddings the tower expects.
        for m in list(self.fusion.modules()) + ([self.ctc_head] if self.ctc_head is not None else []):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        relu_mlps = [b.g for blocks in self.fusion for b in blocks.values()] + list(self.input_proj.values())
        for mlp in relu_mlps:
            for m in mlp:
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        for blocks in self.fusion:
            for b in blocks.values():
                nn.init.constant_(b.alpha, self.cfg.gate_init)
                nn.init.constant_(b.beta, self.cfg.gate_init)
                if self.cfg.gate_init != 0:  # open gates: the branches start at zero instead
                    nn.init.zeros_(b.proj.weight)
                    nn.init.zeros_(b.ffw.proj.weight)
        for n, lin in (self.clock or {}).items():  # start at the fixed rate: softplus(bias) = xattn_pos[n]
            nn.init.zeros_(lin.weight)
            nn.init.constant_(lin.bias, math.log(math.expm1(self.cfg.xattn_pos[n])))

    def axis_positions(self, name: str, pos: torch.Tensor, h: torch.Tensor, valid: torch.Tensor,
                       start: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Where tower `name`'s tokens sit on the cross-attention's shared time axis (None without
        xattn_pos). pos [T] or [B, T]: their positions in their own tower; h [B, T, C]: their hidden
        states at the first cross point (no cross-attention before it: causal); valid [B, T]; start [B]:
        the clock at the first of these tokens (incremental decoding; None = 0). Fixed rate:
        pos * xattn_pos[name]. Learned clock: token t sits at start + the sum of softplus(clock(h_s)) over
        the valid tokens s < t, so the rate can follow the content. Returns (positions [B, T] or [T], the
        clock after the last valid token [B] or None for a fixed rate)."""
        if self.cfg.xattn_pos is None:
            return None, None
        if self.clock is None or name not in self.clock:
            return pos.float() * self.cfg.xattn_pos[name], None
        lin = self.clock[name]
        dt = torch.promote_types(h.dtype, torch.float32)  # positions accumulate: at least float32
        inc = F.softplus(F.linear(h.to(dt), lin.weight.to(dt), lin.bias.to(dt)).squeeze(-1)) * valid  # [B, T]
        total = inc.cumsum(1)
        first = torch.zeros_like(inc[:, 0]) if start is None else start
        return first[:, None] + (total - inc), first + total[:, -1]

    # --- training forward ---------------------------------------------------------------------------

    def forward(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                with_ctc: bool = False, with_clock: bool = False) -> dict:
        """batch[name] = (tokens [B, T_x] int64, valid [B, T_x] bool, order [B, T_x] int64: each token's
        position in the example's linear sequence) -> {name: logits [B, T_x, V_x]}. Full causal
        self-attention inside each tower; cross-attention masked by linear order. with_ctc adds
        out["ctc"] = CTC logits [B, T_B, V_A] over tower B's positions (needs cfg.ctc_head). with_clock adds
        out["clock"] = {tower: where its learned clock ends, [B]} and out["clock_pos"] = {tower: its tokens'
        places on the shared axis, [B, T]} (needs cfg.xattn_clock)."""
        names = self.cfg.towers
        self._check_batch(batch)
        h, rope = {}, {}
        for n in names:
            tokens = batch[n][0]
            x = self.towers[n].embed(tokens)
            h[n] = self.input_proj[n](x) if n in self.input_proj else x
            rope[n], _ = self.towers[n].block_inputs(tokens.shape[1])  # mask None: sdpa's causal path
        masks = {(x, y): cross_mask(batch[x][2], batch[y][1], batch[y][2]) for x, y in self.pairs}
        # A pair with no query that may attend anything (e.g. speech<-text in a batch of ASR examples)
        # would add exactly zero: skip its compute. Same result bitwise, about half the fusion cost
        # when batches hold one task.
        active = [(x, y) for x, y in self.pairs if bool(masks[(x, y)].any())]

        done = dict.fromkeys(names, 0)  # blocks already run per tower
        for j, blocks in enumerate(self.fusion):
            for n in names:
                h[n] = self._run_blocks(n, h[n], rope[n], done[n], self.points[n][j])
                done[n] = self.points[n][j]
            if j == 0:
                placed = {n: self.axis_positions(n, torch.arange(h[n].shape[1], device=h[n].device), h[n],
                                                 batch[n][1]) for n in names}
                axis = {n: p[0] for n, p in placed.items()}
            ctx = dict(h)  # every tower at cross point j, before this round's updates: symmetric
            for x, y in active:
                h[x] = blocks[pair_key(x, y)](h[x], ctx[y], masks[(x, y)], axis[x], axis[y])
        out: dict = {}
        if with_clock:
            if self.clock is None:
                raise ZipperError("this Zipper has no learned clock (built without --xattn-pos learned)")
            out["clock"] = {n: placed[n][1] for n in self.clock}
            out["clock_pos"] = {n: placed[n][0] for n in self.clock}
        if with_ctc:
            if self.ctc_head is None:
                raise ZipperError("this Zipper has no CTC head (built without --ctc-weight)")
            a, b = names[0], names[1]
            block = self.fusion[-1][pair_key(a, b)]
            out["ctc"] = self.ctc_head(block.norm_ctx(block.g(ctx[b])))  # [B, T_b, V_a]
        for n in names:
            h[n] = self._run_blocks(n, h[n], rope[n], done[n], len(self.towers[n].blocks))
            out[n] = self.towers[n].head(h[n])
        return out

    def _run_blocks(self, name: str, x: torch.Tensor, rope, start: int, stop: int) -> torch.Tensor:
        for block in self.towers[name].blocks[start:stop]:
            x = block(x, rope)
        return x

    def _check_batch(self, batch) -> None:
        if set(batch) != set(self.cfg.towers):
            raise ZipperError(f"zipper batch has towers {sorted(batch)}, expected {list(self.cfg.towers)}")
        B = None
        for n, (tokens, valid, order) in batch.items():
            if tokens.dim() != 2 or valid.shape != tokens.shape or order.shape != tokens.shape:
                raise ValueError(f"{n}: tokens, valid, order must all be [B, T] (got {list(tokens.shape)}, "
                                 f"{list(valid.shape)}, {list(order.shape)})")
            if valid.dtype != torch.bool:
                raise ValueError(f"{n}: valid must be a bool tensor (got {valid.dtype})")
            if B is not None and tokens.shape[0] != B:
                raise ValueError(f"towers disagree on the batch size ({B} vs {tokens.shape[0]} for {n})")
            B = tokens.shape[0]

    # --- unimodal use, freezing -----------------------------------------------------------------------

    def unimodal_logits(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits of the tower alone: no input projection, no fusion."""
        return self.towers[name](tokens)

    def freeze(self, names: Iterable[str]) -> None:
        """Make the frozen set exactly `names` (others' tower parameters become trainable again). Only
        the towers' own parameters (embedding, blocks, final norm) freeze; fusion modules and input
        projections stay trainable."""
        names = list(names)
        for n in names:
            if n not in self.towers:
                raise ZipperError(f"--freeze: unknown tower '{n}' (valid: {', '.join(self.towers)} or none)")
        for n, tower in self.towers.items():
            tower.requires_grad_(n not in names)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: frozen parameters are never handed to it."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
