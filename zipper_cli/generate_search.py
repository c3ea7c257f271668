"""The search loops of generation, written once against the engine interface of generate_cache.py
and the vocabulary layout of a generate.Generator (begin_end, tower_of, vocab_size, its modality masks):

  sample_loop   greedy (argmax) and sampling (temperature / top-k / top-p, inverse CDF on per-example
                uniform streams seeded by (seed, example index))
  beam_search   batched beam search with GNMT length normalisation; one beam gives exactly greedy

Both take an optional CTCPrefixScorer (greedy and beam only): text outputs of speech inputs are then
chosen by the joint CTC/attention score (ctc_prefix.py), each Row carrying its prefix's CTC state.

Plan is the example's segment layout (which modality and tower each segment of the linear sequence is),
Row one hypothesis's state (tokens per output, pending tokens to feed, log-probability).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from zipper_cli.ctc_prefix import CTCPrefixScorer, CTCState
from zipper_cli.generate_config import GenerationConfig

if TYPE_CHECKING:  # generate.py imports this module
    from zipper_cli.generate import Generator


# --- plan and per-row state ----------------------------------------------------------------------------


@dataclass
class Plan:
    """The segments of an example's linear sequence: [input] [output 1] [output 2] ..."""

    segs: list[str]  # modality of each segment of the linear sequence
    first: int  # index of the first output segment (0: it continues the input segment)
    tower: list[str]  # engine tower of each segment
    later: list[frozenset]  # towers of the segments after each one (who may attend to its tokens)

    @property
    def last(self) -> int:
        return len(self.segs) - 1


class Row:
    """One hypothesis of one example: tokens per segment, tokens queued to feed, score so far."""

    __slots__ = ("idx", "k", "count", "out", "ended", "pending", "done", "logprob", "nfree", "limits", "logits",
                 "cut", "ctc")

    def __init__(self, idx: int, k: int, n_segs: int, limits: list[int], pending: list):
        self.idx, self.k, self.count, self.limits, self.pending = idx, k, 0, limits, pending
        self.out = [[] for _ in range(n_segs)]
        self.ended = [False] * n_segs
        self.done, self.logprob, self.nfree, self.logits, self.cut = False, 0.0, 0, [], False
        self.ctc: Optional[CTCState] = None  # CTC prefix state of the current text output (--ctc-weight)

    def clone(self) -> "Row":
        r = Row.__new__(Row)
        r.idx, r.k, r.count, r.limits, r.done, r.logprob, r.nfree, r.cut, r.ctc = (
            self.idx, self.k, self.count, self.limits, self.done, self.logprob, self.nfree, self.cut, self.ctc)
        r.out, r.ended, r.pending, r.logits = [list(o) for o in self.out], list(self.ended), list(self.pending), []
        return r


# --- search loops --------------------------------------------------------------------------------------


def length_penalty(n: int, alpha: float) -> float:
    return ((5 + n) / 6) ** alpha


def _apply(plan: Plan, gen: "Generator", r: Row, tok: int, lp: float) -> None:
    """Row r chose `tok` (a free choice) in its current output: record it and queue what to feed next."""
    k = r.k
    r.logprob += lp
    r.nfree += 1
    end = gen.begin_end(plan.segs[k])[1]
    if tok == end:
        r.ended[k] = True
        if k == plan.last:
            r.done, r.pending = True, []
        else:
            r.pending = [(k, end), (k + 1, gen.begin_end(plan.segs[k + 1])[0])]
            r.k, r.count = k + 1, 0
        return
    r.out[k].append(tok)
    r.count += 1
    if r.count < r.limits[k]:
        r.pending = [(k, tok)]
    elif k == plan.last:  # maximum length of the last output: stop
        r.done, r.pending = True, []
    else:  # maximum length: force this output's end and the next one's begin
        r.pending = [(k, tok), (k, end), (k + 1, gen.begin_end(plan.segs[k + 1])[0])]
        r.k, r.count = k + 1, 0


