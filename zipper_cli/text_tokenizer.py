"""The text tokenizer: sentencepiece trained on the text role, after the one normaliser (text_norm)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

from . import __version__
from .atomic import sha256_file, write_bytes, write_json
from .errors import ZipperError
from .text_norm import normalize_text


@dataclass(frozen=True)
class TextTokenizerConfig:
    """Settings that change the text tokens; all stored with the tokenizer and its checksum."""

    vocab_size: int = 1000
    """--text-vocab: sentencepiece vocabulary size (an upper bound: small corpora get fewer pieces)."""
    model_type: str = "unigram"
    """--text-model: unigram | bpe | char | word."""
    seed: int = 0
    """Seed for sentencepiece's sampling; with one thread the model file is byte-identical per seed."""
    max_sentences: int = 2_000_000
    """Sentences sampled for training, so huge text roles train in bounded time."""

    def validate(self) -> None:
        if self.vocab_size < 8:
            raise ZipperError(f"--text-vocab must be >= 8 (got {self.vocab_size})")
        if self.model_type not in ("unigram", "bpe", "char", "word"):
            raise ZipperError(f"--text-model must be one of unigram, bpe, char, word (got {self.model_type!r})")


# Fixed ids so every tower and every run agrees: pad 0, unk 1, bos 2, eos 3.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_text_tokenizer(cfg: TextTokenizerConfig, sentences: list[str], out_dir: Path) -> "TextTokenizer":
    """Train sentencepiece on normalised sentences and save spm.model + tokenizer.json in out_dir."""
    cfg.validate()
    sentences = [s for s in (normalize_text(x) for x in sentences) if s]
    if not sentences:
        raise ZipperError("the text role is empty after normalisation: nothing to train the text tokenizer on")
    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=cfg.vocab_size,
            model_type=cfg.model_type, character_coverage=1.0, hard_vocab_limit=False,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            input_sentence_size=cfg.max_sentences, shuffle_input_sentence=True,
            num_threads=1, minloglevel=2, normalization_rule_name="identity",
        )
    except RuntimeError as e:
        raise ZipperError(f"sentencepiece training failed: {' '.join(str(e).split())}") from None
    out_dir = Path(out_dir)
    write_bytes(out_dir / "spm.model", model.getvalue())
    tok = TextTokenizer(out_dir / "spm.model", cfg)
    write_json(out_dir / "tokenizer.json", {
        "kind": "sentencepiece", "config": asdict(cfg), "vocab_size": tok.vocab_size,
        "checksum": tok.checksum, "normaliser": "zipper_cli.text_norm.normalize_text", "zipper": __version__,
        "sentencepiece": spm.__version__,
    })
    return tok


class TextTokenizer:
    """Sentencepiece with the toolkit's normaliser in front."""

    def __init__(self, model_path: Path, cfg: TextTokenizerConfig):
        self.cfg = cfg
        self.checksum = sha256_file(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def load(cls, directory: Path) -> "TextTokenizer":
        directory = Path(directory)
        meta_path = directory / "tokenizer.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ZipperError(f"{meta_path}: cannot read text tokenizer metadata ({e})") from None
        model = directory / "spm.model"
        if not model.exists() or sha256_file(model) != meta.get("checksum"):
            raise ZipperError(f"{model}: missing or its checksum does not match {meta_path}; rerun zipper tokenize --force")
        return cls(model, TextTokenizerConfig(**meta["config"]))

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(normalize_text(text))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])
