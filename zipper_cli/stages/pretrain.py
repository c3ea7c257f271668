"""`zipper pretrain --tower text|speech`: train one unimodal tower on its token shards.

Writes towers/{text,speech}/: config.json (tower config, modality, tokenizer checksum), model.pt
(final weights, tensors only), ckpt/ (resumable checkpoints), metrics.jsonl, loss.png.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path, read_jsonl, write_json
from ..batching import collate
from ..console import log
from ..errors import ZipperError
from ..models.tower import PRESETS, Tower, TowerConfig, tower_preset
from ..plots import plot_metrics
from ..rundir import config_defaults, config_dict, require_stage
from ..shards import load_role
from ..devices import Dist, init_distributed
from ..trainer import TrainConfig, resolve_device, train, training_stage
from ..vocab import specials, speech_vocab_size, split_long, text_vocab_size, to_sequence


@dataclass(frozen=True)
class PretrainConfig:
    """What `zipper pretrain` trains and how."""

    tower: str = "text"
    """--tower: text (trained on the text role) or speech (the speech role: audio without transcripts)."""
    size: str = "demo"
    """--size: tower preset: tiny (tests), demo (minutes on a laptop CPU), S (~100M), L (~1B)."""
    n_layer: Optional[int] = None
    """--n-layer: override the preset's depth."""
    n_embd: Optional[int] = None
    """--n-embd: override the preset's width."""
    n_head: Optional[int] = None
    """--n-head: override the preset's heads."""
    max_seq_len: Optional[int] = None
    """--max-seq-len: longer sequences are cut into windows."""
    dropout: float = 0.0
    """--dropout."""
    pool_aligned: bool = True
    """--pool-aligned/--no-pool-aligned: also train on the aligned role's text (or audio) alone."""
    train: TrainConfig = TrainConfig()

    def validate(self) -> None:
        if self.tower not in ("text", "speech"):
            raise ZipperError(f"--tower must be text or speech (got {self.tower!r})")
        if self.size not in PRESETS:
            raise ZipperError(f"--size must be one of {', '.join(PRESETS)} (got {self.size!r})")
        self.train.validate()

    def tower_config(self, vocab_size: int) -> TowerConfig:
        overrides = {k: v for k, v in (("n_layer", self.n_layer), ("n_embd", self.n_embd), ("n_head", self.n_head),
                                       ("max_seq_len", self.max_seq_len)) if v is not None}
        return tower_preset(self.size, vocab_size, dropout=self.dropout, **overrides)


class LMLoss:
    """Next-token cross-entropy summed over non-pad targets; examples are id sequences."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, model, seqs, device):
        x, y = collate(seqs, self.pad)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="sum")
        return loss, int((y != -100).sum())

    @staticmethod
    def count_targets(seq) -> int:
        return len(seq) - 1


def load_sequences(run_dir: Path, modality: str, roles: list[str], checksum: str, max_len: int) -> list[np.ndarray]:
    """Tower-vocabulary sequences of one modality from the given roles, long ones cut into windows."""
    seqs = []
    for role in roles:
        kw = {"text_tok": checksum} if modality == "text" else {"speech_tok": checksum}
        for utt in load_role(run_dir, role, **kw):
            tokens = utt[modality]
            if tokens is not None:
                seqs += split_long(to_sequence(modality, tokens), max_len)
    return seqs


def unigram_perplexity(train: list[np.ndarray], dev: list[np.ndarray], vocab_size: int) -> float:
    """Perplexity on dev targets of an add-one unigram model of the train targets: the floor to beat."""
    counts = np.bincount(np.concatenate([s[1:] for s in train]), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([s[1:] for s in dev])
    return float(math.exp(-logp[targets].mean()))


def tower_dir(run_dir: Path, tower: str) -> Path:
    return Path(run_dir) / "towers" / tower


def load_tower(directory: Path, device: str = "cpu") -> tuple[Tower, dict]:
    """Rebuild a pretrained tower from its config.json and model.pt."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZipperError(f"{directory / 'config.json'}: cannot read the tower config ({e})") from None
    from ..checkpoint import load_state

    try:
        model = Tower(TowerConfig.from_dict(meta["tower"]))
    except (ZipperError, KeyError, TypeError, ValueError) as e:  # e.g. a key added by a newer zipper
        raise ZipperError(f"{directory / 'config.json'}: {e}") from None
    load_state(model, directory / "model.pt", directory / "config.json")
    return model.to(device), meta


