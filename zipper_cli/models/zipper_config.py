"""ZipperConfig: how two (or more) towers are zipped, with validation that names the CLI flag."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from zipper_cli.errors import ZipperError

DEFAULT_N_CROSS = 4


@dataclass
class ZipperConfig:
    towers: tuple[str, ...] = ("text", "speech")
    """Tower names in order (A = text, B = speech): the keys of a batch and of the output logits."""
    n_cross: Optional[int] = None
    """--n-cross: number of cross-attention points; point j (1..n_cross) of tower X sits after its layer
    round(j * n_layer_X / n_cross), the same relative depth in every tower. None means 4 unless
    cross_every is given (the two are exclusive)."""
    cross_every: Optional[dict[str, int]] = None
    """--cross-every-text / --cross-every-speech: a layer interval per tower (points after layers i, 2i, ...);
    every tower must get the same number of points."""
    input_proj: tuple[str, ...] = ("text", "speech")
    """--input-proj: towers whose embeddings pass h0 = ReLU(MLP(embed(x))) in fused use (() = none)."""
    proj_layers: int = 3
    """--proj-layers: depth of the ReLU MLPs (width projection g and input projection); 3 in the paper."""
    xattn_heads: Optional[int] = None
    """--xattn-heads: cross-attention heads; None means the attending tower's n_head."""
    dropout: float = 0.0
    """--dropout: dropout in the fusion blocks (attention weights and residual branches)."""
    ctc_head: bool = False
    """--ctc-weight > 0 adds it: a linear CTC head that reads tower B (speech) the way tower A (text) sees it
    at the last cross point (through that block's projection g) and predicts A's tokens, blank = id 0 (pad).
    An auxiliary training loss only (hybrid CTC/attention, Watanabe et al. 2017): it gives g an aligned
    target from the first step, where the gated cross-attention alone starts from no signal. Not in the
    paper; unused in decoding."""
    xattn_pos: Optional[dict[str, float]] = None
    """--xattn-pos: rotary positions inside cross-attention (not in the paper). Per tower, the factor that
    maps its token positions onto one shared time axis (fuse's `auto`: 1 for the first tower, the ratio of
    mean sequence lengths in the aligned data for the others), so a query and a key rotate by their
    distance on that axis. Without it the cross-attention is position-blind: the towers' own rotary
    positions stay inside their self-attention, so a text query cannot ask for "the speech near where I
    am". None = off (the paper's formulation as we read it)."""
    xattn_clock: bool = False
    """--xattn-pos learned: with xattn_pos, every tower after the first places its tokens on the shared
    axis by a learned clock instead of at a fixed rate: token t sits at the sum, over its tower's tokens
    s < t, of softplus(w . h_s + b), h_s the token's hidden state at the first cross point (no
    cross-attention before it: causal, and the same in decoding). w starts at zero and softplus(b) at the
    fixed rate, so the clock starts as `auto`; it can learn to follow the content (speaking rates vary:
    the text/speech length ratio's coefficient of variation is 0.23 on the demo corpus), where a fixed
    rate drifts off the diagonal late in an utterance. Fuse can also train it to end at the transcript's
    length (--clock-weight)."""
    xattn_prior: float = 0.0
    """--xattn-prior: with xattn_pos, start each cross-attention as a soft diagonal on the shared axis: a
    learned offset (one vector per block, added to both queries and keys) whose position-only score is
    this many logits at distance 0 and falls with distance. 0 = no offset."""
    gate_init: float = 0.0
    """--gate-init: initial value of the tanh gates' parameters. 0 is the paper's (Flamingo's) closed gate:
    the fusion weights then get no gradient until a gate moves, and a gate only moves consistently once
    its branch carries something useful. Any other value opens the gates at tanh(gate_init) and starts
    each branch's output projection (cross-attention out, FFW down) at zero instead, so fusion still
    starts as the identity, exactly, while those projections learn from the first step (the zero-init
    last layer of ControlNet and LoRA)."""

    def validate(self) -> "ZipperConfig":
        """Raise ZipperError naming the CLI flag of the first bad field; return self so calls chain."""
        names = self.towers
        if len(names) < 2 or len(set(names)) != len(names):
            raise ZipperError(f"zipper config: towers {list(names)} must be two or more distinct names")
        for n in names:
            # Names become ModuleDict keys and pair keys "x<-y": no dots, no arrows.
            if not isinstance(n, str) or not n or "." in n or "<-" in n:
                raise ZipperError(f"zipper config: bad tower name {n!r}")
        if self.n_cross is not None and self.cross_every is not None:
            raise ZipperError("--n-cross and --cross-every-* are exclusive: give one or the other")
        if self.n_cross is not None and not _pos_int(self.n_cross):
            raise ZipperError(f"--n-cross ({self.n_cross!r}) must be a positive integer")
        if self.cross_every is not None:
            if set(self.cross_every) != set(names):
                raise ZipperError(f"--cross-every-* must be given for every tower ({', '.join(names)}), "
                                  f"got {', '.join(self.cross_every) or 'none'}")
            for n, i in self.cross_every.items():
                if not _pos_int(i):
                    raise ZipperError(f"--cross-every-{n} ({i!r}) must be a positive integer")
        for n in self.input_proj:
            if n not in names:
                raise ZipperError(f"--input-proj: unknown tower '{n}' (valid: {', '.join(names)} or none)")
        if not _pos_int(self.proj_layers):
            raise ZipperError(f"--proj-layers ({self.proj_layers!r}) must be a positive integer")
        if self.xattn_heads is not None and not _pos_int(self.xattn_heads):
            raise ZipperError(f"--xattn-heads ({self.xattn_heads!r}) must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ZipperError(f"--dropout ({self.dropout}) must be in [0, 1)")
        if self.xattn_pos is not None:
            if set(self.xattn_pos) != set(names):
                raise ZipperError(f"--xattn-pos needs a scale for every tower ({', '.join(names)}), "
                                  f"got {', '.join(self.xattn_pos) or 'none'}")
            for n, v in self.xattn_pos.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                    raise ZipperError(f"--xattn-pos: the {n} scale ({v!r}) must be a positive number")
        if not (isinstance(self.xattn_prior, (int, float)) and 0 <= self.xattn_prior < float("inf")):
            raise ZipperError(f"--xattn-prior ({self.xattn_prior!r}) must be >= 0")
        if not (isinstance(self.gate_init, (int, float)) and -float("inf") < self.gate_init < float("inf")):
            raise ZipperError(f"--gate-init ({self.gate_init!r}) must be a finite number")
        if self.xattn_clock and self.xattn_pos is None:
            raise ZipperError("the learned clock (--xattn-pos learned) needs the shared axis's scales (xattn_pos)")
        if self.xattn_prior > 0 and self.xattn_pos is None:
            raise ZipperError("--xattn-prior needs --xattn-pos (the prior is a diagonal on the shared time axis)")
        return self

    def cross_points(self, n_layers: dict[str, int]) -> dict[str, list[int]]:
        """Per tower, the layer counts after which cross points 1..n sit (ascending, may repeat)."""
        self.validate()
        if self.cross_every is not None:
            counts = {n: n_layers[n] // self.cross_every[n] for n in self.towers}
            if len(set(counts.values())) != 1 or 0 in counts.values():
                got = ", ".join(f"{n}: {n_layers[n]} // {self.cross_every[n]} = {c}" for n, c in counts.items())
                raise ZipperError(f"--cross-every-* must give every tower the same number (>= 1) of cross points "
                                  f"({got})")
            return {n: [j * self.cross_every[n] for j in range(1, counts[n] + 1)] for n in self.towers}
        k = self.n_cross or DEFAULT_N_CROSS
        for n in self.towers:
            if k > n_layers[n]:
                raise ZipperError(f"--n-cross ({k}) exceeds the {n} tower's {n_layers[n]} layers")
        # round(j * L / k) rounding halves up, in integers: spreads the points evenly (Python's round
        # rounds halves to even, which bunches them: L=6, k=4 gives 2,3,4,6 instead of 2,3,5,6).
        return {n: [(2 * j * n_layers[n] + k) // (2 * k) for j in range(1, k + 1)] for n in self.towers}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["towers"], d["input_proj"] = list(self.towers), list(self.input_proj)  # JSON-friendly
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ZipperConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in fields:
                raise ZipperError(f"zipper config has unknown key '{key}' (made by a newer zipper?)")
        d = dict(d)
        for key in ("towers", "input_proj"):
            if key in d:
                d[key] = tuple(d[key])
        for key in ("cross_every", "xattn_pos"):
            if d.get(key) is not None:
                d[key] = dict(d[key])
        return cls(**d).validate()


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0
