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
The forward passes (cached, and the uncached reference) live in generate_cache.py (the tower step in
generate_step.py), the greedy / sampling / beam-search loops in generate_search.py, GenerationConfig and
Generation in generate_config.py (importable from here).

Length limits: each output gets max(--max-len-min[m], ceil(--max-len-ratio[m] * input length)) tokens
when its modality differs from the input's, max(--max-len-min[m], input length) when it is the same, or
--max-new-tokens when given. Speech lengths in the two flags count 25 Hz units, scaled to the tokenizer's
unit rate (GenerationConfig.unit_rate), so they mean the same duration at any rate. Too long for the
model: when the prompt (with its begin/end/tag tokens) plus the outputs' limits do not fit a tower's
max_seq_len, the outputs' limits are cut to fit, last output first, with a warning; an input that leaves
no room for even one output token is a ZipperError.
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

import abc
import copy
import dataclasses
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zipper_cli import generate_cache as gc
from zipper_cli.ctc_prefix import CTCPrefixScorer
from zipper_cli.errors import ZipperError
from zipper_cli.fusion_data import ASR, Example, tower_batch
from zipper_cli.generate_config import MODALITIES, STRATEGIES, Generation, GenerationConfig, parse_modality_map
from zipper_cli.generate_guidance import GuidedEngine
from zipper_cli.generate_search import Plan, Row, beam_search, length_penalty, sample_loop
from zipper_cli.models.single_decoder import SingleDecoderVocab
from zipper_cli.models.tower import Tower
from zipper_cli.models.zipper import Zipper
from zipper_cli.vocab import SPEECH_OFFSET, specials

__all__ = ["MODALITIES", "STRATEGIES", "Generation", "GenerationConfig", "parse_modality_map", "Generator",
           "TowerGenerator", "ZipperGenerator", "SingleDecoderGenerator"]


# --- adapters ------------------------------------------------------------------------------------------