def pretrain(run_dir: Path, cfg: PretrainConfig, force: bool = False) -> dict | None:
    cfg.validate()
    run_dir = Path(run_dir)
    d = init_distributed(resolve_device(cfg.train))
    marker = require_stage(run_dir, "tokenize", f"zipper pretrain --tower {cfg.tower}")
    checksum = marker["text_tokenizer"] if cfg.tower == "text" else marker["speech_tokenizer"]
    if checksum is None:
        raise ZipperError(f"{run_dir}: the corpus has no audio, so there is no speech tower to pretrain")
    name, out = f"pretrain-{cfg.tower}", tower_dir(run_dir, cfg.tower)
    stage_cfg = config_dict(cfg)
    stage_cfg["train"].pop("device")  # where it runs does not change what it computes
    inputs = {f"{cfg.tower}_tokenizer": checksum}

    with training_stage(run_dir, name, stage_cfg, inputs, out, force, d, config_defaults(cfg)) as stage:
        if stage is None:
            return None
        return _pretrain(run_dir, cfg, out, checksum, stage, d)


def _pretrain(run_dir: Path, cfg: PretrainConfig, out: Path, checksum: str, stage, d: Dist) -> dict:
    modality = cfg.tower
    index = json.loads((run_dir / "tokens" / "aligned" / "index.json").read_text())
    vocab = text_vocab_size(index["text_vocab"]) if modality == "text" else speech_vocab_size(index["speech_vocab"])
    tcfg = cfg.tower_config(vocab)
    roles = [modality] + (["aligned"] if cfg.pool_aligned else [])
    train_seqs = load_sequences(run_dir, modality, roles, checksum, tcfg.max_seq_len + 1)
    dev_seqs = load_sequences(run_dir, modality, ["dev"], checksum, tcfg.max_seq_len + 1)
    if not train_seqs:
        raise ZipperError(f"no {modality} sequences in roles {', '.join(roles)} of {run_dir}")
    unigram = unigram_perplexity(train_seqs, dev_seqs, vocab) if dev_seqs else None

    torch.manual_seed(cfg.train.seed)
    model = Tower(tcfg)
    if d.main:
        write_json(out / "config.json", {"modality": modality, "tower": tcfg.to_dict(), "tokenizer": checksum,
                                         "specials": dict(zip(("pad", "begin", "end"), specials(modality)))})
        log(f"[{stage.name}] {model.num_params() / 1e6:.2f}M parameters, {len(train_seqs)} train / "
            f"{len(dev_seqs)} dev sequences, {sum(map(len, train_seqs)):,} train tokens"
            + (f"; unigram dev perplexity {unigram:.2f}" if unigram else ""))
    summary = train(out, model, train_seqs, dev_seqs, [len(s) for s in train_seqs], LMLoss(specials(modality)[0]),
                    cfg.train, log=log if d.main else (lambda *_: None))
    if not d.main:
        return summary
    with atomic_path(out / "model.pt") as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    plot_metrics(read_jsonl(out / "metrics.jsonl"), out / "loss.png", f"{modality} tower")
    summary |= {"unigram_dev_ppl": unigram, "params": model.num_params(),
                "train_sequences": len(train_seqs), "dev_sequences": len(dev_seqs)}
    log(f"[{stage.name}] done: dev perplexity {summary['dev_ppl']:.2f} vs unigram {unigram:.2f}" if unigram and summary["dev_ppl"]
        else f"[{stage.name}] done")
    stage.finish(outputs=summary)
    return summary
