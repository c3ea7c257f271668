"""Generation of modality sequences: greedy, sampling and beam search, batched, KV-cached.

The caller gives one input per example (raw tokens of one modality: text pieces without bos/eos, or
speech units 0..K-1) and the output modality order, e.g. ["text"] (ASR), ["speech"] (TTS),
["text", "speech"], or [the input's own modality] (unimodal continuation). The example's linear sequence
is what training reads (fusion_data.tower_batch, single_decoder.SingleDecoderVocab):

    [begin] input [end]  [begin] output 1 [end]  [begin] output 2 [end] ...

The model generates in one modality until that modality's end token, then the next modality's begin
token is forced (as is the end token, if an output hits its maximum length before the last output).
When the first output is the input's modality, it continues the input segment (no end/begin between).
Each modality only emits its own tokens (and its end token): pad and begin ids, and in the single
decoder the other modality's ids and the task tags, are masked out of the logits.

Three adapters, one interface (`generate(inputs, input_modality, outputs, cfg)`):
  TowerGenerator(tower, modality)          a pretrained tower alone (continuation)
  ZipperGenerator(model)                   the fused model; [m] from m bypasses fusion (the tower alone)
  SingleDecoderGenerator(model, vocab)     the baseline's joint vocabulary, <asr>/<tts> tag prompts
The forward passes (cached, and the uncached reference) live in generate_cache.py, beam search in
this file's `_beam` loop.

Length limits: each output gets max(--max-len-min[m], ceil(--max-len-ratio[m] * input length)) tokens
when its modality differs from the input's, max(--max-len-min[m], input length) when it is the same, or
--max-new-tokens when given. Too long for the model: when the prompt (with its begin/end/tag tokens) plus
the outputs' limits do not fit a tower's max_seq_len, the outputs' limits are cut to fit, last output
first, with a warning; an input that leaves no room for even one output token is a ZipperError.
Positions counted: every token fed to a tower (prompt, each output's tokens, end and begin tokens), but
not the very last token generated, which is never fed back (a tower of max_seq_len 24 continues
bos + 8 pieces by 16 tokens).

Batches are right-padded and ragged (every row has its own positions); rows finish independently.
Greedy and beam search are deterministic; sampling draws each example's tokens from its own generator
seeded by (--seed, the example's index in the call), so its output does not depend on the batch. With one
beam, beam search returns exactly the greedy output. The logits of every choice (return_logits) are the
model's raw logits, before the modality mask, for greedy and sampling.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from zipper_cli import generate_cache as gc
from zipper_cli.errors import ZipperError
from zipper_cli.models.single_decoder import SingleDecoderVocab
from zipper_cli.models.tower import Tower
from zipper_cli.models.zipper import Zipper
from zipper_cli.vocab import SPEECH_OFFSET, specials

MODALITIES = ("text", "speech")
STRATEGIES = ("greedy", "sample", "beam")


def parse_modality_map(spec: str, flag: str, cast=float) -> dict[str, float]:
    """'text=0.5,speech=12' -> {'text': 0.5, 'speech': 12.0}; a ZipperError naming `flag` otherwise."""
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in MODALITIES:
            raise ZipperError(f"{flag} must look like text=X,speech=Y (got {spec!r})")
        try:
            out[key.strip()] = cast(value)
        except ValueError:
            raise ZipperError(f"{flag}: {value!r} is not a number (in {spec!r})") from None
    return out


@dataclass
class GenerationConfig:
    strategy: str = "greedy"
    """--strategy: greedy (argmax), sample (temperature / top-k / top-p) or beam (--beam beams)."""
    beam: int = 4
    """--beam: number of beams when strategy is beam; 1 gives exactly greedy."""
    length_penalty: float = 0.6
    """--length-penalty: alpha in GNMT's ((5 + len) / 6) ** alpha; beams are ranked by log-prob / that.
    0 ranks by total log-probability (favours short outputs)."""
    temperature: float = 1.0
    """--temperature: sampling divides the logits by this."""
    top_k: int = 0
    """--top-k: sample among the k most likely tokens only; 0 = all."""
    top_p: float = 1.0
    """--top-p: sample within the smallest set of tokens whose probability reaches p (nucleus); 1 = all."""
    seed: int = 0
    """--seed: sampling seed. Example i of a call draws from its own generator seeded by (seed, i), so its
    sample does not depend on which examples share its batch."""
    max_len_ratio: dict = field(default_factory=lambda: {"text": 0.5, "speech": 10.0})
    """--max-len-ratio: per output modality, maximum tokens per input token when the input is the other
    modality. Demo corpus: ~56 units (25 Hz) per ~12 text pieces, i.e. ~0.21 pieces per unit and
    ~4.7 units per piece; the defaults leave about 2x headroom."""
    max_len_min: dict = field(default_factory=lambda: {"text": 10, "speech": 50})
    """--max-len-min: per output modality, a floor on its maximum length (short inputs)."""
    max_new_tokens: Optional[int] = None
    """--max-new-tokens: if given, the maximum length of every output, instead of the ratios."""
    min_new_tokens: int = 0
    """--min-new-tokens: an output's end token is forbidden until it has this many tokens (benchmarks)."""
    batch_size: int = 16
    """--batch-size: examples decoded together (beam search runs batch_size * beam rows)."""
    use_cache: bool = True
    """--no-cache turns this off: recompute the whole forward pass at every step (reference path)."""

    def validate(self) -> "GenerationConfig":
        if self.strategy not in STRATEGIES:
            raise ZipperError(f"--strategy must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        if not _pos_int(self.beam):
            raise ZipperError(f"--beam ({self.beam!r}) must be a positive integer")
        if not math.isfinite(self.length_penalty):
            raise ZipperError(f"--length-penalty ({self.length_penalty!r}) must be a finite number")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ZipperError(f"--temperature ({self.temperature!r}) must be > 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ZipperError(f"--top-k ({self.top_k!r}) must be a non-negative integer")
        if not 0 < self.top_p <= 1:
            raise ZipperError(f"--top-p ({self.top_p!r}) must be in (0, 1]")
        if not isinstance(self.seed, int):
            raise ZipperError(f"--seed ({self.seed!r}) must be an integer")
        for flag, d, ok in (("--max-len-ratio", self.max_len_ratio, lambda v: v > 0 and math.isfinite(v)),
                            ("--max-len-min", self.max_len_min, _pos_int)):
            for k, v in d.items():
                if k not in MODALITIES or not ok(v):
                    raise ZipperError(f"{flag}: bad entry {k}={v!r} (modalities: text, speech; values > 0)")
        if self.max_new_tokens is not None and not _pos_int(self.max_new_tokens):
            raise ZipperError(f"--max-new-tokens ({self.max_new_tokens!r}) must be a positive integer")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ZipperError(f"--min-new-tokens ({self.min_new_tokens!r}) must be a non-negative integer")
        if not _pos_int(self.batch_size):
            raise ZipperError(f"--batch-size ({self.batch_size!r}) must be a positive integer")
        return self

    def max_len(self, modality: str, input_modality: str, input_len: int) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        ratio = self.max_len_ratio.get(modality, 1.0) if modality != input_modality else 1.0
        return max(self.max_len_min.get(modality, 1), math.ceil(ratio * input_len))


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass
class Generation:
    outputs: list[str]
    """The output modalities, in order."""
    tokens: list[np.ndarray]
    """Per output, the raw generated tokens: text pieces without bos/eos, speech units 0..K-1."""
    ended: list[bool]
    """Per output, True if it stopped at its end token, False if it hit its maximum length."""
    max_len: list[int]
    """Per output, the maximum length it was allowed."""
    logprob: float
    """Sum of the log-probabilities of the chosen tokens (end tokens included, forced tokens excluded)
    under the model's distribution restricted to the output modality, temperature 1."""
    score: float
    """logprob / ((5 + n) / 6) ** length_penalty for beam search (n chosen tokens); logprob otherwise."""
    logits: Optional[list[torch.Tensor]] = None
    """With return_logits: the raw model logits [V] before each chosen token (greedy / sample only)."""

    def __getitem__(self, modality: str) -> np.ndarray:
        """The tokens of the (first) output in `modality`."""
        return self.tokens[self.outputs.index(modality)]


# --- plan and per-row state ----------------------------------------------------------------------------


@dataclass
class _Plan:
    segs: list[str]  # modality of each segment of the linear sequence
    first: int  # index of the first output segment (0: it continues the input segment)
    tower: list[str]  # engine tower of each segment
    later: list[frozenset]  # towers of the segments after each one (who may attend to its tokens)

    @property
    def last(self) -> int:
        return len(self.segs) - 1


class _Row:
    __slots__ = ("idx", "k", "count", "out", "ended", "pending", "done", "logprob", "nfree", "limits", "logits",
                 "cut")

    def __init__(self, idx: int, k: int, n_segs: int, limits: list[int], pending: list):
        self.idx, self.k, self.count, self.limits, self.pending = idx, k, 0, limits, pending
        self.out = [[] for _ in range(n_segs)]
        self.ended = [False] * n_segs
        self.done, self.logprob, self.nfree, self.logits, self.cut = False, 0.0, 0, [], False

    def clone(self) -> "_Row":
        r = _Row.__new__(_Row)
        r.idx, r.k, r.count, r.limits, r.done, r.logprob, r.nfree, r.cut = (
            self.idx, self.k, self.count, self.limits, self.done, self.logprob, self.nfree, self.cut)
        r.out, r.ended, r.pending, r.logits = [list(o) for o in self.out], list(self.ended), list(self.pending), []
        return r


# --- adapters ------------------------------------------------------------------------------------------


class _Generator:
    """Shared driver; subclasses define the model's vocabulary layout and its engines."""

    modalities: tuple[str, ...] = MODALITIES

    # Vocabulary layout, in model ids (defaults: a tower's own vocabulary, vocab.py); overridden per model.
    def tower_of(self, m: str) -> str:
        """The engine tower that holds modality m."""
        return "main"

    def ids(self, m: str, raw: np.ndarray) -> list[int]:
        return (raw + (SPEECH_OFFSET if m == "speech" else 0)).tolist()

    def raw(self, m: str, ids: list[int]) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64) - (SPEECH_OFFSET if m == "speech" else 0)

    def begin_end(self, m: str) -> tuple[int, int]:
        return specials(m)[1:]

    def prefix(self, input_modality: str, first_output: str) -> list[int]:
        """Tokens before the input segment (the single decoder's task tag)."""
        return []

    def raw_size(self, m: str) -> int:
        """Number of raw tokens of modality m (text pieces, or speech units)."""
        raise NotImplementedError

    def max_seq_len(self, tower: str) -> int:
        raise NotImplementedError

    def vocab_size(self, tower: str) -> int:
        raise NotImplementedError

    def engine(self, use_cache: bool):
        """A generate_cache engine: cached, or the uncached reference."""
        raise NotImplementedError

    @property
    def _weights(self) -> dict:
        """The cached engines' decode-time weight layouts, kept for this generator's lifetime (on CPU a
        transposed copy of the weights; rebuilt when a parameter changes)."""
        if "_weights_store" not in self.__dict__:
            self._weights_store = {}
        return self._weights_store

    def allowed(self, m: str) -> torch.Tensor:
        """bool [V_tower]: ids modality m may emit (its content ids and its end id)."""
        V = self.vocab_size(self.tower_of(m))
        mask = torch.zeros(V, dtype=torch.bool)
        mask[self.ids(m, np.arange(self.raw_size(m)))] = True
        begin, end = self.begin_end(m)
        mask[end], mask[begin] = True, False
        if m == "text":  # text ids are the raw pieces: pad, bos (and eos, re-allowed) are among them
            mask[specials("text")[0]] = False
        return mask

    def generate(self, inputs: Sequence[Sequence[int]], input_modality: str, outputs: Sequence[str],
                 cfg: Optional[GenerationConfig] = None, return_logits: bool = False) -> list[Generation]:
        """Generate `outputs` (modalities, in order) after each input (raw tokens of input_modality)."""
        cfg = (cfg or GenerationConfig()).validate()
        plan = self._plan(input_modality, list(outputs))
        dev = next(self.model.parameters()).device
        self._masks = {m: self.allowed(m).to(dev) for m in set(plan.segs)}
        rows = [self._row(i, np.asarray(x, dtype=np.int64).reshape(-1), plan, input_modality, cfg)
                for i, x in enumerate(inputs)]
        if any(r.cut for r in rows):
            warnings.warn(f"generate: {sum(r.cut for r in rows)} example(s) too long for the model: their "
                          "maximum output lengths were cut to fit max_seq_len", stacklevel=2)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].pending))  # similar lengths batch together
        results: list[Optional[Generation]] = [None] * len(rows)
        was_training = self.model.training
        self.model.eval()
        engine = self.engine(cfg.use_cache)
        try:
            for s in range(0, len(order), cfg.batch_size):
                batch = [rows[i] for i in order[s:s + cfg.batch_size]]
                if cfg.strategy == "beam":
                    done = _beam(self, plan, engine, batch, cfg)
                else:
                    done = _sample_loop(self, plan, engine, batch, cfg, return_logits)
                for r in done:
                    results[r.idx] = self._result(plan, r, cfg)
        finally:
            engine.close()
            self.model.train(was_training)
        return results

    def _plan(self, input_modality: str, outputs: list[str]) -> _Plan:
        for m in [input_modality, *outputs]:
            if m not in self.modalities:
                raise ZipperError(f"unknown modality '{m}' for this model (valid: {', '.join(self.modalities)})")
        if not outputs:
            raise ZipperError("give at least one output modality")
        if any(a == b for a, b in zip(outputs, outputs[1:])):
            raise ZipperError(f"output modalities {outputs}: consecutive outputs must differ")
        segs = outputs if outputs[0] == input_modality else [input_modality, *outputs]
        towers = [self.tower_of(m) for m in segs]
        later = [frozenset(towers[k + 1:]) for k in range(len(segs))]
        return _Plan(segs, 0 if outputs[0] == input_modality else 1, towers, later)

    def _row(self, idx: int, x: np.ndarray, plan: _Plan, in_m: str, cfg: GenerationConfig) -> _Row:
        if x.size and (x.min() < 0 or x.max() >= self.raw_size(in_m)):
            raise ZipperError(f"input {idx}: {in_m} token out of range 0..{self.raw_size(in_m) - 1}")
        b_in, e_in = self.begin_end(in_m)
        seq = [*self.prefix(in_m, plan.segs[plan.first]), b_in, *self.ids(in_m, x)]
        pending = [(0, t) for t in seq]
        if plan.first == 1:
            pending += [(0, e_in), (1, self.begin_end(plan.segs[1])[0])]
        limits = [0] * len(plan.segs)
        for k in range(plan.first, len(plan.segs)):
            limits[k] = cfg.max_len(plan.segs[k], in_m, x.size)
        # Positions each tower needs (see fed()); cut the limits, last output first, if they don't fit.
        cut = False
        for n in sorted(set(plan.tower)):
            excess = self._fed(plan, pending, limits)[n] - self.max_seq_len(n)
            for k in reversed(range(plan.first, len(plan.segs))):
                if excess > 0 and plan.tower[k] == n and limits[k] > 1:
                    take = min(excess, limits[k] - 1)
                    limits[k] -= take
                    excess -= take
                    cut = True
            if excess > 0:
                raise ZipperError(f"input {idx}: {x.size} {in_m} tokens leave no room to generate within the "
                                  f"{n} tower's max_seq_len {self.max_seq_len(n)} (drop or split such inputs)")
        row = _Row(idx, plan.first, len(plan.segs), limits, pending)
        row.cut = cut
        return row

    def _fed(self, plan: _Plan, pending: list, limits: list[int]) -> dict[str, int]:
        """Tokens each tower is fed at most: the prompt, then per output its begin token (not the first
        output's, already in the prompt), its tokens and its end token, except that the last output's
        final token (end or max-length) is never fed."""
        fed = dict.fromkeys(plan.tower, 0)
        for s, _ in pending:
            fed[plan.tower[s]] += 1
        for k in range(plan.first, len(plan.segs)):
            fed[plan.tower[k]] += limits[k] + (k > plan.first) + (1 if k < plan.last else -1)
        return fed

    def _result(self, plan: _Plan, r: _Row, cfg: GenerationConfig) -> Generation:
        ks = range(plan.first, len(plan.segs))
        score = r.logprob / _length_penalty(r.nfree, cfg.length_penalty) if cfg.strategy == "beam" else r.logprob
        return Generation(
            outputs=[plan.segs[k] for k in ks], tokens=[self.raw(plan.segs[k], r.out[k]) for k in ks],
            ended=[r.ended[k] for k in ks], max_len=[r.limits[k] for k in ks], logprob=r.logprob, score=score,
            logits=r.logits if r.logits else None)