def _masked(gen: "Generator", plan: Plan, rows: list[Row], logits: torch.Tensor, cfg) -> torch.Tensor:
    """Raw logits [R, V] of rows in the same modality -> float logits with disallowed ids at -inf."""
    m = plan.segs[rows[0].k]
    x = logits.float().masked_fill(~gen._masks[m], float("-inf"))
    if cfg.min_new_tokens:
        noend = [i for i, r in enumerate(rows) if r.count < min(cfg.min_new_tokens, r.limits[r.k])]
        if len(noend) == len(rows):
            x[:, gen.begin_end(m)[1]] = float("-inf")
        elif noend:
            x[noend, gen.begin_end(m)[1]] = float("-inf")
    return x


CTC_CANDIDATES = 256
"""Labels per hypothesis and step that get a CTC prefix score: the likeliest under attention (ESPnet's
pre-beam; the recursion costs O(frames) per label), so every label of a vocabulary this size or smaller.
The rest keep -inf, as do the masked ids."""


class _CTCStep:
    """One step's CTC prefix scores of a group of rows: builds the states of the extensions chosen."""

    def __init__(self, scorer: CTCPrefixScorer, rows: list[Row], sel: list[int], cands: torch.Tensor,
                 psi: torch.Tensor, end: int):
        self.scorer, self.end, self.psi = scorer, end, psi
        self.parents = [rows[j].ctc for j in sel]
        self.at = {j: i for i, j in enumerate(sel)}  # row of the group -> row of psi / cands
        self.where = [{c: k for k, c in enumerate(row)} for row in cands.tolist()]

    def states(self, picks: list[tuple[int, int]]) -> list[Optional[CTCState]]:
        """picks (row j of the group, token) -> the CTC state after that token: None for the end token and
        for rows without CTC. One batched recursion for all picks."""
        todo = [(n, self.at[j], tok) for n, (j, tok) in enumerate(picks) if j in self.at and tok != self.end]
        out: list[Optional[CTCState]] = [None] * len(picks)
        if todo:
            kids = self.scorer.advance([self.parents[i] for _, i, _ in todo], [tok for _, _, tok in todo],
                                       [self.psi[i, self.where[i][tok]].item() for _, i, tok in todo])
            for (n, _, _), kid in zip(todo, kids):
                out[n] = kid
        return out


def _ctc_joint(gen: "Generator", rows: list[Row], lp: torch.Tensor, weight: float,
               scorer: CTCPrefixScorer) -> tuple[torch.Tensor, Optional[_CTCStep]]:
    """Attention log-probs lp [R, V] of text rows -> the rows' scores: for rows with a CTC state,
    (1 - w) * lp + w * CTC prefix gain, the others' lp unchanged; and the step's _CTCStep (None when no
    row has a CTC state)."""
    lp = lp.cpu()
    sel = [j for j, r in enumerate(rows) if r.ctc is not None]
    if not sel:
        return lp, None
    R, V = len(sel), lp.shape[1]
    end = gen.begin_end("text")[1]
    att = lp[sel]
    cands = att.masked_fill(torch.arange(V) == end, float("-inf")).topk(min(CTC_CANDIDATES, V), dim=-1).indices
    states = [rows[j].ctc for j in sel]
    psi = scorer.extend(states, cands)  # [R, K]
    prev = torch.tensor([s.psi for s in states])[:, None]  # [R, 1]
    gain = torch.full((R, V), float("-inf")).scatter(1, cands, psi - prev)
    gain[:, end] = torch.tensor([scorer.final(s) - s.psi for s in states])
    out = lp.clone()
    out[sel] = torch.where(torch.isfinite(att) & torch.isfinite(gain), (1 - weight) * att + weight * gain,
                           float("-inf"))
    return out, _CTCStep(scorer, rows, sel, cands, psi, end)


def _set_ctc(plan: Plan, rows: list[Row], states: list[Optional[CTCState]]) -> None:
    """Rows that chose a token get their new CTC state; one that left its first output keeps none."""
    for r, st in zip(rows, states):
        r.ctc = st if r.k == plan.first and not r.done else None


def _groups(plan: Plan, rows: list[Row], last: list) -> dict[str, list[int]]:
    """Rows that choose a token now (fed their last pending token), grouped by current modality."""
    g: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if not r.done and not r.pending:
            assert last[i] == plan.tower[r.k], "the logits must come from the current output's tower"
            g.setdefault(plan.segs[r.k], []).append(i)
    return g


