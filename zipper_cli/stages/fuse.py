"""`zipper fuse`: zip the pretrained text and speech towers with gated cross-attention (or train the
single-decoder baseline) on a nested subset of the aligned role, for ASR and TTS at once.

Writes fused/TAG/: config.json (architecture, tower configs, sources and checksums), model.pt (all
weights, tensors only), ckpt/, metrics.jsonl (train loss, dev loss per direction, gate values), loss.png,
gates.png, initial.json (dev losses at step 0). At step 0 and at the end it also scores the TTS dev loss
given another utterance's text: how much the model reads the text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_path, read_jsonl, sha256_file, write_json
from ..checkpoint import load_state
from ..console import log
from ..errors import ZipperError
from ..fusion_data import (ASR, LM, TASKS, TTS, make_examples, make_rehearsal, nested_subset, parse_task_mix,
                           with_other_text)
from ..fusion_losses import SingleDecoderLoss, ZipperLoss, to_single_decoder
from ..models.single_decoder import SingleDecoderVocab, build_single_decoder
from ..models.tower import Tower, TowerConfig
from ..models.zipper import Zipper, ZipperConfig
from ..plots import plot_metrics
from ..rundir import config_defaults, config_dict, require_stage
from ..shards import load_role
from ..devices import init_distributed
from ..trainer import TrainConfig, evaluate, resolve_device, train, training_stage
from .pretrain import load_tower, tower_dir

ARCHS = ("zipper", "single-decoder")


@dataclass(frozen=True)
class FuseConfig:
    """What `zipper fuse` trains and on which data."""

    arch: str = "zipper"
    """--arch: zipper (two towers + gated cross-attention) or single-decoder (the paper's baseline)."""
    tag: Optional[str] = None
    """--tag: name of the fused model under fused/ (default: the architecture, freeze and data size)."""
    freeze: str = "text"
    """--freeze: towers whose own parameters are not trained (zipper only): text, speech, text,speech
    (the paper's frozen-speech-tower runs: only the fusion modules train) or none."""
    aligned_fraction: Optional[float] = None
    """--aligned-fraction: use this fraction of the aligned role (nested subsets; default all)."""
    aligned_count: Optional[int] = None
    """--aligned-count: or this many aligned utterances."""
    subset_seed: int = 0
    """--subset-seed: seed of the aligned subsets' fixed ranking."""
    task_mix: str = "1:1.26"
    """--task-mix: ASR:TTS examples (the paper's LibriSpeech:LibriTTS mix is about 1:1.26)."""
    n_cross: Optional[int] = None
    """--n-cross: cross-attention points per tower (default 4, or the shallower tower's depth if less)."""
    input_proj: str = "text,speech"
    """--input-proj: towers whose embeddings pass ReLU(MLP(.)) in fused use, comma list or 'none'."""
    proj_layers: int = 3
    """--proj-layers: depth of the ReLU MLPs (width projection g, input projections)."""
    dropout: float = 0.0
    """--dropout: dropout in the fusion blocks (zipper), or in every layer of the single decoder (the
    paper's baseline uses 0.1)."""
    ctc_weight: float = 0.0
    """--ctc-weight: weight of an auxiliary CTC loss on ASR examples (zipper only; 0 = the paper's
    training). Adds a CTC head that reads the speech tower through the last text<-speech projection g."""
    ctc_tts_weight: float = 0.0
    """--ctc-tts-weight: weight of the same CTC loss on TTS examples (zipper only; 0 = off). There the speech
    positions come after the text, so the head can read the transcript through cross-attention: the loss
    asks each speech position to know which character it is saying, an alignment signal for TTS."""
    xattn_pos: str = "none"
    """--xattn-pos: auto (rotary positions inside cross-attention, speech positions scaled onto the text
    axis by the aligned data's mean length ratio), learned (the same axis, but each speech token's place
    comes from a learned clock that starts at that ratio: ZipperConfig.xattn_clock) or none (the paper's
    position-blind cross-attention)."""
    xattn_prior: float = 0.0
    """--xattn-prior: with --xattn-pos auto or learned, start cross-attention as a soft diagonal of this many logits."""
    gate_init: float = 0.0
    """--gate-init: 0 = closed tanh gates (the paper's); else open gates over zero-initialised branch outputs."""
    clock_weight: float = 0.0
    """--clock-weight: with --xattn-pos learned, weight of an auxiliary loss, per example, on the squared log
    ratio of where the speech clock ends to the transcript's length, so that the clock learns each
    utterance's speaking rate from the audio (0 = off: the clock learns from the cross-attention alone).
    On the demo, 1.0 cut the clock's length error from 0.22 to 0.17 but did not decode better (README)."""
    clock_align_weight: float = 0.0
    """--clock-align-weight: with --xattn-pos learned and --ctc-weight, weight of an auxiliary loss that
    teaches the learned clock where each speech token is in the transcript: on ASR examples (speech first,
    so the CTC head reads the audio alone) the model's own CTC head force-aligns the transcript pieces to
    the speech, and each speech token's place on the shared axis is pulled (Huber loss, summed over tokens)
    towards the text position of the piece it is saying. Examples whose transcript the head does not yet
    read (CTC loss above ALIGN_MAX_NATS per piece) are left out, so the loss starts once the head has
    learned. Not in the paper (cf. FastSpeech's durations from a teacher aligner); 0 = off."""
    rehearsal: float = 0.0
    """--rehearsal: also train the speech tower as the plain speech language model it was pretrained as,
    on the speech role (unlabeled audio), this many examples per TTS example (zipper with the speech tower
    trained; 0 = the paper's training). Rehearsal against forgetting: without it the tower drifts from
    its language model while it learns from the small aligned set (README)."""
    speech_input_noise: float = 0.0
    """--speech-input-noise: on TTS training examples, replace each teacher-forced input unit by a random unit
    with this probability (the targets stay true). The speech tower then cannot trust its own past as
    much as it can during pretraining and has to read the text, as in decoding, where the past is its own
    output (cf. Tacotron's always-on prenet dropout). Zipper only; 0 = the paper's training."""
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ZipperError(f"--arch must be one of {', '.join(ARCHS)} (got {self.arch!r})")
        self.frozen()
        if self.arch == "single-decoder" and self.freeze != "none":
            raise ZipperError("--arch single-decoder trains all parameters, as in the paper: use --freeze none")
        if self.tag is not None and (not self.tag or "/" in self.tag or self.tag.startswith(".")):
            raise ZipperError(f"--tag {self.tag!r}: use a plain name (letters, digits, - and _)")
        if not (math.isfinite(self.ctc_weight) and self.ctc_weight >= 0):
            raise ZipperError(f"--ctc-weight must be >= 0 (got {self.ctc_weight})")
        if self.ctc_weight > 0 and self.arch != "zipper":
            raise ZipperError("--ctc-weight is a Zipper option (the CTC head reads the speech tower)")
        if not (math.isfinite(self.ctc_tts_weight) and self.ctc_tts_weight >= 0):
            raise ZipperError(f"--ctc-tts-weight must be >= 0 (got {self.ctc_tts_weight})")
        if self.ctc_tts_weight > 0 and self.arch != "zipper":
            raise ZipperError("--ctc-tts-weight is a Zipper option (the CTC head reads the speech tower)")
        if self.xattn_pos not in ("auto", "learned", "none"):
            raise ZipperError(f"--xattn-pos must be auto, learned or none (got {self.xattn_pos!r})")
        if self.arch != "zipper" and (self.xattn_pos != "none" or self.xattn_prior):
            raise ZipperError("--xattn-pos and --xattn-prior are Zipper options (they shape its cross-attention)")
        if not (math.isfinite(self.clock_weight) and self.clock_weight >= 0):
            raise ZipperError(f"--clock-weight must be >= 0 (got {self.clock_weight})")
        if not (math.isfinite(self.clock_align_weight) and self.clock_align_weight >= 0):
            raise ZipperError(f"--clock-align-weight must be >= 0 (got {self.clock_align_weight})")
        if self.clock_align_weight and (self.xattn_pos != "learned" or not self.ctc_weight):
            raise ZipperError("--clock-align-weight needs --xattn-pos learned (the clock it trains) and --ctc-weight "
                              "(the CTC head that aligns)")
        if self.clock_weight and self.xattn_pos != "learned":
            raise ZipperError("--clock-weight needs --xattn-pos learned (it trains the learned clock)")
        if self.arch != "zipper" and self.gate_init:
            raise ZipperError("--gate-init is a Zipper option (the single decoder has no gates)")
        if self.arch != "zipper" and self.train.tower_lr_mult != 1.0:
            raise ZipperError("--tower-lr-mult is a Zipper option (the single decoder is one network: use --lr)")
        if not (math.isfinite(self.rehearsal) and self.rehearsal >= 0):
            raise ZipperError(f"--rehearsal must be >= 0 (got {self.rehearsal})")
        if self.rehearsal and (self.arch != "zipper" or "speech" in self.frozen()):
            raise ZipperError("--rehearsal trains the speech tower of a Zipper: it needs --arch zipper and a "
                              "--freeze that leaves the speech tower trained")
        if not (math.isfinite(self.speech_input_noise) and 0 <= self.speech_input_noise < 1):
            raise ZipperError(f"--speech-input-noise must be in [0, 1) (got {self.speech_input_noise})")
        if self.speech_input_noise and self.arch != "zipper":
            raise ZipperError("--speech-input-noise is a Zipper option (it corrupts the speech tower's input)")
        parse_task_mix(self.task_mix)
        self.train.validate()
        self.zipper_config(pos_scale={"text": 1.0, "speech": 1.0} if self.xattn_pos != "none" else None).validate()

    def frozen(self) -> list[str]:
        """The towers --freeze names, in tower order."""
        if self.freeze == "none":
            return []
        names = [x.strip() for x in self.freeze.split(",")]
        if any(n not in ("text", "speech") for n in names) or len(set(names)) != len(names):
            raise ZipperError(f"--freeze must be text, speech, text,speech or none (got {self.freeze!r})")
        return [n for n in ("text", "speech") if n in names]

    def zipper_config(self, max_cross: int = 4, pos_scale: Optional[dict[str, float]] = None) -> ZipperConfig:
        """The fusion config; without --n-cross, 4 cross-attention points (fewer for shallower towers).
        pos_scale: the towers' shared-axis scales when --xattn-pos is auto (measured on the data)."""
        proj = () if self.input_proj in ("none", "") else tuple(x.strip() for x in self.input_proj.split(","))
        return ZipperConfig(n_cross=self.n_cross or min(4, max_cross), input_proj=proj, proj_layers=self.proj_layers,
                            dropout=self.dropout, ctc_head=self.ctc_weight > 0 or self.ctc_tts_weight > 0,
                            xattn_pos=pos_scale,
                            xattn_clock=self.xattn_pos == "learned",
                            xattn_prior=self.xattn_prior, gate_init=self.gate_init)

    def resolved_tag(self) -> str:
        if self.tag:
            return self.tag
        size = (f"-n{self.aligned_count}" if self.aligned_count else
                f"-f{self.aligned_fraction:g}" if self.aligned_fraction is not None else "")
        arch = "zipper-freeze-" + ("-".join(self.frozen()) or "none") if self.arch == "zipper" else "single-decoder"
        return arch + size


def fused_dir(run_dir: Path, tag: str) -> Path:
    return Path(run_dir) / "fused" / tag


def load_fused(directory: Path, device: str = "cpu"):
    """Rebuild a fused model (Zipper or single decoder) from config.json + model.pt."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZipperError(f"{directory / 'config.json'}: cannot read the fused model config ({e})") from None
    try:
        towers = {n: TowerConfig.from_dict(c) for n, c in meta["towers"].items()}
        if meta["arch"] == "zipper":
            model = Zipper.from_configs(ZipperConfig.from_dict(meta["zipper"]), towers)
        else:
            model = Tower(towers["single"])
    except ZipperError as e:
        raise ZipperError(f"{directory / 'config.json'}: {e}") from None
    except (KeyError, TypeError) as e:
        raise ZipperError(f"{directory / 'config.json'}: not a fused model config (missing {e})") from None
    load_state(model, directory / "model.pt", directory / "config.json")
    return model.to(device).eval(), meta


def _aligned_utts(run_dir: Path, role: str, marker: dict) -> list[dict]:
    utts = load_role(run_dir, role, text_tok=marker["text_tokenizer"], speech_tok=marker["speech_tokenizer"])
    return [u for u in utts if u["text"] is not None and u["speech"] is not None]


def shared_axis(utts: list[dict]) -> dict[str, float]:
    """--xattn-pos auto: text positions as they are, speech positions times mean text length / mean speech
    length ([begin] ... [end] sequences), so an utterance spans about the same stretch in both towers."""
    text = sum(len(u["text"]) + 2 for u in utts)
    speech = sum(len(u["speech"]) + 2 for u in utts)
    return {"text": 1.0, "speech": round(text / speech, 6)}


def fuse(run_dir: Path, cfg: FuseConfig, force: bool = False) -> dict | None:
    cfg.validate()
    run_dir = Path(run_dir)
    d = init_distributed(resolve_device(cfg.train))
    tok = require_stage(run_dir, "tokenize", "zipper fuse")
    needed = ("text",) if cfg.arch == "single-decoder" else ("text", "speech")
    for t in needed:
        require_stage(run_dir, f"pretrain-{t}", "zipper fuse")
    tag = cfg.resolved_tag()
    name, out = f"fuse-{tag}", fused_dir(run_dir, tag)
    stage_cfg = config_dict(cfg)
    stage_cfg["train"].pop("device")
    inputs = {f"tower_{t}": sha256_file(tower_dir(run_dir, t) / "model.pt") for t in needed}
    inputs |= {"text_tokenizer": tok["text_tokenizer"], "speech_tokenizer": tok["speech_tokenizer"]}

    with training_stage(run_dir, name, stage_cfg, inputs, out, force, d, config_defaults(cfg)) as stage:
        if stage is None:
            return None
        return _fuse(run_dir, cfg, tag, out, tok, stage, d)


def _fuse(run_dir: Path, cfg: FuseConfig, tag: str, out: Path, tok: dict, stage, d) -> dict:
    aligned = _aligned_utts(run_dir, "aligned", tok)
    keep = set(nested_subset([u["id"] for u in aligned], cfg.subset_seed, cfg.aligned_fraction, cfg.aligned_count))
    n_pool = len(aligned)
    # Measured on the whole aligned pool: the same axis for every --aligned-fraction.
    pos_scale = shared_axis(aligned) if cfg.xattn_pos != "none" else None
    aligned = [u for u in aligned if u["id"] in keep]
    dev = _aligned_utts(run_dir, "dev", tok)
    mix = parse_task_mix(cfg.task_mix)
    train_ex = make_examples(aligned, mix, cfg.train.seed)
    dev_ex = {task: make_examples(dev, (1, 0) if task == ASR else (0, 1), 0) for task in (ASR, TTS)}
    # Scored at step 0 and at the end only: the TTS dev loss when the text is another utterance's.
    other_text = with_other_text(dev_ex[TTS])

    text_tower, _ = load_tower(tower_dir(run_dir, "text"))
    torch.manual_seed(cfg.train.seed)
    if cfg.arch == "zipper":
        speech_tower, _ = load_tower(tower_dir(run_dir, "speech"))
        # The speech tower alone on the dev speech (dev_lm_loss): how far it drifts from its LM.
        dev_ex[LM] = make_rehearsal(dev, len(dev), 0)
        if cfg.rehearsal:
            speech = [u for u in load_role(run_dir, "speech", speech_tok=tok["speech_tokenizer"]) if len(u["speech"])]
            if not speech:
                raise ZipperError(f"--rehearsal: the speech role of {run_dir} has no audio to rehearse on")
            n = round(cfg.rehearsal * sum(e.task == TTS for e in train_ex))
            train_ex += make_rehearsal(speech, n, cfg.train.seed, speech_tower.cfg.max_seq_len - 2)
        depth = min(text_tower.cfg.n_layer, speech_tower.cfg.n_layer)
        model = Zipper.from_towers(cfg.zipper_config(depth, pos_scale), {"text": text_tower, "speech": speech_tower})
        model.freeze(cfg.frozen())
        loss_fn = ZipperLoss(cfg.ctc_weight, cfg.clock_weight if cfg.xattn_pos == "learned" else 0.0,
                             cfg.ctc_tts_weight, cfg.clock_align_weight, cfg.speech_input_noise)
        meta = {"arch": "zipper", "zipper": model.cfg.to_dict(),
                "towers": {n: t.cfg.to_dict() for n, t in model.towers.items()}}
    else:
        sd_vocab = SingleDecoderVocab(text_tower.cfg.vocab_size, _speech_vocab(run_dir))
        model = build_single_decoder(text_tower, sd_vocab, seed=cfg.train.seed, dropout=cfg.dropout)
        loss_fn = SingleDecoderLoss()
        train_ex = to_single_decoder(train_ex, sd_vocab)
        dev_ex = {task: to_single_decoder(ex, sd_vocab) for task, ex in dev_ex.items()}
        other_text = to_single_decoder(other_text, sd_vocab)
        meta = {"arch": "single-decoder", "towers": {"single": model.cfg.to_dict()},
                "single_decoder_vocab": {"text_size": sd_vocab.text_size, "speech_size": sd_vocab.speech_size}}
    meta |= {"freeze": cfg.freeze, "tokenizers": {"text": tok["text_tokenizer"], "speech": tok["speech_tokenizer"]},
             "aligned_utterances": len(aligned), "aligned_total": n_pool,
             "aligned_fraction": round(len(aligned) / n_pool, 6), "tag": tag}
    n_total, n_train = model.num_params(), model.num_params(trainable_only=True)
    dev_loss_fn = ZipperLoss() if cfg.arch == "zipper" else loss_fn  # per-direction dev losses: cross-entropy only

    def per_direction(m) -> dict:
        row = {}
        for task, ex in dev_ex.items():
            if ex:
                row[f"dev_{task}_loss"] = round(evaluate(m, ex, dev_loss_fn, cfg.train, resolve_device(cfg.train), d), 6)
        if cfg.arch == "zipper":
            row |= gate_values(m)
        return row

    def text_reliance(m) -> dict:
        if not other_text:
            return {}
        return {"dev_tts_other_text_loss": round(evaluate(m, other_text, dev_loss_fn, cfg.train,
                                                          resolve_device(cfg.train), d), 6)}

    # Every process evaluates (evaluate() is a collective under torchrun); the main one writes. Before
    # train() the model is at step 0 even when resuming, so this is the step-0 row either way.
    model.to(resolve_device(cfg.train))
    initial = per_direction(model) | text_reliance(model)
    initial_path = out / "initial.json"
    if d.main and not initial_path.exists():
        write_json(initial_path, initial)
    if d.main:
        write_json(out / "config.json", meta)
        log(f"[{stage.name}] {cfg.arch}: {n_total / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; "
            f"{len(aligned)} aligned utterances -> {sum(e.task == ASR for e in train_ex)} ASR + "
            f"{sum(e.task == TTS for e in train_ex)} TTS examples"
            + (f" + {sum(e.task == LM for e in train_ex)} speech-LM (rehearsal)" if cfg.rehearsal else ""))
    scored: list[dict] = []  # per_direction rows as train() logs them; the last one scored the final step

    def logged(m) -> dict:
        scored.append(per_direction(m))
        return scored[-1]

    summary = train(out, model, train_ex, dev_ex[ASR] + dev_ex[TTS], [len(e) for e in train_ex], loss_fn, cfg.train,
                    log=log if d.main else (lambda *_: None), extra_metrics=logged,
                    groups=[TASKS.index(e.task) for e in train_ex])
    # train() always evaluates its last step, so only a run resumed after it needs scoring again (on every
    # process alike, as evaluate() is a collective).
    final = dict(scored[-1]) if scored else per_direction(model)
    final |= text_reliance(model)  # collective too: before the main-only part
    if not d.main:
        return summary
    with atomic_path(out / "model.pt") as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    rows = read_jsonl(out / "metrics.jsonl")
    plot_metrics(rows, out / "loss.png", f"{tag}", keys=("loss", "dev_asr_loss", "dev_tts_loss"))
    if cfg.arch == "zipper":
        plot_gates(rows, out / "gates.png", tag)
    summary |= {"params": n_total, "trainable_params": n_train, "aligned_utterances": len(aligned),
                "initial": initial, "final": final}
    for task in TASKS:
        key = f"dev_{task}_loss"
        if key in initial:
            log(f"[{stage.name}] dev {task.upper()} loss {initial[key]:.4f} at step 0 -> {final[key]:.4f}")
    key = "dev_tts_other_text_loss"
    if key in final:
        gain = final[key] - final["dev_tts_loss"]
        log(f"[{stage.name}] dev TTS loss given another utterance's text {initial[key]:.4f} at step 0 -> "
            f"{final[key]:.4f} (reading the true text is worth {gain:.4f} nats per unit)")
    stage.finish(outputs=summary)
    return summary


def _speech_vocab(run_dir: Path) -> int:
    from ..vocab import speech_vocab_size

    return speech_vocab_size(json.loads((Path(run_dir) / "tokens" / "aligned" / "index.json").read_text())["speech_vocab"])


def gate_values(model: Zipper) -> dict:
    """tanh of every gate: gate/<attending><-<attended>/<point>/{attn,ffw}."""
    out = {}
    for j, blocks in enumerate(model.fusion):
        for key, block in blocks.items():
            out[f"gate/{key}/{j}/attn"] = round(math.tanh(block.alpha.item()), 6)
            out[f"gate/{key}/{j}/ffw"] = round(math.tanh(block.beta.item()), 6)
    return out


def plot_gates(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k.startswith("gate/")})
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), label=k[5:], linestyle="-" if k.endswith("attn") else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("tanh(gate)")
    ax.set_title(f"{title}: gate values per cross-attention point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
