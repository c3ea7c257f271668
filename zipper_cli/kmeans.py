"""k-means in torch for speech units: k-means++ seeding, then Lloyd (full batch) or Sculley minibatch updates.

Deterministic for a given seed on CPU with a fixed thread count: every random draw comes from one seeded
torch.Generator, ties in argmin go to the lowest index, and sums are accumulated in a fixed order.
Assignment uses ||x||^2 - 2 x c^T + ||c||^2 in row chunks, so the work is one matmul per chunk and the
[N, K] distance matrix is never held whole. Reservoir draws the frames to fit on from a stream of utterances.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

FULL_BATCH_MAX = 100_000  # more frames than this -> minibatch k-means (a Lloyd pass costs N*K*D per iteration)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, D] float32
    inertia: float  # mean squared distance of a frame to its nearest centroid
    iterations: int  # Lloyd iterations, or minibatch epochs
    minibatch: bool


def assign(
    x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor | None = None, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid for each row of x [N, D] among c [K, D]: (labels [N] int64, squared distances [N])."""
    if c_sq is None:
        c_sq = c.pow(2).sum(1)  # [K]
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.long)
    dist = torch.empty(n, dtype=x.dtype)
    ct = c.t()  # [D, K] view; addmm reads it transposed without a copy
    for s in range(0, n, chunk):
        xb = x[s : s + chunk]
        # ||c||^2 - 2 x.c : the per-row constant ||x||^2 does not change the argmin, so add it only to the min
        d = torch.addmm(c_sq, xb, ct, alpha=-2.0)  # [n, K]
        m, lab = d.min(dim=1)  # ties -> first (lowest) index
        labels[s : s + chunk] = lab
        dist[s : s + chunk] = (m + xb.pow(2).sum(1)).clamp_min_(0.0)
    return labels, dist


def kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator, n_trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding: draw n_trials candidates with probability proportional to their squared
    distance to the nearest centre so far, keep the one that lowers the total distance most (as in
    scikit-learn; plain k-means++ with one draw often merges clusters). Returns [k, D]."""
    n = x.shape[0]
    n_trials = n_trials or 2 + int(math.log(k))
    x_sq = x.pow(2).sum(1)  # [N]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d = (x_sq - 2.0 * (x @ x[chosen[0]]) + x_sq[chosen[0]]).clamp_min_(0.0)  # [N] distance to nearest centre
    for _ in range(1, k):
        if float(d.sum()) > 0.0:
            cand = torch.multinomial(d, n_trials, replacement=True, generator=gen)  # [L]
        else:  # every point sits on a centre already (duplicated data): any point will do
            cand = torch.randint(n, (n_trials,), generator=gen)
        dc = torch.addmm(x_sq[cand].unsqueeze(0), x, x[cand].t(), alpha=-2.0)  # [N, L]
        dc = torch.minimum(dc.add_(x_sq.unsqueeze(1)).clamp_min_(0.0), d.unsqueeze(1))
        best = int(dc.sum(0).argmin())
        chosen.append(int(cand[best]))
        d = dc[:, best].contiguous()
    return x[chosen].clone()


def _reseed_empty(c: torch.Tensor, empty: torch.Tensor, x: torch.Tensor, dist: torch.Tensor) -> int:
    """Move empty centres onto the points farthest from their current centre (the worst-served points)."""
    if empty.numel() == 0:
        return 0
    far = torch.argsort(dist, descending=True, stable=True)[: empty.numel()]
    c[empty[: far.numel()]] = x[far]
    return int(empty.numel())


def _lloyd(x: torch.Tensor, c: torch.Tensor, max_iter: int, tol: float, log) -> tuple[torch.Tensor, int]:
    k = c.shape[0]
    prev = math.inf
    it = 0
    for it in range(1, max_iter + 1):
        labels, dist = assign(x, c)
        inertia = float(dist.mean())
        counts = torch.bincount(labels, minlength=k)  # [K]
        sums = torch.zeros_like(c).index_add_(0, labels, x)  # [K, D]
        c = sums / counts.clamp_min(1).unsqueeze(1).to(c.dtype)
        n_empty = _reseed_empty(c, (counts == 0).nonzero().squeeze(1), x, dist)
        if log and (it == 1 or it % 10 == 0):
            log(f"  k-means iter {it}: inertia {inertia:.4f}" + (f", re-seeded {n_empty} empty" if n_empty else ""))
        if n_empty == 0 and prev - inertia <= tol * inertia:
            break
        prev = inertia
    return c, it


def _minibatch(
    x: torch.Tensor, c: torch.Tensor, gen: torch.Generator, batch_size: int, max_epochs: int, tol: float, log
) -> tuple[torch.Tensor, int]:
    """Sculley (2010) web-scale k-means: each centre moves toward the mean of its batch points with a
    per-centre learning rate n_batch / n_seen, so it converges to the running mean of what it has won."""
    n, k = x.shape[0], c.shape[0]
    seen = torch.zeros(k, dtype=c.dtype)  # [K] points each centre has absorbed so far
    prev = math.inf
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        perm = torch.randperm(n, generator=gen)
        won = torch.zeros(k, dtype=torch.long)  # [K] wins this epoch, to find dead centres
        total = 0.0
        for s in range(0, n, batch_size):
            xb = x[perm[s : s + batch_size]]  # [B, D]
            labels, dist = assign(xb, c)
            total += float(dist.sum())
            nb = torch.bincount(labels, minlength=k)  # [K]
            won += nb
            sums = torch.zeros_like(c).index_add_(0, labels, xb)  # [K, D]
            hit = nb > 0
            nbf = nb[hit].to(c.dtype)
            seen[hit] += nbf
            # c <- c + (n_b / n_seen) * (batch_mean - c) = c + (sum - n_b * c) / n_seen
            c[hit] += (sums[hit] - nbf.unsqueeze(1) * c[hit]) / seen[hit].unsqueeze(1)
        inertia = total / n
        # Centres that won nothing for a whole epoch are dead: restart them on far points of the last batch.
        dead = (won == 0).nonzero().squeeze(1)
        n_dead = _reseed_empty(c, dead, xb, dist)
        seen[dead] = 0.0
        if log:
            note = f", re-seeded {n_dead} dead" if n_dead else ""
            log(f"  minibatch k-means epoch {epoch}: inertia {inertia:.4f}{note}")
        if n_dead == 0 and prev - inertia <= tol * inertia:
            break
        prev = inertia
    return c, epoch


def kmeans(
    x: torch.Tensor,
    k: int,
    seed: int = 0,
    max_iter: int = 50,
    tol: float = 1e-4,
    full_batch_max: int = FULL_BATCH_MAX,
    batch_size: int = 8192,
    max_epochs: int = 10,
    minibatch_tol: float = 1e-3,
    init_size: int | None = None,
    log: Callable[[str], None] | None = None,
) -> KMeansResult:
    """Cluster x [N, D] into k centroids.

    Seeding runs k-means++ on a random subset of init_size points (default max(20k, 10000)): it is
    sequential in k, so on all N points it would cost more than the clustering itself. Then Lloyd
    iterations on all points when N <= full_batch_max, else minibatch k-means (batch_size points per step,
    at most max_epochs passes). They stop when the mean inertia improves by less than tol (Lloyd) or
    minibatch_tol (per epoch; each minibatch epoch costs about one Lloyd iteration) relative.
    """
    x = x.float().contiguous()
    n = x.shape[0]
    if k < 1 or n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    init_n = min(n, init_size or max(20 * k, 10_000))
    sub = x if init_n == n else x[torch.randperm(n, generator=gen)[:init_n]]
    c = kmeans_pp(sub, k, gen)
    if log:
        log(f"  k-means++ seeding on {init_n} of {n} frames: {time.time() - t0:.1f}s")
    minibatch = n > full_batch_max
    if minibatch:
        c, iters = _minibatch(x, c, gen, batch_size, max_epochs, minibatch_tol, log)
    else:
        c, iters = _lloyd(x, c, max_iter, tol, log)
    _, dist = assign(x, c)
    return KMeansResult(centroids=c.contiguous(), inertia=float(dist.mean()), iterations=iters, minibatch=minibatch)


class Reservoir:
    """A uniform sample of at most `cap` rows from a stream of [n, D] chunks (algorithm R, vectorised, seeded)."""

    def __init__(self, cap: int, gen: torch.Generator):
        self.cap, self.gen, self.seen = cap, gen, 0
        self.chunks: list[torch.Tensor] = []  # while not yet full: keep everything (small corpora)
        self.buf: torch.Tensor | None = None  # [cap, D] once full

    def add(self, rows: torch.Tensor) -> None:
        if self.buf is None:
            take = min(rows.shape[0], self.cap - self.seen)
            self.chunks.append(rows[:take].clone())
            self.seen += take
            rows = rows[take:]
            if self.seen == self.cap:
                self.buf, self.chunks = torch.cat(self.chunks), []
        n = rows.shape[0]
        if n == 0:
            return
        # row i (0-based, global) replaces slot j ~ U{0..i} when j < cap
        i = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        j = (torch.rand(n, generator=self.gen, dtype=torch.float64) * (i + 1)).long().numpy()
        src = np.nonzero(j < self.cap)[0]
        # a later row overwrites an earlier one in the same slot, as in the sequential algorithm
        slots, last = np.unique(j[src][::-1], return_index=True)
        self.buf[torch.from_numpy(slots)] = rows[torch.from_numpy(src[::-1][last].copy())]
        self.seen += n

    def frames(self) -> torch.Tensor:
        if self.buf is not None:
            return self.buf
        return torch.cat(self.chunks) if self.chunks else torch.zeros(0, 1)