def _feed(engine, plan: Plan, rows: list[Row], prefill: bool):
    """Feed every live row its next pending token (all of them when prefilling)."""
    items = []
    for r in rows:
        if r.done or not r.pending:
            items.append(())
            continue
        take = r.pending if prefill else r.pending[:1]
        r.pending = [] if prefill else r.pending[1:]
        items.append([(plan.tower[s], t, plan.later[s]) for s, t in take])
    return engine.feed(items)


def _cache_len(gen: "Generator", plan: Plan, rows: list[Row]) -> dict[str, int]:
    fed = [gen._fed(plan, r.pending, r.limits) for r in rows]
    return {n: max(1, max(f[n] for f in fed)) for n in set(plan.tower)}


def _sample(x: torch.Tensor, cfg: GenerationConfig, u: torch.Tensor) -> torch.Tensor:
    """x [R, V] masked logits, u [R] uniforms -> sampled ids [R] (inverse CDF; top-k, top-p filtered)."""
    y = x / cfg.temperature
    V = y.shape[-1]
    if 0 < cfg.top_k < V:
        kth = y.topk(cfg.top_k, dim=-1).values[:, -1:]
        y = y.masked_fill(y < kth, float("-inf"))
    if cfg.top_p < 1:
        sy, si = y.sort(dim=-1, descending=True)
        p = sy.softmax(-1)
        drop = (p.cumsum(-1) - p) >= cfg.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        y = torch.full_like(y, float("-inf")).scatter(1, si, sy.masked_fill(drop, float("-inf")))
    p = y.softmax(-1)
    cdf = p.cumsum(-1)
    c = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1)
    last_nonzero = V - 1 - (p > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(c, last_nonzero)


def _uniforms(rows: list[Row], cfg: GenerationConfig) -> torch.Tensor:
    """[R, n]: each row's own stream of uniforms, seeded by (seed, example index)."""
    n = max(sum(r.limits) + len(r.limits) + 1 for r in rows)
    out = torch.empty(len(rows), n)
    for i, r in enumerate(rows):
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + r.idx) % (1 << 63))
        out[i] = torch.rand(n, generator=g)
    return out


def sample_loop(gen, plan, engine, rows, cfg, return_logits, scorer=None) -> list[Row]:
    """Greedy or sampling; with a CTC scorer (greedy only) text outputs take the joint-score argmax."""
    engine.start(len(rows), _cache_len(gen, plan, rows))
    U = _uniforms(rows, cfg) if cfg.strategy == "sample" else None
    prefill = True
    while True:
        last, logits = _feed(engine, plan, rows, prefill)
        prefill = False
        for m, idx in _groups(plan, rows, last).items():
            group = [rows[i] for i in idx]
            raw = logits[gen.tower_of(m)]
            raw = raw if len(idx) == raw.shape[0] else raw[idx]  # idx is sorted: all rows = every row
            x = _masked(gen, plan, group, raw, cfg)
            lp = x.log_softmax(-1)
            step = None
            if scorer is not None and m == "text":
                lp, step = _ctc_joint(gen, group, lp, cfg.ctc_weight, scorer)
            if U is None:
                lpc, c = lp.max(-1)  # greedy: the first of equal maxima, as argmax
            else:
                u = U[idx, [r.nfree for r in group]].to(x.device)
                c = _sample(x, cfg, u)
                lpc = lp.gather(1, c[:, None])[:, 0]
            lps = lpc.tolist()
            for j, (r, t) in enumerate(zip(group, c.tolist())):
                if return_logits:
                    r.logits.append(raw[j].cpu())
                _apply(plan, gen, r, t, lps[j])
            if step is not None:
                _set_ctc(plan, group, step.states(list(enumerate(c.tolist()))))
        if all(r.done for r in rows):
            return rows


