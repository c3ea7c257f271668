"""Forward passes for generation: incremental (KV-cached) and reference (full recompute), per model kind.

An engine holds the decoding state of a batch of rows and answers one question: "append these tokens to
these rows; what are the logits after each row's last new token?" The search loops in generate.py
(greedy, sampling, beam) are written once against this interface:

    engine.start(B, cache_len)                 cache_len: {tower: positions to allocate}
    last, logits = engine.feed(items)          items[r]: list of (tower, token, later) for row r, in
                                               linear order; returns last[r] (tower of row r's last new
                                               token, None if none) and {tower: logits [B, V_tower]}
    engine.reorder(index)                      beam search: row i becomes old row index[i]
    engine.close()

`later` is the set of towers whose tokens come after this one in the example's linear order (only they
can ever attend to it); the Zipper engine uses it to skip cross-attention keys/values nobody will read.
Each engine assigns positions itself: a row's tokens in a tower take that tower's next positions, and
its linear order (Zipper's cross-attention masking) counts every token the row was fed, in any tower.

Zipper cache (per batch):
  - self-attention: each tower's own static KV cache (Tower.setup_cache), positions = the tower's own.
  - cross-attention: for every cross point j and pair x<-y, the keys/values GatedCrossBlock.context_kv
    makes from y's hidden states at point j, in a static buffer [B, H_x, S_y + 1, hd_x] indexed by y's
    tower position; plus per tower y the linear order of each cached position ([B, S_y + 1], INF where
    nothing real was written). Column S_y is a scratch slot for padding. Since every token's hidden states
    depend only on tokens before it in linear order (causal self-attention, cross-attention masked by
    order), a token's k/v at every point are final once computed: they are computed once, when the token
    is fed, and the cache grows by scatter. A step runs the fed towers in lockstep exactly like
    Zipper.forward: blocks up to point j, then the new tokens' k/v are written (the snapshot of every
    tower before round j's updates), then each new token attends with mask order_y < order_x, then the
    next segment of blocks.
  - Rows that feed nothing into a tower that runs this step get a padding token: its self-attention
    write goes to the row's next free position (overwritten by the row's next real token before anything
    attends to it; clamped to the last slot only when the row can never use that tower again), its
    cross-attention write to the scratch column with order INF (never attended).

Tower blocks in a cached step (_block_step) compute what Block.forward computes with its KV cache, but
attend only to the first L = (max position + 1) cache slots, and run as plain tensor ops on weights laid
out for small products (_Weights: transposed copies on CPU, gate/up side by side, RMSNorm weights folded
in for float32). Decode steps are a few dozen tiny ops per block, so op count and weight layout are most
of their cost. The uncached engines call Tower.forward / Zipper.forward themselves: the reference.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from zipper_cli.models.tower import Tower, apply_rope
from zipper_cli.models.zipper import Zipper, pair_key

INF = 1 << 40  # order of a slot holding nothing real: never < any real order
Items = Sequence[Sequence[tuple]]  # per row: [(tower, token, later_towers), ...]


def _group(items: Items, order: list[int]):
    """-> per tower: per row [(token, linear order), ...]; last[r]: (tower, index among that tower's new
    tokens) or None. Advances `order` (each row's next linear position) in place."""
    B = len(order)
    groups: dict[str, list[list[tuple[int, int]]]] = {}
    last: list[Optional[tuple[str, int]]] = [None] * B
    for r, its in enumerate(items):
        for n, tok, _ in its:
            g = groups.get(n)
            if g is None:
                g = groups[n] = [[] for _ in range(B)]
            g[r].append((tok, order[r]))
            order[r] += 1
        if its:
            n = its[-1][0]
            last[r] = (n, len(groups[n][r]) - 1)
    return groups, last


def _rotations(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos, sin [..., hd/2] -> R [..., hd, hd] with x @ R = tower.apply_rope(x) (rotate-half convention:
    R = diag(cat(cos, cos)) + Q diag(cat(sin, sin)), x @ Q = cat(-x[hd/2:], x[:hd/2]))."""
    h = cos.shape[-1]
    q = torch.zeros(2 * h, 2 * h, dtype=cos.dtype, device=cos.device)
    q[torch.arange(h) + h, torch.arange(h)] = -1.0
    q[torch.arange(h), torch.arange(h) + h] = 1.0
    c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return torch.diag_embed(c) + q * s.unsqueeze(-2)


class _Step:
    """Positions, rotary embedding and attention mask of one cached step of a tower, from the positions
    (host lists, [B][T]). Attention reads only the first L = max position + 1 cache slots.
    Fast path (float32, one new token per row, every row at the same position p; always so at batch 1):
    the cache is written at slot p by slicing, the rotary embedding is one matmul with the rotation
    matrix of p (precomputed per call), and no mask is needed (the query may attend to every slot < L).
    Otherwise: per-row positions, scatter writes, elementwise rotary, mask "slot <= query position" as in
    Tower.block_inputs."""

    def __init__(self, tower: Tower, w: "_Weights", pos: list[list[int]], device):
        T = len(pos[0])
        self.B, self.T = len(pos), T
        self.L = max(max(p) for p in pos) + 1
        uniform = all(p == pos[0] for p in pos)
        self.fast = uniform and T == 1 and w.rot is not None
        if self.fast:
            self.p = pos[0][0]
            self.rot = w.rot[self.p]
            return
        self.pos = torch.tensor(pos[0] if uniform else pos, dtype=torch.long, device=device)
        lead = (1, 1) if uniform else (len(pos), 1)
        self.cos = tower.rope_cos[self.pos].view(*lead, T, -1)  # [1|B, 1, T, hd/2]
        self.sin = tower.rope_sin[self.pos].view(*lead, T, -1)
        if uniform and T == 1:
            self.mask = None
        else:
            slots = torch.arange(self.L, device=device)
            self.mask = (slots <= self.pos.unsqueeze(-1)).view(*lead, T, self.L)
        self._index = None

    def index(self, H: int, hd: int) -> torch.Tensor:
        """Scatter index [B, H, T, hd] of the new keys/values into a cache [B, H, S, hd]."""
        if self._index is None:
            self._index = self.pos.view(-1, 1, self.T, 1).expand(self.B, H, self.T, hd)
        return self._index


def _mat(weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """nn.Linear weight [out, in] -> [in, out] for `x @ w`. On CPU a contiguous copy: matrix-vector and
    skinny products with the output dimension contiguous run about 2x faster there (MKL) than F.linear's
    transposed operand; elsewhere a view (cuBLAS takes either layout). `scale` [in]: folded into the
    copy's rows ((x * g) @ W^T = x @ (g[:, None] * W^T)), for the RMSNorm weight in front."""
    if weight.device.type != "cpu":
        return weight.t()
    w = weight.t().contiguous()
    return w.mul_(scale[:, None]) if scale is not None else w


class _Weights:
    """A tower's weights for decode steps, read once per generate call (so always current): the matrices
    as [in, out] (see _mat: on CPU, a transposed copy of the tower's matrices for the duration of the
    call), the MLP's gate and up matrices side by side so that one matmul computes both. Decode steps are
    small: op count and operand layout are most of their cost.
    float32 on CPU: each RMSNorm's weight, times sqrt(C), is folded into the matrix after it, so that the
    norm is three ops, x / hypot(|x|, sqrt(C eps)) (= x / sqrt(mean(x^2) + eps) / sqrt(C)); and the
    rotation matrices of all cache positions are precomputed (when they take at most 64 MiB)."""

    def __init__(self, tower: Tower, cache_len: int):
        wte = tower.wte.weight
        self.fold = wte.device.type == "cpu" and wte.dtype == torch.float32
        C = tower.cfg.n_embd

        def norm_mat(norm, *weights):
            w = weights[0] if len(weights) == 1 else torch.cat(weights)
            if not self.fold:
                return (norm.weight, norm.eps, None), _mat(w)
            c = torch.tensor(math.sqrt(C * norm.eps), dtype=wte.dtype)
            return (None, norm.eps, c), _mat(w, norm.weight * math.sqrt(C))

        self.blocks = []
        for b in tower.blocks:
            a, mlp = b.attn, b.mlp
            norm1, qkv = norm_mat(b.norm1, a.qkv.weight)
            norm2, gate_up = norm_mat(b.norm2, mlp.gate.weight, mlp.up.weight)
            self.blocks.append(dict(norm1=norm1, qkv=qkv, proj=_mat(a.proj.weight), attn=a, norm2=norm2,
                                    gate_up=gate_up, down=_mat(mlp.proj.weight)))
        self.norm_f, self.head = norm_mat(tower.norm_f, wte)
        self.S = cache_len
        hd = tower.cfg.head_dim
        self.rot = None
        if tower.rope_cos.dtype == torch.float32 and cache_len * hd * hd * 4 <= 64 << 20:
            self.rot = _rotations(tower.rope_cos[:cache_len], tower.rope_sin[:cache_len])  # [S, hd, hd]


def _rms(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    """tower.RMSNorm as plain ops (see _Weights): folded: x / hypot(|x|, sqrt(C eps)); other float32:
    vector_norm for the mean square (F.rms_norm and mean() are several times slower on small rows here);
    other dtypes: the module's own formula (it normalises in float32)."""
    weight, eps, c = norm
    if c is not None:
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), c)
    if x.dtype == torch.float32:
        return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_() \
            * weight
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _block_step(w: dict, x: torch.Tensor, st: _Step) -> torch.Tensor:
    """Block.forward(x, rope, mask, input_pos) with a KV cache, for inference: the same computation, with
    plain functional calls and attention over the first st.L cache slots only (the other slots are
    masked out there anyway)."""
    a = w["attn"]
    B, T, C = x.shape
    hd, H, Hkv = a.head_dim, a.n_head, a.n_kv_head
    cache = a.kv_cache
    if cache.k.shape[0] != B:
        raise RuntimeError(f"batch {B} does not match the KV cache batch {cache.k.shape[0]}")
    qkv = _rms(x, w["norm1"]) @ w["qkv"]
    if st.fast:
        qk = qkv[:, 0, :(H + Hkv) * hd].view(B, H + Hkv, hd) @ st.rot  # rotary as one matmul
        q, k = qk[:, :H, None], qk[:, H:, None]  # [B, H, 1, hd]
        v = qkv[:, 0, (H + Hkv) * hd:].view(B, Hkv, 1, hd)
        p = st.p
        cache.k[:, :, p:p + 1] = k
        cache.v[:, :, p:p + 1] = v
    else:
        qk = apply_rope(qkv[..., :(H + Hkv) * hd].view(B, T, H + Hkv, hd).transpose(1, 2), st.cos, st.sin)
        q, k = qk.split([H, Hkv], dim=1)
        v = qkv[..., (H + Hkv) * hd:].view(B, T, Hkv, hd).transpose(1, 2)
        idx = st.index(Hkv, hd)
        cache.k.scatter_(2, idx, k if k.dtype == cache.k.dtype else k.to(cache.k.dtype))
        cache.v.scatter_(2, idx, v if v.dtype == cache.v.dtype else v.to(cache.v.dtype))
    kc, vc = cache.k[:, :, :st.L], cache.v[:, :, :st.L]
    if kc.dtype != q.dtype:
        kc, vc = kc.to(q.dtype), vc.to(q.dtype)
    if Hkv != H:
        kc, vc = kc.repeat_interleave(H // Hkv, dim=1), vc.repeat_interleave(H // Hkv, dim=1)
    y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=None if st.fast else st.mask)
    x = x + (y.reshape(B, 1, H * hd) if st.fast else y.transpose(1, 2).reshape(B, T, H * hd)) @ w["proj"]
    gate, up = (_rms(x, w["norm2"]) @ w["gate_up"]).chunk(2, dim=-1)
    return x + (F.silu(gate) * up) @ w["down"]


def _head(w: _Weights, h: torch.Tensor) -> torch.Tensor:
    return _rms(h, w.norm_f) @ w.head


class _CachedBase:
    """Bookkeeping shared by the cached engines: next position per tower and row, linear order per row."""

    def __init__(self, towers: dict[str, Tower], weights: Optional[dict] = None):
        self.towers = towers
        self.weights = {} if weights is None else weights  # tower name -> (signature, _Weights)
        self.device = next(iter(towers.values())).wte.weight.device

    @torch.no_grad()
    def start(self, B: int, cache_len: dict[str, int]) -> None:
        self.B = B
        self.S = dict(cache_len)
        for n, t in self.towers.items():
            t.setup_cache(B, self.S[n])
        self.w = {n: self._weights(n, t) for n, t in self.towers.items()}
        self.next = {n: [0] * B for n in self.towers}
        self.order = [0] * B

    def _weights(self, n: str, tower: Tower) -> "_Weights":
        """The tower's _Weights, reused across batches and calls (the caller's dict) while no parameter
        changed: same storage, same version counter (every in-place update, an optimizer step or
        load_state_dict, bumps it)."""
        sig = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in tower.parameters())
        got = self.weights.get(n)
        S = self.S[n]
        if got is not None and got[0] == sig and got[1].S >= S and (got[1].rot is not None or got[1].S == S):
            return got[1]
        w = _Weights(tower, S)
        self.weights[n] = (sig, w)
        return w

    def _tensors(self, n: str, rows: list[list[tuple[int, int]]], cross: bool = True):
        """Per row [(token, order)] for tower n -> tokens [B, T], the step's positions/rope/mask (_Step),
        and with `cross` the cross-attention cache columns and linear orders [B, T]; advances positions."""
        T = max(len(r) for r in rows)
        S, nxt = self.S[n], self.next[n]
        tok, pos, col, ordl = [], [], [], []
        for r, its in enumerate(rows):
            p, k = nxt[r], len(its)
            for t, o in its:
                tok.append(t)
                ordl.append(o)
            pos.append(list(range(p, p + k)) + [min(p + i, S - 1) for i in range(k, T)])
            tok += [0] * (T - k)  # padding: a scratch write that is never attended
            if cross:
                col += range(p, p + k)
                col += [S] * (T - k)
                ordl += [INF] * (T - k)
            nxt[r] = p + k
        B = len(rows)
        mk = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device).view(B, T)  # noqa: E731
        st = _Step(self.towers[n], self.w[n], pos, self.device)
        return (mk(tok), st, mk(col), mk(ordl)) if cross else (mk(tok), st, None, None)

    def reorder(self, index) -> None:
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        for t in self.towers.values():
            t.reorder_cache(idx)
        il = idx.tolist()
        self.next = {n: [v[i] for i in il] for n, v in self.next.items()}
        self.order = [self.order[i] for i in il]
        self.B = len(il)

    def close(self) -> None:
        for t in self.towers.values():
            t.clear_cache()
        self.w = {}