class TowerGenerator(_Generator):
    """A pretrained tower alone: continuation of a prompt in its own modality."""

    def __init__(self, tower: Tower, modality: str):
        if modality not in MODALITIES:
            raise ZipperError(f"unknown modality '{modality}' (valid: {', '.join(MODALITIES)})")
        self.model, self.modalities = tower, (modality,)
        self._raw = tower.cfg.vocab_size - (SPEECH_OFFSET if modality == "speech" else 0)

    def generate(self, inputs, input_modality=None, outputs=None, cfg=None, return_logits=False):
        m = self.modalities[0]
        return super().generate(inputs, input_modality or m, outputs or [m], cfg, return_logits)

    def raw_size(self, m):
        return self._raw

    def max_seq_len(self, tower):
        return self.model.cfg.max_seq_len

    def vocab_size(self, tower):
        return self.model.cfg.vocab_size

    def engine(self, use_cache):
        return gc.TowerCache(self.model, weights=self._weights) if use_cache else gc.TowerFull(self.model)


class ZipperGenerator(_Generator):
    """The fused model. Outputs [m] from input m (continuation) use tower m alone: unimodal use bypasses
    the fusion modules, as everywhere else in the toolkit."""

    def __init__(self, model: Zipper):
        self.model = model
        self.modalities = tuple(n for n in model.cfg.towers if n in MODALITIES)

    def generate(self, inputs, input_modality, outputs, cfg=None, return_logits=False):
        if list(outputs) == [input_modality] and input_modality in self.modalities:
            key = f"tower:{input_modality}"
            if key not in self._weights:  # keeps the TowerGenerator (and its weight layouts) for reuse
                self._weights[key] = TowerGenerator(self.model.towers[input_modality], input_modality)
            return self._weights[key].generate(inputs, input_modality, outputs, cfg, return_logits)
        return super().generate(inputs, input_modality, outputs, cfg, return_logits)

    def tower_of(self, m):
        return m

    def raw_size(self, m):
        return self.model.towers[m].cfg.vocab_size - (SPEECH_OFFSET if m == "speech" else 0)

    def max_seq_len(self, tower):
        return self.model.towers[tower].cfg.max_seq_len

    def vocab_size(self, tower):
        return self.model.towers[tower].cfg.vocab_size

    def engine(self, use_cache):
        return gc.ZipperCache(self.model, weights=self._weights) if use_cache else gc.ZipperFull(self.model)


