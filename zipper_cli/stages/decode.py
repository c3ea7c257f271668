"""`zipper decode`: generate modality sequences with a fused model (or a tower), write hypotheses and WAVs.

Inputs: a split of the run (`--split test`), or the user's own files: `--wav a.wav b.flac` (speech in),
`--text "..."` / `--text-file F` (text in). `--outputs text` (ASR), `speech` (TTS), `text,speech`, or a
tower's own modality (continuation). Writes decode/TAG/: hyp.jsonl (id, input modality, outputs, tokens,
text, wav, ended, reference), wav/ID.wav for speech outputs, config.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from ..atomic import atomic_path, read_jsonl, sha256_file, write_json, write_jsonl
from ..audio import AudioReject, read_audio
from ..console import log
from ..errors import ZipperError
from ..generate import GenerationConfig, SingleDecoderGenerator, TowerGenerator, ZipperGenerator
from ..models.single_decoder import SingleDecoderVocab
from ..rundir import config_defaults, config_dict, init_run_dir, open_stage, require_stage
from ..shards import load_role
from ..speech_tokenizer import SpeechTokenizer
from ..text_tokenizer import TextTokenizer
from ..devices import pick_device

MODALITIES = ("text", "speech")


@dataclass(frozen=True)
class DecodeConfig:
    """What `zipper decode` generates, from what."""

    model: str = ""
    """--model: fused/TAG (a Zipper or single-decoder model) or towers/text | towers/speech (continuation);
    default: the run's only fused model."""
    outputs: str = "text"
    """--outputs: output modalities in order: text (ASR), speech (TTS), text,speech, ..."""
    split: str | None = None
    """--split: decode this split of the run (dev, test); default test unless --wav/--text are given."""
    wavs: tuple[str, ...] = ()
    """--wav: the user's own audio files (speech input)."""
    texts: tuple[str, ...] = ()
    """--text: the user's own sentences (text input); --text-file adds one sentence per line."""
    limit: int | None = None
    """--limit: decode only the first N utterances of the split."""
    tag: str | None = None
    """--tag: name under decode/ (default: model, outputs and source)."""
    vocoder_steps: int | None = None
    """--vocoder-steps: training steps of the unit vocoder when the run has none yet (default: its own)."""
    voice: str | None = None
    """--voice: the speaker whose voice speech outputs are vocoded in (a `speaker` label of the run's
    speech + aligned manifests); default the vocoder's default voice, its most frequent speaker."""
    device: str = "auto"
    """--device: auto (CUDA when present), cpu or cuda. The unit vocoder runs on CPU either way."""
    gen: GenerationConfig = field(default_factory=GenerationConfig)

    def output_list(self) -> list[str]:
        outs = [o.strip() for o in self.outputs.split(",") if o.strip()]
        if not outs or any(o not in MODALITIES for o in outs):
            raise ZipperError(f"--outputs must be a comma list of text and speech, e.g. text or text,speech (got {self.outputs!r})")
        return outs

    def validate(self) -> None:
        self.output_list()
        if self.wavs and self.texts:
            raise ZipperError("give --wav (speech in) or --text/--text-file (text in), not both")
        if (self.wavs or self.texts) and self.split:
            raise ZipperError("--split decodes the run's data; --wav/--text decode your own: choose one")
        if self.limit is not None and self.limit < 1:
            raise ZipperError(f"--limit must be >= 1 (got {self.limit})")
        if self.tag is not None and (not self.tag or "/" in self.tag or self.tag.startswith(".")):
            raise ZipperError(f"--tag {self.tag!r}: use a plain name")
        pick_device(self.device)
        self.gen.validate()


def _resolve_model(run_dir: Path, model: str) -> str:
    if model:
        if not (run_dir / model / "model.pt").exists():
            raise ZipperError(f"--model {model}: no finished model at {run_dir / model} (expected fused/TAG or towers/NAME)")
        return model
    fused = sorted(p.parent.name for p in (run_dir / "fused").glob("*/model.pt"))
    if len(fused) != 1:
        raise ZipperError(f"--model is required: the run has {len(fused)} fused models"
                          + (f" ({', '.join('fused/' + f for f in fused)})" if fused else "; run `zipper fuse` first"))
    return f"fused/{fused[0]}"


