"""The decoder-only Tower: one class for both the text and the speech tower of Zipper.

Pre-norm RMSNorm blocks, rotary positions, causal `scaled_dot_product_attention` (optionally with
grouped-query KV heads), SwiGLU MLP, final RMSNorm, output head tied to the token embedding.

Static KV cache, gpt-fast style: `setup_cache(B, S)` allocates per-layer k/v buffers
[B, n_kv_head, S, head_dim]; `forward(tokens, input_pos)` writes the new keys/values at `input_pos`
and attends over the whole cache with a mask "cache position <= query position".
`input_pos` is [T] (same positions for every row) or [B, T] (one position per row, so a right-padded
ragged batch decodes each row from its own length: pad slots are overwritten before they are
ever attended to).

Fusion code interleaves its own modules between blocks:
    x = tower.embed(tokens)
    rope, mask = tower.block_inputs(T, input_pos)
    for block in tower.blocks:
        x = block(x, rope, mask, input_pos)   # ... cross-attention here ...
    logits = tower.head(x)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zipper_cli.errors import ZipperError


def _default_ffn_hidden(n_embd: int) -> int:
    # SwiGLU has 3 matrices instead of 2, so 8/3 * d keeps the MLP at ~8 d^2 params (LLaMA);
    # rounded up to a multiple of 64 for matmul-friendly shapes.
    return 64 * math.ceil(8 * n_embd / 3 / 64)


@dataclass
class TowerConfig:
    vocab_size: int
    """Number of token ids (text pieces, or speech units plus special tokens)."""
    n_embd: int
    """Width of the residual stream (model dimension)."""
    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Number of query heads; head_dim = n_embd // n_head."""
    n_kv_head: Optional[int] = None
    """Key/value heads for grouped-query attention; must divide n_head. None means n_head (plain MHA)."""
    ffn_hidden: Optional[int] = None
    """Hidden size of the SwiGLU MLP. None means 8/3 * n_embd rounded up to a multiple of 64."""
    max_seq_len: int = 1024
    """Longest sequence (positions 0..max_seq_len-1) the rotary tables cover."""
    dropout: float = 0.0
    """Dropout on attention weights and on each residual branch (training only)."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""

    def __post_init__(self) -> None:
        # Resolve the "derived" defaults once so checkpoints store concrete numbers.
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None and isinstance(self.n_embd, int) and self.n_embd > 0:
            self.ffn_hidden = _default_ffn_hidden(self.n_embd)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> "TowerConfig":
        """Raise ZipperError naming the first bad field; return self so calls can chain."""
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "n_kv_head", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ZipperError(f"tower config: {name} ({value!r}) must be a positive integer")
        if self.n_embd % self.n_head:
            raise ZipperError(f"tower config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ZipperError(
                f"tower config: head_dim = n_embd / n_head ({self.head_dim}) must be even for rotary positions"
            )
        if self.n_head % self.n_kv_head:
            raise ZipperError(
                f"tower config: n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ZipperError(f"tower config: dropout ({self.dropout}) must be in [0, 1)")
        if not self.rope_base > 0:
            raise ZipperError(f"tower config: rope_base ({self.rope_base}) must be > 0")
        if not self.norm_eps > 0:
            raise ZipperError(f"tower config: norm_eps ({self.norm_eps}) must be > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TowerConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in d:
            if key not in fields:
                raise ZipperError(f"checkpoint config has unknown key '{key}' (made by a newer zipper?)")
        for name, f in fields.items():
            if f.default is dataclasses.MISSING and name not in d:
                raise ZipperError(f"checkpoint config is missing key '{name}'")
        return cls(**d).validate()

    def num_params(self) -> int:
        """Parameter count from the formula (no allocation); equals Tower(cfg).num_params()."""
        d, hd = self.n_embd, self.head_dim
        attn = d * (self.n_head + 2 * self.n_kv_head) * hd + self.n_head * hd * d  # qkv + out proj
        mlp = 3 * d * self.ffn_hidden  # gate, up, down
        block = attn + mlp + 2 * d  # + two RMSNorm weights
        return self.vocab_size * d + self.n_layer * block + d  # tied embedding, final norm


# Plain preset values; vocab_size comes from the tokenizer, everything else can be overridden.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, max_seq_len=256),  # unit tests
    "demo": dict(n_embd=256, n_layer=4, n_head=4, max_seq_len=1024),  # ~3.2M + emb: minutes on a laptop CPU
    "S": dict(n_embd=768, n_layer=14, n_head=12, max_seq_len=2048),  # ~100M
    "L": dict(n_embd=2048, n_layer=20, n_head=16, max_seq_len=2048),  # ~1B
}


def tower_preset(name: str, vocab_size: int, **overrides: Any) -> TowerConfig:
    if name not in PRESETS:
        raise ZipperError(f"unknown tower preset '{name}' (valid: {', '.join(PRESETS)})")
    valid = {f.name for f in dataclasses.fields(TowerConfig)} - {"vocab_size"}
    for key in overrides:
        if key not in valid:
            raise ZipperError(f"unknown tower config field '{key}' (valid: {', '.join(sorted(valid))})")
    return TowerConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides}).validate()


# ----------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations don't lose the mean-square.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """The rotary frequencies [head_dim // 2], base^(-2i / head_dim)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, head_dim // 2]."""
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), rope_inv_freq(head_dim, base))
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin broadcastable to [B, 1, T, hd/2]. Rotate-half convention, in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_kv_head: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        # Non-persistent: a cache is runtime state, it must never end up in a checkpoint.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, Hkv, T, hd] at input_pos ([T] or [B, T]); return the caches [B, Hkv, S, hd]."""
        B, H, T, D = k.shape
        if B > self.k.shape[0]:
            raise RuntimeError(f"batch {B} is larger than the KV cache batch {self.k.shape[0]}")
        idx = input_pos.view(-1, 1, T, 1).expand(B, H, T, D)
        k_cache, v_cache = self.k[:B], self.v[:B]  # views: a smaller batch reuses the first rows
        k_cache.scatter_(2, idx, k.to(k_cache.dtype))
        v_cache.scatter_(2, idx, v.to(v_cache.dtype))
        return k_cache, v_cache


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, rope, mask=None, input_pos=None):
        B, T, _ = x.shape
        hd, H, Hkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.qkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, Hkv, hd).transpose(1, 2)  # [B, Hkv, T, hd]
        v = v.view(B, T, Hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call Tower.setup_cache first")
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, Hkv, S, hd]
            k, v = k.to(q.dtype), v.to(q.dtype)
        if Hkv != H:  # GQA: each KV head serves H // Hkv query heads
            k = k.repeat_interleave(H // Hkv, dim=1)  # [B, H, S, hd]
            v = v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # [B, T, C]
        return self.resid_drop(self.proj(y))


class SwiGLU(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.resid_drop(self.proj(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, mask=None, input_pos=None):
        """x [B, T, C]; rope, mask from Tower.block_inputs; input_pos None (training) or cache positions."""
        x = x + self.attn(self.norm1(x), rope, mask, input_pos)
        return x + self.mlp(self.norm2(x))


class Tower(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived from cfg, not checkpointed
        self.register_buffer("rope_sin", sin, persistent=False)
        self.cache_len = 0  # length S of the allocated KV caches, 0 = none
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer)
        # so the stream's variance doesn't grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # --- pieces for fusion code -------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> h [B, T, C] (embedding lookup only)."""
        return self.wte(tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, C] -> logits [B, T, vocab]: final norm, then the tied embedding as output matrix."""
        return F.linear(self.norm_f(h), self.wte.weight)

    def block_inputs(self, seq_len: int, input_pos: Optional[torch.Tensor] = None):
        """(rope, mask) for blocks. input_pos None: positions 0..T-1, mask None (sdpa's causal path).
        input_pos [T] or [B, T]: rope at those positions, bool mask [1|B, 1, T, S] over the cache."""
        if input_pos is None:
            if seq_len > self.cfg.max_seq_len:
                raise ZipperError(f"sequence length {seq_len} exceeds the tower's max_seq_len {self.cfg.max_seq_len}")
            rope = (self.rope_cos[:seq_len], self.rope_sin[:seq_len])  # [T, hd/2], broadcasts over B, H
            return rope, None
        if self.cache_len == 0:
            raise RuntimeError("input_pos given but no KV cache: call Tower.setup_cache first")
        if input_pos.shape[-1] != seq_len:
            raise ValueError(f"input_pos has {input_pos.shape[-1]} positions for {seq_len} tokens")
        if int(input_pos.max()) >= self.cache_len:
            raise ZipperError(f"position {int(input_pos.max())} is past the KV cache length {self.cache_len}")
        lead = (1, 1) if input_pos.dim() == 1 else (input_pos.shape[0], 1)
        cos = self.rope_cos[input_pos].view(*lead, seq_len, -1)  # [1|B, 1, T, hd/2]
        sin = self.rope_sin[input_pos].view(*lead, seq_len, -1)
        cache_pos = torch.arange(self.cache_len, device=input_pos.device)
        mask = (cache_pos <= input_pos.unsqueeze(-1)).view(*lead, seq_len, self.cache_len)  # [1|B, 1, T, S]
        return (cos, sin), mask

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. input_pos None: full causal pass (training);
        else the positions of these tokens, using and filling the KV cache."""
        x = self.embed(tokens)
        rope, mask = self.block_inputs(tokens.shape[1], input_pos)
        for block in self.blocks:
            x = block(x, rope, mask, input_pos)
        return self.head(x)

    # --- KV cache ---------------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_seq_len: Optional[int] = None, dtype=None, device=None) -> None:
        """Allocate per-layer caches [batch_size, n_kv_head, max_seq_len, head_dim] (default: the
        model's max_seq_len, dtype and device). Smaller batches later reuse the first rows."""
        S = max_seq_len or self.cfg.max_seq_len
        if S > self.cfg.max_seq_len:
            raise ZipperError(f"KV cache length {S} exceeds the tower's max_seq_len {self.cfg.max_seq_len}")
        dtype = dtype or self.wte.weight.dtype
        device = device or self.wte.weight.device
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.cfg.n_kv_head, S, self.cfg.head_dim, dtype, device)
        self.cache_len = S

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Beam search: row i of every cache becomes old row index[i]."""
        for block in self.blocks:
            c = block.attn.kv_cache
            c.k = c.k.index_select(0, index)
            c.v = c.v.index_select(0, index)

    def reset_cache(self) -> None:
        """Zero the caches, keeping the allocation (stale entries are masked anyway; this is hygiene)."""
        for block in self.blocks:
            if block.attn.kv_cache is not None:
                block.attn.kv_cache.k.zero_()
                block.attn.kv_cache.v.zero_()

    def clear_cache(self) -> None:
        """Drop the caches and free their memory."""
        for block in self.blocks:
            block.attn.kv_cache = None
        self.cache_len = 0

    # --- accounting -------------------------------------------------------------------------------

    def num_params(self, trainable_only: bool = False) -> int:
        # parameters() yields each tensor once, so the tied embedding counts once.
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token, PaLM appendix B: 6N + 12 * n_layer * n_head * head_dim * T.
        N includes the tied embedding (it is used as the output matmul). T defaults to max_seq_len."""
        T = seq_len or self.cfg.max_seq_len
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T