class SingleDecoderGenerator(_Generator):
    """The single-decoder baseline: one tower over the joint vocabulary; prompts [<asr>] [boa] units [eoa]
    and [<tts>] [bos] text [eos] as in single_decoder.py (no tag for a continuation)."""

    def __init__(self, model: Tower, vocab: SingleDecoderVocab):
        if model.cfg.vocab_size != vocab.size:
            raise ZipperError(f"single decoder: model vocabulary {model.cfg.vocab_size} != joint vocabulary "
                              f"{vocab.size}")
        self.model, self.vocab = model, vocab

    def ids(self, m, raw):
        return (raw + (self.vocab.text_size + SPEECH_OFFSET if m == "speech" else 0)).tolist()

    def raw(self, m, ids):
        return np.asarray(ids, dtype=np.int64) - (self.vocab.text_size + SPEECH_OFFSET if m == "speech" else 0)

    def begin_end(self, m):
        b, e = specials(m)[1:]
        return (b, e) if m == "text" else (b + self.vocab.text_size, e + self.vocab.text_size)

    def prefix(self, input_modality, first_output):
        if input_modality == first_output:
            return []
        return [self.vocab.asr_tag if first_output == "text" else self.vocab.tts_tag]

    def raw_size(self, m):
        return self.vocab.text_size if m == "text" else self.vocab.speech_size - SPEECH_OFFSET

    def max_seq_len(self, tower):
        return self.model.cfg.max_seq_len

    def vocab_size(self, tower):
        return self.model.cfg.vocab_size

    def engine(self, use_cache):
        return gc.TowerCache(self.model, weights=self._weights) if use_cache else gc.TowerFull(self.model)