def beam_search(gen, plan, engine, rows, cfg, scorer=None) -> list[Row]:
    """Beam search, batch_size examples x cfg.beam beams. Per step: every live beam's candidates (its
    log-probs over its modality, or its single forced token at log-prob 0) are scored, the top 2N per
    example are scanned in order: a candidate that ends the hypothesis (end of the last output, or its
    maximum length) joins the finished list if within the top N, the others fill the N beams. An example
    is done when it has N finished hypotheses and no live beam's normalised score beats the worst of
    them (HF's rule), or no live beam is left. With N = 1 this is greedy, token for token. With a CTC
    scorer, text candidates are scored by the joint CTC/attention score (as greedy does)."""
    N, B = cfg.beam, len(rows)
    engine.start(B, _cache_len(gen, plan, rows))
    last, logits = _feed(engine, plan, rows, prefill=True)
    rep = torch.arange(B).repeat_interleave(N)
    engine.reorder(rep)
    logits = {n: v.index_select(0, rep.to(v.device)) for n, v in logits.items()}
    last = [last[i] for i in rep.tolist()]
    beams = [rows[b].clone() for b in range(B) for _ in range(N)]
    scores = torch.full((B * N,), float("-inf"))
    scores[::N] = 0.0
    for i in range(B * N):
        beams[i].done = i % N != 0  # dead until filled
    finished: list[list[tuple[float, Row]]] = [[] for _ in range(B)]
    ex_done = [False] * B
    V = max(gen.vocab_size(n) for n in set(plan.tower))
    while True:
        cand = torch.full((B * N, V), float("-inf"))
        steps = {}  # beam -> (the _CTCStep of its group, its row in the group)
        for m, idx in _groups(plan, beams, last).items():
            group = [beams[i] for i in idx]
            lp = _masked(gen, plan, group, logits[gen.tower_of(m)][idx], cfg).log_softmax(-1).cpu()
            if scorer is not None and m == "text":
                lp, step = _ctc_joint(gen, group, lp, cfg.ctc_weight, scorer)
                if step is not None:
                    steps.update((i, (step, j)) for j, i in enumerate(idx))
            cand[idx, :lp.shape[1]] = lp
        for i, r in enumerate(beams):
            if not r.done and r.pending:  # forced token: one candidate, log-prob 0
                cand[i, 0] = 0.0
        total = (scores[:, None] + cand).view(B, N * V)
        top_s, top_i = total.topk(2 * N, dim=-1)
        src, new_beams, new_scores = [], [], []
        picked: dict = {}  # CTC: per group step, the (kept row, its parent's row in the group, token)
        for b in range(B):
            keep = []
            if not ex_done[b]:
                for rank, (s, c) in enumerate(zip(top_s[b].tolist(), top_i[b].tolist())):
                    if s == float("-inf") or len(keep) == N:
                        break
                    i, tok = b * N + c // V, c % V
                    r = beams[i].clone()
                    free = not r.pending
                    if free:
                        _apply(plan, gen, r, tok, cand[i, tok].item())
                    if r.done:
                        if rank < N:
                            finished[b].append((s / length_penalty(r.nfree, cfg.length_penalty), r))
                        continue
                    keep.append((i, r, s, tok if free else None))
                live = [s / length_penalty(r.nfree, cfg.length_penalty) for _, r, s, _ in keep]
                fin = sorted((f for f, _ in finished[b]), reverse=True)[:N]
                if not keep or (len(fin) >= N and max(live) <= fin[-1]):
                    ex_done[b], keep = True, []
            for i, r, s, tok in keep:
                src.append(i), new_beams.append(r), new_scores.append(s)
                if tok is not None and i in steps:  # a kept beam that chose a text token: its CTC state
                    step, j = steps[i]
                    picked.setdefault(id(step), (step, []))[1].append((r, j, tok))
            for _ in range(N - len(keep)):  # dead beams: a copy of any row, never fed
                d = beams[b * N].clone()
                d.done = True
                src.append(b * N), new_beams.append(d), new_scores.append(float("-inf"))
        for step, items in picked.values():
            _set_ctc(plan, [r for r, _, _ in items], step.states([(j, tok) for _, j, tok in items]))
        if all(ex_done):
            break
        engine.reorder(src)
        beams, scores = new_beams, torch.tensor(new_scores)
        last, logits = _feed(engine, plan, beams, prefill=False)
    best = []
    for b in range(B):
        f, r = max(finished[b], key=lambda t: t[0])
        best.append(r)
    return best