def _gather_last(h: torch.Tensor, last, n: str) -> torch.Tensor:
    """h [B, T, C] -> [B, 1, C]: each row's last new token in tower n (index 0 for other rows)."""
    idx = [li[1] if li is not None and li[0] == n else 0 for li in last]
    if h.shape[1] == 1:
        return h
    i = torch.tensor(idx, device=h.device).view(-1, 1, 1).expand(-1, 1, h.shape[2])
    return h.gather(1, i)


class TowerCache(_CachedBase):
    """One decoder (a Tower, or the single-decoder baseline), static KV cache. `weights`: a dict in which
    to keep the decode-time weight layout between calls (see _CachedBase._weights)."""

    def __init__(self, tower: Tower, name: str = "main", weights: Optional[dict] = None):
        super().__init__({name: tower}, weights)
        self.name, self.tower = name, tower

    @torch.inference_mode()
    def feed(self, items: Items):
        groups, last = _group(items, self.order)
        tokens, st, _, _ = self._tensors(self.name, groups[self.name], cross=False)
        t = self.tower
        x = F.embedding(tokens, t.wte.weight)
        for w in self.w[self.name].blocks:
            x = _block_step(w, x, st)
        logits = _head(self.w[self.name], _gather_last(x, last, self.name))[:, 0]
        return [li[0] if li else None for li in last], {self.name: logits}