# --- search loops --------------------------------------------------------------------------------------


def _length_penalty(n: int, alpha: float) -> float:
    return ((5 + n) / 6) ** alpha


def _apply(plan: _Plan, gen: _Generator, r: _Row, tok: int, lp: float) -> None:
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


def _masked(gen: _Generator, plan: _Plan, rows: list[_Row], logits: torch.Tensor, cfg) -> torch.Tensor:
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


def _groups(plan: _Plan, rows: list[_Row], last: list) -> dict[str, list[int]]:
    """Rows that choose a token now (fed their last pending token), grouped by current modality."""
    g: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if not r.done and not r.pending:
            assert last[i] == plan.tower[r.k], "the logits must come from the current output's tower"
            g.setdefault(plan.segs[r.k], []).append(i)
    return g


def _feed(engine, plan: _Plan, rows: list[_Row], prefill: bool):
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


def _cache_len(gen: _Generator, plan: _Plan, rows: list[_Row]) -> dict[str, int]:
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


def _uniforms(rows: list[_Row], cfg: GenerationConfig) -> torch.Tensor:
    """[R, n]: each row's own stream of uniforms, seeded by (seed, example index)."""
    n = max(sum(r.limits) + len(r.limits) + 1 for r in rows)
    out = torch.empty(len(rows), n)
    for i, r in enumerate(rows):
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + r.idx) % (1 << 63))
        out[i] = torch.rand(n, generator=g)
    return out


