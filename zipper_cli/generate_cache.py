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

The tower blocks of a cached step run in generate_step.py (block_step on DecodeWeights). The uncached
engines call Tower.forward / Zipper.forward themselves: the reference.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from zipper_cli.generate_step import DecodeWeights, Step, block_step, head_logits
from zipper_cli.models.tower import Tower
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


class _CachedBase:
    """Bookkeeping shared by the cached engines: next position per tower and row, linear order per row."""

    def __init__(self, towers: dict[str, Tower], weights: Optional[dict] = None):
        self.towers = towers
        self.weights = {} if weights is None else weights  # tower name -> (signature, DecodeWeights)
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

    def _weights(self, n: str, tower: Tower) -> "DecodeWeights":
        """The tower's DecodeWeights, reused across batches and calls (the caller's dict) while no parameter
        changed: same storage, same version counter (every in-place update, an optimizer step or
        load_state_dict, bumps it)."""
        sig = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in tower.parameters())
        got = self.weights.get(n)
        S = self.S[n]
        if got is not None and got[0] == sig and got[1].S >= S and (got[1].rot is not None or got[1].S == S):
            return got[1]
        w = DecodeWeights(tower, S)
        self.weights[n] = (sig, w)
        return w

    def _tensors(self, n: str, rows: list[list[tuple[int, int]]], cross: bool = True):
        """Per row [(token, order)] for tower n -> tokens [B, T], the step's positions/rope/mask (Step),
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
        st = Step(self.towers[n], self.w[n], pos, self.device)
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
            x = block_step(w, x, st)
        logits = head_logits(self.w[self.name], _gather_last(x, last, self.name))[:, 0]
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
        # Learned clocks (--xattn-pos learned): where each row's next token of that tower will sit on the
        # cross-attention's shared axis.
        self.clock = {n: torch.zeros(B, device=dev) for n in (m.clock or {})}

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
                    h[n] = block_step(w, h[n], st[n])
                done[n] = stop
            if j == 0:  # the new tokens' places on the shared axis (col: positions; S: padding)
                axis = {}
                for n in run:
                    axis[n], end = m.axis_positions(n, col[n], h[n], col[n] < self.S[n], self.clock.get(n))
                    if end is not None:
                        self.clock[n] = end
            for y, x in m.pairs:  # write the new tokens' k/v first: the snapshot before round j's updates
                if x in run and (y, x) in need:
                    k, v = blocks[pair_key(y, x)].context_kv(h[x], axis[x])
                    kc, vc = self.kv[j][(y, x)]
                    idx = col[x][:, None, :, None].expand(-1, kc.shape[1], -1, kc.shape[3])
                    kc.scatter_(2, idx, k.to(kc.dtype))
                    vc.scatter_(2, idx, v.to(vc.dtype))
            for x, y in active:
                kc, vc = self.kv[j][(x, y)]
                h[x] = blocks[pair_key(x, y)].attend(h[x], kc, vc, xmask[(x, y)], axis[x])
        logits = {}
        for n in run:
            for w in self.w[n].blocks[done[n]:]:
                h[n] = block_step(w, h[n], st[n])
            logits[n] = head_logits(self.w[n], _gather_last(h[n], last, n))[:, 0]
        return [li[0] if li else None for li in last], logits

    def reorder(self, index) -> None:
        super().reorder(index)
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        self.ord = {n: o.index_select(0, idx) for n, o in self.ord.items()}
        self.kv = [{p: (k.index_select(0, idx), v.index_select(0, idx)) for p, (k, v) in d.items()} for d in self.kv]
        self.clock = {n: c.index_select(0, idx) for n, c in self.clock.items()}

    def close(self) -> None:
        super().close()
        self.kv, self.ord, self.clock = [], {}, {}


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