class Generator(abc.ABC):
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

    @abc.abstractmethod
    def raw_size(self, m: str) -> int:
        """Number of raw tokens of modality m (text pieces, or speech units)."""

    @abc.abstractmethod
    def max_seq_len(self, tower: str) -> int:
        """The longest sequence engine tower `tower` takes."""

    @abc.abstractmethod
    def vocab_size(self, tower: str) -> int:
        """The vocabulary size of engine tower `tower`."""

    @abc.abstractmethod
    def engine(self, use_cache: bool):
        """A generate_cache engine: cached, or the uncached reference."""

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
        if cfg.best_of > 1:
            return self._best_of(inputs, input_modality, list(outputs), cfg, return_logits)
        plan = self._plan(input_modality, list(outputs))
        dev = next(self.model.parameters()).device
        self._masks = {m: self.allowed(m).to(dev) for m in set(plan.segs)}
        rows = [self._row(i, np.asarray(x, dtype=np.int64).reshape(-1), plan, input_modality, cfg)
                for i, x in enumerate(inputs)]
        if any(r.cut for r in rows):
            warnings.warn(f"generate: {sum(r.cut for r in rows)} example(s) too long for the model: their "
                          "maximum output lengths were cut to fit max_seq_len", stacklevel=2)
        ctc = cfg.ctc_weight > 0
        if ctc and (input_modality != "speech" or plan.segs[plan.first] != "text"):
            raise ZipperError(f"--ctc-weight scores text transcribed from speech (ASR): it needs speech in and "
                              f"text as the first output, not {input_modality} -> {','.join(outputs)}")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].pending))  # similar lengths batch together
        results: list[Optional[Generation]] = [None] * len(rows)
        was_training = self.model.training
        self.model.eval()
        engine = self.engine(cfg.use_cache)
        if cfg.guidance > 0:
            if "speech" not in outputs:
                raise ZipperError("--guidance steers speech outputs (TTS): it needs speech among --outputs")
            engine = GuidedEngine(engine, self.unconditional_engine(cfg.use_cache), self.tower_of("speech"),
                                  cfg.guidance)
        try:
            for s in range(0, len(order), cfg.batch_size):
                batch = [rows[i] for i in order[s:s + cfg.batch_size]]
                scorer = self.ctc_scorer([inputs[r.idx] for r in batch]) if ctc else None
                for j, r in enumerate(batch):
                    r.ctc = scorer.initial(j) if scorer is not None else None
                if cfg.strategy == "beam":
                    done = beam_search(self, plan, engine, batch, cfg, scorer)
                else:
                    done = sample_loop(self, plan, engine, batch, cfg, return_logits, scorer)
                for r in done:
                    results[r.idx] = self._result(plan, r, cfg)
        finally:
            engine.close()
            self.model.train(was_training)
        return results

    def _best_of(self, inputs, input_modality: str, outputs: list[str], cfg: GenerationConfig,
                 return_logits: bool) -> list[Generation]:
        """--best-of N: every input sampled N times (copy j of input i is example i * N + j, so each copy has
        its own sampling stream), each input's copy with the highest ctc_text_scores kept. As with beam
        search, batch_size counts inputs: a batch runs batch_size * N rows (the demo's 200 sentences, best of
        16, took 152.7 s at 256 rows against 261.5 s at 16 on two CPU cores)."""
        if input_modality != "text" or outputs != ["speech"]:
            raise ZipperError(f"--best-of reads sampled speech back as the input text: it needs text in and "
                              f"--outputs speech, not {input_modality} -> {','.join(outputs)}")
        N = cfg.best_of
        copies = [x for x in inputs for _ in range(N)]
        cands = self.generate(copies, input_modality, outputs,
                              dataclasses.replace(cfg, best_of=1, batch_size=cfg.batch_size * N), return_logits)
        scores = self.ctc_text_scores([c.tokens[0] for c in cands], copies)
        best = [max(range(i * N, i * N + N), key=lambda k: scores[k]) for i in range(len(inputs))]
        return [cands[k] for k in best]

    def ctc_text_scores(self, units: Sequence[np.ndarray], texts: Sequence[Sequence[int]]) -> list[float]:
        """log p_ctc(text pieces | speech units) under the CTC head, for --best-of."""
        raise ZipperError("--best-of needs a Zipper fused with --ctc-weight (its CTC head reads the speech); "
                          "this model has none")

    def unconditional_engine(self, use_cache: bool):
        """The engine of the speech tower alone, for --guidance."""
        raise ZipperError("--guidance needs a Zipper (its speech tower alone is the unconditional model); "
                          "this model is not one")

    def ctc_scorer(self, inputs: Sequence[Sequence[int]]) -> CTCPrefixScorer:
        """CTC posteriors of speech inputs (raw units), for --ctc-weight."""
        raise ZipperError("--ctc-weight needs a Zipper fused with --ctc-weight > 0 (a CTC head on its speech "
                          "tower); this model has none")

    def _plan(self, input_modality: str, outputs: list[str]) -> Plan:
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
        return Plan(segs, 0 if outputs[0] == input_modality else 1, towers, later)

    def _row(self, idx: int, x: np.ndarray, plan: Plan, in_m: str, cfg: GenerationConfig) -> Row:
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
        row = Row(idx, plan.first, len(plan.segs), limits, pending)
        row.cut = cut
        return row

    def _fed(self, plan: Plan, pending: list, limits: list[int]) -> dict[str, int]:
        """Tokens each tower is fed at most: the prompt, then per output its begin token (not the first
        output's, already in the prompt), its tokens and its end token, except that the last output's
        final token (end or max-length) is never fed."""
        fed = dict.fromkeys(plan.tower, 0)
        for s, _ in pending:
            fed[plan.tower[s]] += 1
        for k in range(plan.first, len(plan.segs)):
            fed[plan.tower[k]] += limits[k] + (k > plan.first) + (1 if k < plan.last else -1)
        return fed

    def _result(self, plan: Plan, r: Row, cfg: GenerationConfig) -> Generation:
        ks = range(plan.first, len(plan.segs))
        score = r.logprob / length_penalty(r.nfree, cfg.length_penalty) if cfg.strategy == "beam" else r.logprob
        return Generation(
            outputs=[plan.segs[k] for k in ks], tokens=[self.raw(plan.segs[k], r.out[k]) for k in ks],
            ended=[r.ended[k] for k in ks], max_len=[r.limits[k] for k in ks], logprob=r.logprob, score=score,
            logits=r.logits if r.logits else None)