def _sample_loop(gen, plan, engine, rows, cfg, return_logits) -> list[_Row]:
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
        if all(r.done for r in rows):
            return rows


def _beam(gen, plan, engine, rows, cfg) -> list[_Row]:
    """Beam search, batch_size examples x cfg.beam beams. Per step: every live beam's candidates (its
    log-probs over its modality, or its single forced token at log-prob 0) are scored, the top 2N per
    example are scanned in order: a candidate that ends the hypothesis (end of the last output, or its
    maximum length) joins the finished list if within the top N, the others fill the N beams. An example
    is done when it has N finished hypotheses and no live beam's normalised score beats the worst of
    them (HF's rule), or no live beam is left. With N = 1 this is greedy, token for token."""
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
    finished: list[list[tuple[float, _Row]]] = [[] for _ in range(B)]
    ex_done = [False] * B
    V = max(gen.vocab_size(n) for n in set(plan.tower))
    while True:
        cand = torch.full((B * N, V), float("-inf"))
        for m, idx in _groups(plan, beams, last).items():
            group = [beams[i] for i in idx]
            lp = _masked(gen, plan, group, logits[gen.tower_of(m)][idx], cfg).log_softmax(-1).cpu()
            cand[idx, :lp.shape[1]] = lp
        for i, r in enumerate(beams):
            if not r.done and r.pending:  # forced token: one candidate, log-prob 0
                cand[i, 0] = 0.0
        total = (scores[:, None] + cand).view(B, N * V)
        top_s, top_i = total.topk(2 * N, dim=-1)
        src, new_beams, new_scores = [], [], []
        for b in range(B):
            keep = []
            if not ex_done[b]:
                for rank, (s, c) in enumerate(zip(top_s[b].tolist(), top_i[b].tolist())):
                    if s == float("-inf") or len(keep) == N:
                        break
                    i, tok = b * N + c // V, c % V
                    r = beams[i].clone()
                    if not r.pending:
                        _apply(plan, gen, r, tok, cand[i, tok].item())
                    if r.done:
                        if rank < N:
                            finished[b].append((s / _length_penalty(r.nfree, cfg.length_penalty), r))
                        continue
                    keep.append((i, r, s))
                live = [s / _length_penalty(r.nfree, cfg.length_penalty) for _, r, s in keep]
                fin = sorted((f for f, _ in finished[b]), reverse=True)[:N]
                if not keep or (len(fin) >= N and max(live) <= fin[-1]):
                    ex_done[b], keep = True, []
            for i, r, s in keep:
                src.append(i), new_beams.append(r), new_scores.append(s)
            for _ in range(N - len(keep)):  # dead beams: a copy of any row, never fed
                d = beams[b * N].clone()
                d.done = True
                src.append(b * N), new_beams.append(d), new_scores.append(float("-inf"))
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