class TowerFull:
    """Reference: the whole sequence of every row recomputed at each step (no cache)."""

    def __init__(self, tower: Tower, name: str = "main"):
        self.tower, self.name = tower, name
        self.device = tower.wte.weight.device

    def start(self, B: int, cache_len: dict[str, int]) -> None:
        self.hist = [[] for _ in range(B)]

    @torch.inference_mode()
    def feed(self, items: Items):
        for r, its in enumerate(items):
            self.hist[r] += [tok for _, tok, _ in its]
        T = max(1, max(len(h) for h in self.hist))
        tokens = torch.zeros(len(self.hist), T, dtype=torch.long)
        for r, h in enumerate(self.hist):
            tokens[r, :len(h)] = torch.tensor(h, dtype=torch.long)
        logits = self.tower(tokens.to(self.device))
        idx = torch.tensor([max(len(h) - 1, 0) for h in self.hist], device=self.device)
        out = logits[torch.arange(len(self.hist), device=self.device), idx]
        return [self.name if its else None for its in items], {self.name: out}

    def reorder(self, index) -> None:
        self.hist = [list(self.hist[i]) for i in torch.as_tensor(index).tolist()]

    def close(self) -> None:
        pass


class ZipperCache(_CachedBase):
    """Zipper, incremental: per-tower self-attention caches plus cross-attention k/v per point and pair."""

    def __init__(self, model: Zipper, weights: Optional[dict] = None):
        super().__init__(dict(model.towers.items()), weights)
        self.model = model

    @torch.no_grad()
    def start(self, B: int, cache_len: dict[str, int]) -> None:
        super().start(B, cache_len)
        m, dev = self.model, self.device
        dtype = next(m.parameters()).dtype
        self.ord = {n: torch.full((B, self.S[n] + 1), INF, dtype=torch.long, device=dev) for n in m.towers}
        self.kv = []  # kv[j][(x, y)] = (k, v) [B, H_x, S_y + 1, hd_x]
        for blocks in m.fusion:
            d = {}
            for x, y in m.pairs:
                b = blocks[pair_key(x, y)]
                shape = (B, b.n_head, self.S[y] + 1, b.head_dim)
                d[(x, y)] = (torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
            self.kv.append(d)

    @torch.inference_mode()
    def feed(self, items: Items):
        m = self.model
        groups, last = _group(items, self.order)
        need = set()  # pairs (y, x): y will attend to x's new tokens, so compute their k/v
        for its in items:
            for n, _, later in its:
                need.update((y, n) for y in later if y != n)
        run = [n for n in m.cfg.towers if n in groups]
        h, st, col, order = {}, {}, {}, {}
        for n in run:
            tokens, st[n], col[n], order[n] = self._tensors(n, groups[n])
            x = F.embedding(tokens, self.towers[n].wte.weight)
            h[n] = m.input_proj[n](x) if n in m.input_proj else x
            self.ord[n].scatter_(1, col[n], order[n])
        xmask = {(x, y): self.ord[y][:, None, :] < order[x][:, :, None] for x, y in m.pairs if x in run}
        # As in Zipper.forward: a pair where no new token may attend anything adds exactly zero; skip it
        # (e.g. the speech input's tokens at prefill, before any text).
        active = [(x, y) for x, y in m.pairs if x in run and bool(xmask[(x, y)].any())]

        done = dict.fromkeys(run, 0)
        for j, blocks in enumerate(m.fusion):
            for n in run:
                stop = m.points[n][j]
                for w in self.w[n].blocks[done[n]:stop]:
                    h[n] = _block_step(w, h[n], st[n])
                done[n] = stop
            for y, x in m.pairs:  # write the new tokens' k/v first: the snapshot before round j's updates
                if x in run and (y, x) in need:
                    k, v = blocks[pair_key(y, x)].context_kv(h[x])
                    kc, vc = self.kv[j][(y, x)]
                    idx = col[x][:, None, :, None].expand(-1, kc.shape[1], -1, kc.shape[3])
                    kc.scatter_(2, idx, k.to(kc.dtype))
                    vc.scatter_(2, idx, v.to(vc.dtype))
            for x, y in active:
                kc, vc = self.kv[j][(x, y)]
                h[x] = blocks[pair_key(x, y)].attend(h[x], kc, vc, xmask[(x, y)])
        logits = {}
        for n in run:
            for w in self.w[n].blocks[done[n]:]:
                h[n] = _block_step(w, h[n], st[n])
            logits[n] = _head(self.w[n], _gather_last(h[n], last, n))[:, 0]
        return [li[0] if li else None for li in last], logits

    def reorder(self, index) -> None:
        super().reorder(index)
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        self.ord = {n: o.index_select(0, idx) for n, o in self.ord.items()}
        self.kv = [{p: (k.index_select(0, idx), v.index_select(0, idx)) for p, (k, v) in d.items()} for d in self.kv]

    def close(self) -> None:
        super().close()
        self.kv, self.ord = [], {}


class ZipperFull:
    """Reference: Zipper.forward over each row's whole history at every step (the training forward)."""

    def __init__(self, model: Zipper):
        self.model = model
        self.device = next(model.parameters()).device

    def start(self, B: int, cache_len: dict[str, int]) -> None:
        self.hist = {n: [[] for _ in range(B)] for n in self.model.cfg.towers}  # (token, order)
        self.order = [0] * B

    @torch.inference_mode()
    def feed(self, items: Items):
        B = len(self.order)
        lastn = [None] * B
        for r, its in enumerate(items):
            for n, tok, _ in its:
                self.hist[n][r].append((tok, self.order[r]))
                self.order[r] += 1
                lastn[r] = n
        batch = {}
        for n, rows in self.hist.items():
            T = max(1, max(len(h) for h in rows))
            tokens = torch.zeros(B, T, dtype=torch.long)
            valid = torch.zeros(B, T, dtype=torch.bool)
            order = torch.full((B, T), INF, dtype=torch.long)
            for r, h in enumerate(rows):
                if h:
                    tokens[r, :len(h)] = torch.tensor([t for t, _ in h])
                    order[r, :len(h)] = torch.tensor([o for _, o in h])
                    valid[r, :len(h)] = True
            batch[n] = (tokens.to(self.device), valid.to(self.device), order.to(self.device))
        out = self.model(batch)
        ar = torch.arange(B, device=self.device)
        logits = {}
        for n, rows in self.hist.items():
            idx = torch.tensor([max(len(h) - 1, 0) for h in rows], device=self.device)
            logits[n] = out[n][ar, idx]
        return lastn, logits

    def reorder(self, index) -> None:
        il = torch.as_tensor(index).tolist()
        self.hist = {n: [list(rows[i]) for i in il] for n, rows in self.hist.items()}
        self.order = [self.order[i] for i in il]

    def close(self) -> None:
        pass