class OneTowerGenerator(Generator):
    """A model that is one Tower (self.model): a tower alone, or the single decoder."""

    model: Tower

    def max_seq_len(self, tower):
        return self.model.cfg.max_seq_len

    def vocab_size(self, tower):
        return self.model.cfg.vocab_size

    def engine(self, use_cache):
        return gc.TowerCache(self.model, weights=self._weights) if use_cache else gc.TowerFull(self.model)


class TowerGenerator(OneTowerGenerator):
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


class ZipperGenerator(Generator):
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

    def ctc_scorer(self, inputs):
        """The CTC head's log-probs over each input's speech positions ([begin] units [end]), read exactly
        as in training: the example [speech][text] with no text yet (speech comes first, so its states do
        not depend on the text)."""
        if self.model.ctc_head is None:
            return super().ctc_scorer(inputs)
        return CTCPrefixScorer(self._ctc_log_probs(inputs))

    def _ctc_log_probs(self, inputs) -> list[torch.Tensor]:
        """Per speech input (raw units): the CTC head's log-probs [T, V_text] over [begin] units [end]."""
        dev = next(self.model.parameters()).device
        empty = np.zeros(0, dtype=np.int64)
        examples = [Example(ASR, empty, np.asarray(x, dtype=np.int64), str(i)) for i, x in enumerate(inputs)]
        batch = {m: tuple(t.to(dev) for t in tower_batch(examples, m)[:3]) for m in ("text", "speech")}
        with torch.no_grad():
            logits = self.model(batch, with_ctc=True)["ctc"].float().log_softmax(-1).cpu()  # [B, T, V_text]
        lengths = batch["speech"][1].sum(1).tolist()
        return [logits[i, :n] for i, n in enumerate(lengths)]

    def ctc_text_scores(self, units, texts):
        if self.model.ctc_head is None:
            return super().ctc_text_scores(units, texts)
        log_probs = [lp for s in range(0, len(units), 64) for lp in self._ctc_log_probs(units[s:s + 64])]
        padded = torch.nn.utils.rnn.pad_sequence(log_probs)  # [T_max, B, V]; frames past a length are ignored
        targets = [torch.as_tensor(np.asarray(x, dtype=np.int64)) for x in texts]
        nll = F.ctc_loss(padded, torch.cat(targets), torch.tensor([len(lp) for lp in log_probs]),
                         torch.tensor([len(t) for t in targets]), blank=0, reduction="none")  # [B]
        return (-nll).tolist()

    def raw_size(self, m):
        return self.model.towers[m].cfg.vocab_size - (SPEECH_OFFSET if m == "speech" else 0)

    def max_seq_len(self, tower):
        return self.model.towers[tower].cfg.max_seq_len

    def vocab_size(self, tower):
        return self.model.towers[tower].cfg.vocab_size

    def engine(self, use_cache):
        return gc.ZipperCache(self.model, weights=self._weights) if use_cache else gc.ZipperFull(self.model)

    def unconditional_engine(self, use_cache):
        tower = copy.deepcopy(self.model.towers["speech"])  # a Tower holds its KV cache: a private copy
        return gc.TowerCache(tower, name="speech") if use_cache else gc.TowerFull(tower, name="speech")


class SingleDecoderGenerator(OneTowerGenerator):
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
