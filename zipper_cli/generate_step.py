"""One cached decode step of a Tower's blocks, as plain tensor ops (used by generate_cache's engines).

block_step computes what Block.forward computes with its KV cache, but attends only to the first
L = (max position + 1) cache slots, and runs as plain tensor ops on weights laid out for small products
(DecodeWeights: transposed copies on CPU, gate/up side by side, RMSNorm weights folded in for float32).
Decode steps are a few dozen tiny ops per block, so op count and weight layout are most of their cost.
Step holds one step's positions, rotary embedding and attention mask; head_logits is the final norm
and the output matrix.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from zipper_cli.models.tower import Tower, apply_rope


def _rotations(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos, sin [..., hd/2] -> R [..., hd, hd] with x @ R = tower.apply_rope(x) (rotate-half convention:
    R = diag(cat(cos, cos)) + Q diag(cat(sin, sin)), x @ Q = cat(-x[hd/2:], x[:hd/2]))."""
    h = cos.shape[-1]
    q = torch.zeros(2 * h, 2 * h, dtype=cos.dtype, device=cos.device)
    q[torch.arange(h) + h, torch.arange(h)] = -1.0
    q[torch.arange(h), torch.arange(h) + h] = 1.0
    c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return torch.diag_embed(c) + q * s.unsqueeze(-2)


class Step:
    """Positions, rotary embedding and attention mask of one cached step of a tower, from the positions
    (host lists, [B][T]). Attention reads only the first L = max position + 1 cache slots.
    Fast path (float32, one new token per row, every row at the same position p; always so at batch 1):
    the cache is written at slot p by slicing, the rotary embedding is one matmul with the rotation
    matrix of p (precomputed per call), and no mask is needed (the query may attend to every slot < L).
    Otherwise: per-row positions, scatter writes, elementwise rotary, mask "slot <= query position" as in
    Tower.block_inputs."""

    def __init__(self, tower: Tower, w: "DecodeWeights", pos: list[list[int]], device):
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


class DecodeWeights:
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
    """tower.RMSNorm as plain ops (see DecodeWeights): folded: x / hypot(|x|, sqrt(C eps)); other float32:
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


def block_step(w: dict, x: torch.Tensor, st: Step) -> torch.Tensor:
    """Block.forward(x, rope, mask, input_pos) with a KV cache, for inference: the same computation, with
    plain functional calls and attention over the first st.L cache slots only (the other slots are
    masked out there anyway)."""
    a = w["attn"]
    B, T, C = x.shape
    hd, H, Hkv = a.head_dim, a.n_head, a.n_kv_head
    cache = a.kv_cache
    kbuf, vbuf = cache.k, cache.v  # [B, Hkv, S, hd]; read once (module attribute lookups add up here)
    if kbuf.shape[0] != B:
        raise RuntimeError(f"batch {B} does not match the KV cache batch {kbuf.shape[0]}")
    if st.fast:
        return _block_step_fast(w, x, st, kbuf, vbuf, H, Hkv, hd)
    qkv = _rms(x, w["norm1"]) @ w["qkv"]
    qk = apply_rope(qkv[..., :(H + Hkv) * hd].view(B, T, H + Hkv, hd).transpose(1, 2), st.cos, st.sin)
    q, k = qk.split([H, Hkv], dim=1)
    v = qkv[..., (H + Hkv) * hd:].view(B, T, Hkv, hd).transpose(1, 2)
    idx = st.index(Hkv, hd)
    kbuf.scatter_(2, idx, k if k.dtype == kbuf.dtype else k.to(kbuf.dtype))
    vbuf.scatter_(2, idx, v if v.dtype == vbuf.dtype else v.to(vbuf.dtype))
    kc, vc = _cached_kv(kbuf, vbuf, st.L, q.dtype, H, Hkv)
    y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=st.mask)
    x = x + y.transpose(1, 2).reshape(B, T, H * hd) @ w["proj"]
    gate, up = (_rms(x, w["norm2"]) @ w["gate_up"]).chunk(2, dim=-1)
    return x + (F.silu(gate) * up) @ w["down"]


def _cached_kv(kbuf, vbuf, L: int, dtype, H: int, Hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first L cache slots [B, H, L, hd], in the query's dtype, grouped-query heads repeated."""
    kc, vc = kbuf[:, :, :L], vbuf[:, :, :L]
    if kc.dtype != dtype:
        kc, vc = kc.to(dtype), vc.to(dtype)
    if Hkv != H:
        kc, vc = kc.repeat_interleave(H // Hkv, dim=1), vc.repeat_interleave(H // Hkv, dim=1)
    return kc, vc


def _block_step_fast(w: dict, x: torch.Tensor, st: Step, kbuf, vbuf, H: int, Hkv: int, hd: int) -> torch.Tensor:
    """block_step's fast path (Step.fast: one token per row, all rows at position st.p), on 2-D [B, C]
    rows: torch.mm / addmm instead of matmul on [B, 1, C] (no batching wrapper per product), and the
    residual adds fused into the products after attention and MLP."""
    B, _, C = x.shape
    x2 = x.view(B, C)
    qkv = torch.mm(_rms(x2, w["norm1"]), w["qkv"])  # [B, (H + 2 Hkv) hd]
    qk = torch.mm(qkv[:, :(H + Hkv) * hd].reshape(B * (H + Hkv), hd), st.rot)  # rotary as one product
    qk = qk.view(B, H + Hkv, hd)
    q, k = qk[:, :H, None], qk[:, H:, None]  # [B, H, 1, hd]
    v = qkv[:, (H + Hkv) * hd:].view(B, Hkv, 1, hd)
    p = st.p
    kbuf[:, :, p:p + 1] = k
    vbuf[:, :, p:p + 1] = v
    kc, vc = _cached_kv(kbuf, vbuf, st.L, q.dtype, H, Hkv)
    y = F.scaled_dot_product_attention(q, kc, vc)  # [B, H, 1, hd]
    x2 = torch.addmm(x2, y.reshape(B, H * hd), w["proj"])  # a view whenever the layout allows
    gate, up = torch.mm(_rms(x2, w["norm2"]), w["gate_up"]).chunk(2, dim=-1)
    return torch.addmm(x2, F.silu(gate) * up, w["down"]).view(B, 1, C)


def head_logits(w: DecodeWeights, h: torch.Tensor) -> torch.Tensor:
    """h [B, T, C] -> logits [B, T, V]."""
    B, T, C = h.shape
    return torch.mm(_rms(h.reshape(B * T, C), w.norm_f), w.head).view(B, T, -1)