def speech_unit_rate(run_dir: Path) -> float:
    """Units per second of the run's speech tokenizer (25.0 where the run has none: text only)."""
    path = Path(run_dir) / "tokenizers" / "speech" / "tokenizer.json"
    if not path.exists():
        return 25.0
    try:
        return float(json.loads(path.read_text())["frame_rate"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ZipperError(f"{path}: cannot read the speech tokenizer's unit rate ({e})") from None


def load_generator(run_dir: Path, model: str, device: str = "cpu"):
    """(generator, kind) for fused/TAG or towers/NAME, its weights on `device`."""
    from .fuse import load_fused
    from .pretrain import load_tower

    if model.startswith("towers/"):
        tower, meta = load_tower(run_dir / model)
        return TowerGenerator(tower.to(device).eval(), meta["modality"]), "tower"
    try:
        net, meta = load_fused(run_dir / model)
    except ZipperError as e:
        msg = str(e) if str(run_dir / model) in str(e) else f"{run_dir / model / 'config.json'}: {e}"
        raise ZipperError(f"--model {model}: {msg}") from None
    except (RuntimeError, KeyError, TypeError, ValueError) as e:  # weights that do not fit the config
        from ..checkpoint import mismatch

        raise ZipperError(f"--model {model}: {run_dir / model / 'model.pt'} does not fit the model in "
                          f"{run_dir / model / 'config.json'} ({mismatch(e)})") from None
    net = net.to(device)
    if meta["arch"] == "zipper":
        return ZipperGenerator(net), "zipper"
    return SingleDecoderGenerator(net, SingleDecoderVocab(**meta["single_decoder_vocab"])), "single-decoder"


def _inputs(run_dir: Path, cfg: DecodeConfig, outputs: list[str], tok: dict) -> tuple[str, list[dict]]:
    """(input modality, items {id, tokens, ref, source}) from the split or the user's files."""
    text_tok = TextTokenizer.load(run_dir / "tokenizers" / "text")
    if cfg.wavs:
        speech_tok = SpeechTokenizer.load(run_dir / "tokenizers" / "speech")
        items = []
        for i, path in enumerate(cfg.wavs):
            try:
                wav = read_audio(path)
            except AudioReject as e:
                raise ZipperError(f"--wav {e.detail} ({e.reason})") from None
            items.append({"id": f"wav{i:04d}-{Path(path).stem.replace(' ', '_')}", "tokens": speech_tok.encode(wav),
                          "ref": None, "source": str(path)})
        return "speech", items
    if cfg.texts:
        items = []
        for i, text in enumerate(cfg.texts):
            ids = text_tok.encode(text)
            if not ids:
                raise ZipperError(f"--text {text!r} is empty after normalisation")
            items.append({"id": f"text{i:04d}", "tokens": np.asarray(ids), "ref": text, "source": "--text"})
        return "text", items
    split = cfg.split or "test"
    if split not in ("dev", "test", "aligned"):
        raise ZipperError(f"--split must be dev, test or aligned (got {split!r})")
    manifest = {r["id"]: r for r in read_jsonl(run_dir / "data" / f"{split}.jsonl")}
    in_m = "text" if outputs[0] == "speech" else "speech"
    utts = load_role(run_dir, split, text_tok=tok["text_tokenizer"], speech_tok=tok["speech_tokenizer"])
    utts = utts[: cfg.limit] if cfg.limit else utts
    return in_m, [{"id": u["id"], "tokens": u[in_m], "ref": manifest[u["id"]]["norm"], "source": split} for u in utts]


def default_tag(cfg: DecodeConfig, model: str) -> str:
    source = (cfg.split or "test") if not (cfg.wavs or cfg.texts) else "user-" + hashlib.sha256(
        json.dumps([cfg.wavs, cfg.texts]).encode()).hexdigest()[:8]
    return f"{model.split('/', 1)[1]}-{source}-{cfg.outputs.replace(',', '+')}"


def decode(run_dir: Path, cfg: DecodeConfig, force: bool = False) -> dict | None:
    cfg.validate()
    run_dir = Path(run_dir)
    tok = require_stage(run_dir, "tokenize", "zipper decode")
    model = _resolve_model(run_dir, cfg.model)
    outputs = cfg.output_list()
    cfg = dataclasses.replace(cfg, gen=dataclasses.replace(cfg.gen, unit_rate=speech_unit_rate(run_dir)))
    tag = cfg.tag or default_tag(cfg, model)
    out = run_dir / "decode" / tag
    stage_cfg = config_dict(cfg) | {"model": model}
    stage_cfg.pop("device")  # where it ran is not what it is: a decode started on a GPU may finish on CPU
    inputs = {"model": sha256_file(run_dir / model / "model.pt")}
    init_run_dir(run_dir)
    with open_stage(run_dir, f"decode-{tag}", stage_cfg, inputs, force=force, log=log,
                    defaults=config_defaults(cfg)) as stage:
        if stage is None:
            return None
        if cfg.voice is not None:
            from ..vocoder import training_speakers

            if "speech" not in outputs:
                raise ZipperError("--voice chooses the voice of speech outputs: add speech to --outputs")
            known = training_speakers(run_dir)
            if cfg.voice not in known:
                raise ZipperError(f"--voice {cfg.voice!r}: not a speaker of this run's speech and aligned audio "
                                  f"(known: {', '.join(known) if known else 'none: its vocoder has one voice'})")
        device = pick_device(cfg.device)
        generator, kind = load_generator(run_dir, model, device)
        in_m, items = _inputs(run_dir, cfg, outputs, tok)
        if kind == "tower" and (in_m != generator.modalities[0] or outputs != [in_m]):
            raise ZipperError(f"--model {model} is a unimodal {generator.modalities[0]} tower: it only continues "
                              f"{generator.modalities[0]} (--outputs {generator.modalities[0]} from "
                              f"{'--text' if generator.modalities[0] == 'text' else '--wav'} input); "
                              "use a fused model for ASR or TTS")
        log(f"[decode] {model} on {device}: {len(items)} inputs ({in_m}) -> {'+'.join(outputs)}, {cfg.gen.strategy}"
            + (f", CTC weight {cfg.gen.ctc_weight:g}" if cfg.gen.ctc_weight else "")
            + (f", guidance {cfg.gen.guidance:g}" if cfg.gen.guidance else "")
            + (f", best of {cfg.gen.best_of}" if cfg.gen.best_of > 1 else ""))
        t0 = time.time()
        gens = generator.generate([it["tokens"] for it in items], in_m, outputs, cfg.gen)
        seconds = time.time() - t0
        n_tokens = sum(len(t) for g in gens for t in g.tokens)
        text_tok = TextTokenizer.load(run_dir / "tokenizers" / "text")
        vocoder = None
        if "speech" in outputs:
            from ..vocoder import run_vocoder

            vocoder = run_vocoder(run_dir, steps=cfg.vocoder_steps)
            if cfg.voice is not None and cfg.voice not in vocoder.cfg.speakers:
                raise ZipperError(f"--voice {cfg.voice!r}: this run's vocoder was trained without it (speakers: "
                                  f"{', '.join(vocoder.cfg.speakers) or 'none'}); retrain it (delete "
                                  f"{run_dir / 'tokenizers' / 'speech' / 'vocoder'})")
        rows = []
        speech_units = [g["speech"] for g in gens] if vocoder else []
        voice = (cfg.voice or (vocoder.cfg.speakers[0] if vocoder.cfg.speakers else None)) if vocoder else None
        wavs = vocoder.vocode_many(speech_units, speakers=[voice] * len(speech_units)) if vocoder else []
        for i, (it, g) in enumerate(zip(items, gens)):
            row = {"id": it["id"], "input_modality": in_m, "outputs": outputs, "source": it["source"],
                   "input_tokens": len(it["tokens"]), "ref": it["ref"],
                   "tokens": {m: g[m].tolist() for m in outputs}, "ended": dict(zip(outputs, g.ended))}
            if "text" in outputs:
                row["text"] = text_tok.decode(g["text"])
            if vocoder:
                rel = f"wav/{it['id']}.wav"
                with atomic_path(out / rel) as tmp:
                    sf.write(tmp, wavs[i], 16000, subtype="PCM_16", format="WAV")
                row["wav"] = rel
                row["voice"] = voice
            rows.append(row)
        write_jsonl(out / "hyp.jsonl", rows)
        write_json(out / "config.json", stage_cfg | {"tag": tag, "input_modality": in_m, "split": cfg.split or
                                                     (None if (cfg.wavs or cfg.texts) else "test"),
                                                     "outputs": outputs, "kind": kind})
        summary = {"utterances": len(rows), "generated_tokens": n_tokens, "device": device, "seconds": round(seconds, 2),
                   "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1),
                   "ended": sum(all(r["ended"].values()) for r in rows), "hyp_sha256": sha256_file(out / "hyp.jsonl")}
        log(f"[decode] {len(rows)} utterances, {n_tokens} tokens in {seconds:.1f}s ({summary['tokens_per_s']:.0f} tok/s); "
            f"{summary['ended']} ended with their end token; outputs in {out}")
        for r in rows[:3]:
            log(f"  {r['id']}: " + (f"text: {r['text']!r}" if "text" in r else "") + (f" wav: {out / r['wav']}" if "wav" in r else ""))
        stage.finish(outputs=summary)
        return summary
