"""`zipper eval`: score decode outputs the way the paper does.

ASR     corpus WER/CER after the one normaliser, substitutions/deletions/insertions, per-utterance alignments.
TTS     generated units -> vocoder -> audio -> ASR judge, scored against the gold transcript and against the
        "target" (the judge's transcript of audio resynthesised from the gold units); plus the oracle row
        (gold units through the vocoder, vs gold) and the ground-truth-audio row (vs gold). Two judges: the
        run's CTC judge (trained on ground-truth training audio) and pocketsphinx (independent).
Text    perplexity on the split's text of the text tower alone and through the fused model; whether the
        frozen text tower's perplexity is unchanged (exactly).

Writes eval/TAG/: report.json, report.md, utterances.jsonl (per utterance, per row), wer_by_length.png (WER per
gold-reference-length bucket, the paper's Figure 2). `zipper eval --compare` (stages/compare.py) puts finished
evals side by side with paired significance tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from ..atomic import read_jsonl, sha256_file, sha256_json, write_json, write_jsonl, write_text
from ..audio import read_audio
from ..console import console, log
from ..errors import ZipperError
from ..metrics import GOLD_ROWS, score, utterance_errors, wer_by_length_panels
from ..plots import plot_wer_by_length
from ..rundir import config_defaults, config_dict, init_run_dir, open_stage, require_stage
from ..shards import load_role
from ..vocab import to_sequence
from .compare_report import length_markdown

JUDGES = ("ctc", "pocketsphinx")


@dataclass(frozen=True)
class EvalConfig:
    """What `zipper eval` scores."""

    decode: tuple[str, ...] = ()
    """--decode TAG (repeatable): decode/TAG outputs to score (ASR and/or TTS)."""
    judges: tuple[str, ...] = JUDGES
    """--judges: ASR judges for TTS audio: ctc (trained on this run's ground-truth audio), pocketsphinx."""
    tag: str | None = None
    """--tag: name under eval/ (default: the decode tags joined)."""
    perplexity: bool = True
    """--perplexity/--no-perplexity: text perplexity of the text tower alone and inside the fused model."""
    judge_steps: int | None = None
    """--judge-steps: training steps of the CTC judge when the run has none yet (default: its own)."""

    def validate(self) -> None:
        if not self.decode:
            raise ZipperError("--decode TAG is required (a directory under decode/)")
        for j in self.judges:
            if j not in JUDGES:
                raise ZipperError(f"--judges: unknown judge {j!r} (judges: {', '.join(JUDGES)})")

    def resolved_tag(self) -> str:
        return self.tag or "+".join(self.decode)


def load_judge(name: str, run_dir: Path, steps: int | None = None):
    if name == "ctc":
        from ..ctc_judge import CTCJudgeConfig, ensure_ctc_judge

        return ensure_ctc_judge(run_dir, log=log, cfg=CTCJudgeConfig(steps=steps) if steps else None)
    from ..judges import PocketsphinxJudge

    return PocketsphinxJudge()


def evaluate_run(run_dir: Path, cfg: EvalConfig, force: bool = False) -> dict | None:
    cfg.validate()
    run_dir = Path(run_dir)
    tok = require_stage(run_dir, "tokenize", "zipper eval")
    decodes, inputs = {}, {}
    for dtag in cfg.decode:
        d = run_dir / "decode" / dtag
        inputs[dtag] = require_stage(run_dir, f"decode-{dtag}", "zipper eval")["outputs"]["hyp_sha256"]
        decodes[dtag] = (json.loads((d / "config.json").read_text()), read_jsonl(d / "hyp.jsonl"), d)
    tag = cfg.resolved_tag()
    out = run_dir / "eval" / tag
    init_run_dir(run_dir)
    with open_stage(run_dir, f"eval-{tag}", config_dict(cfg), inputs, force=force, log=log,
                    defaults=config_defaults(cfg)) as stage:
        if stage is None:
            report = json.loads((out / "report.json").read_text())
            print_report(report)
            return report
        report = {"run": str(run_dir), "decode": {}, "judges": {}}
        utter_rows = []
        judges = {}
        resynth: dict = {}  # gold units through the vocoder, once per set of utterances for all judges
        for dtag, (dcfg, hyps, ddir) in decodes.items():
            section = {"model": dcfg.get("model"), "outputs": dcfg.get("outputs"), "split": dcfg.get("split")}
            refs = {r["id"]: r for r in read_jsonl(run_dir / "data" / f"{dcfg['split']}.jsonl")} if dcfg.get("split") else {}
            if "text" in dcfg["outputs"] and refs:
                section["asr"], rows = _score_asr(hyps, refs)
                utter_rows += [dict(r, decode=dtag, row="asr") for r in rows]
            if "speech" in dcfg["outputs"] and refs:
                for jname in cfg.judges:
                    if jname not in judges:
                        judges[jname] = load_judge(jname, run_dir, cfg.judge_steps)
                        report["judges"][jname] = judges[jname].info()
                    section.setdefault("tts", {})[jname], rows = _score_tts(run_dir, tok, dcfg["split"], hyps, refs, ddir,
                                                                            judges[jname], jname, resynth)
                    utter_rows += [dict(r, decode=dtag) for r in rows]
            report["decode"][dtag] = section
        if cfg.perplexity:
            report["perplexity"] = _perplexities(run_dir, tok, decodes)
        write_jsonl(out / "utterances.jsonl", utter_rows)
        report["wer_by_length"] = wer_by_length_panels(utter_rows, length_label(utter_rows))
        plot_wer_by_length(report["wer_by_length"], out / "wer_by_length.png", f"WER by utterance length: eval/{tag}")
        write_json(out / "report.json", report)
        write_text(out / "report.md", render_markdown(report))
        print_report(report)
        stage.finish(outputs={"report": str(out / "report.json")})
        return report


def _score_asr(hyps: list[dict], refs: dict) -> tuple[dict, list[dict]]:
    have = [h for h in hyps if h["id"] in refs and h.get("text") is not None]
    ref_text = [refs[h["id"]]["norm"] for h in have]
    hyp_text = [h["text"] for h in have]
    s = score(ref_text, hyp_text)
    rows = [dict(u, id=h["id"]) for h, u in zip(have, utterance_errors(ref_text, hyp_text))]
    return s.to_dict(), rows


def _oracle_units(run_dir: Path, tok: dict, split: str) -> dict[str, np.ndarray]:
    role = {"dev": "dev", "test": "test", "aligned": "aligned"}.get(split, split)
    return {u["id"]: u["speech"] for u in load_role(run_dir, role, speech_tok=tok["speech_tokenizer"]) if u["speech"] is not None}


def _cached_transcripts(run_dir: Path, key: dict, name: str, make) -> dict[str, str]:
    """Judge transcripts of fixed audio (ground truth, oracle) are cached per judge, split and vocoder."""
    path = run_dir / "eval" / "cache" / f"{name}-{sha256_json(key)[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = make()
    write_json(path, result)
    return result


def _score_tts(run_dir, tok, split, hyps, refs, ddir, judge, jname, resynth: dict) -> tuple[dict, list[dict]]:
    from ..vocoder import run_vocoder

    vocoder = run_vocoder(run_dir)  # the one decode trained
    have = [h for h in hyps if h["id"] in refs and h.get("wav")]
    ids = [h["id"] for h in have]
    log(f"[eval] {jname}: transcribing {len(have)} generated utterances")
    gen = judge.transcribe_many([sf.read(ddir / h["wav"], dtype="float32")[0] for h in have])
    oracle_units = _oracle_units(run_dir, tok, split)
    key = {"judge": judge.info(), "split": split, "ids": ids, "vocoder": _vocoder_signature(run_dir)}

    def oracle():
        log(f"[eval] {jname}: transcribing {len(ids)} resyntheses of the gold units (oracle / target)")
        key = (split, tuple(ids))
        if key not in resynth:
            # each in its own speaker's voice, as a speaker-conditioned unit vocoder resynthesises
            resynth[key] = vocoder.vocode_many([oracle_units[i] for i in ids],
                                               speakers=[refs[i].get("speaker") for i in ids])
        return dict(zip(ids, judge.transcribe_many(resynth[key])))

    def truth():
        log(f"[eval] {jname}: transcribing {len(ids)} ground-truth recordings")
        wavs = [read_audio(refs[i]["audio"], start=refs[i].get("start"), end=refs[i].get("end")) for i in ids]
        return dict(zip(ids, judge.transcribe_many(wavs)))

    target = _cached_transcripts(run_dir, key, f"oracle-{jname}", oracle)
    gt = _cached_transcripts(run_dir, {k: v for k, v in key.items() if k != "vocoder"}, f"truth-{jname}", truth)
    gold = [refs[i]["norm"] for i in ids]
    rows_out = {}
    per_utt = []
    for row, ref, hyp in (("tts_vs_gold", gold, gen), ("tts_vs_target", [target[i] or "<empty>" for i in ids], gen),
                          ("oracle_vs_gold", gold, [target[i] for i in ids]),
                          ("ground_truth_vs_gold", gold, [gt[i] for i in ids])):
        rows_out[row] = score(ref, hyp).to_dict()
        per_utt += [dict(u, id=i, row=f"{row}/{jname}") for i, u in zip(ids, utterance_errors(ref, hyp))]
    return rows_out, per_utt


def _vocoder_signature(run_dir: Path) -> str:
    """The trained vocoder's marker file identifies it (config, tokenizer checksum, training result)."""
    return sha256_file(Path(run_dir) / "tokenizers" / "speech" / "vocoder" / "vocoder.json")


@torch.no_grad()
def text_perplexity(logits_fn, seqs: list[np.ndarray], batch: int = 64) -> float:
    """exp(mean next-token NLL) over [bos] text [eos] sequences."""
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        T = max(len(s) for s in chunk) - 1
        x = torch.zeros((len(chunk), T), dtype=torch.long)
        y = torch.full((len(chunk), T), -100, dtype=torch.long)
        for j, s in enumerate(chunk):
            s = torch.as_tensor(s)
            x[j, : len(s) - 1], y[j, : len(s) - 1] = s[:-1], s[1:]
        logits = logits_fn(x)
        total += F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    return math.exp(total / count)


def _perplexities(run_dir: Path, tok: dict, decodes: dict) -> dict:
    from .fuse import load_fused
    from .pretrain import load_tower

    split = next((c.get("split") for c, _, _ in decodes.values() if c.get("split")), "test")
    utts = load_role(run_dir, split, text_tok=tok["text_tokenizer"])
    seqs = [to_sequence("text", u["text"]) for u in utts if u["text"] is not None]
    tower, _ = load_tower(Path(run_dir) / "towers" / "text")
    tower.eval()
    out = {"split": split, "sequences": len(seqs), "text_tower": text_perplexity(tower, seqs)}
    models = {c["model"] for c, _, _ in decodes.values() if c.get("model", "").startswith("fused/")}
    for m in sorted(models):
        model, meta = load_fused(Path(run_dir) / m)
        if meta["arch"] == "zipper":
            ppl = text_perplexity(lambda x: model.unimodal_logits("text", x), seqs)
        else:  # the baseline scores text over its whole extended vocabulary
            ppl = text_perplexity(model, seqs)
        out[m] = {"perplexity": ppl, "arch": meta["arch"], "freeze": meta.get("freeze"),
                  "unchanged": ppl == out["text_tower"]}
    return out


def render_markdown(report: dict) -> str:
    lines = [f"# zipper eval: {report['run']}", ""]
    for dtag, sec in report["decode"].items():
        lines += [f"## {dtag} ({sec.get('model')}, outputs {sec.get('outputs')}, split {sec.get('split')})", ""]
        if "asr" in sec:
            a = sec["asr"]
            lines += ["| ASR | WER | CER | sub | del | ins | ref words | utterances |", "|---|---|---|---|---|---|---|---|",
                      f"| {dtag} | {a['wer']:.4f} | {a['cer']:.4f} | {a['substitutions']} | {a['deletions']} | "
                      f"{a['insertions']} | {a['ref_words']} | {a['utterances']} |", ""]
        for jname, rows in sec.get("tts", {}).items():
            lines += [f"TTS judged by {jname} ({report['judges'][jname]['version']}):", "",
                      "| row | WER | CER | utterances |", "|---|---|---|---|"]
            lines += [f"| {r} | {s['wer']:.4f} | {s['cer']:.4f} | {s['utterances']} |" for r, s in rows.items()]
            lines.append("")
    if "perplexity" in report:
        p = report["perplexity"]
        lines += [f"## Text perplexity ({p['split']}, {p['sequences']} sentences)", "", "| model | perplexity | unchanged |",
                  "|---|---|---|", f"| towers/text alone | {p['text_tower']:.4f} | |"]
        lines += [f"| {m} ({v['arch']}, freeze {v['freeze']}) | {v['perplexity']:.4f} | {'yes, exactly' if v['unchanged'] else 'no'} |"
                  for m, v in p.items() if isinstance(v, dict)]
        lines.append("")
    lines += length_markdown(report.get("wer_by_length", {}))
    return "\n".join(lines) + "\n"


def print_report(report: dict) -> None:
    from rich.table import Table

    table = Table(title="zipper eval")
    for col in ("decode", "row", "judge", "WER", "CER", "utts"):
        table.add_column(col, justify="right" if col in ("WER", "CER", "utts") else "left")
    for dtag, sec in report["decode"].items():
        if "asr" in sec:
            a = sec["asr"]
            table.add_row(dtag, "ASR", "-", f"{a['wer']:.2%}", f"{a['cer']:.2%}", str(a["utterances"]))
        for jname, rows in sec.get("tts", {}).items():
            for r, s in rows.items():
                table.add_row(dtag, r, jname, f"{s['wer']:.2%}", f"{s['cer']:.2%}", str(s["utterances"]))
    console.print(table)
    if "perplexity" in report:
        p = report["perplexity"]
        log(f"text perplexity ({p['split']}): tower alone {p['text_tower']:.4f}")
        for m, v in p.items():
            if isinstance(v, dict):
                log(f"  {m}: {v['perplexity']:.4f} ({'unchanged, exactly' if v['unchanged'] else 'changed'})")


def length_label(rows: list[dict]):
    """Series names of the WER-by-length panels: the row ("ASR", "generated", "oracle (gold units)", ...),
    prefixed by the decode tag when several decodes have rows of the same kind."""
    decodes: dict[str, set] = {}
    for r in rows:
        decodes.setdefault(r["row"], set()).add(r["decode"])
    several = any(len(d) > 1 for d in decodes.values())
    return lambda r: (f"{r['decode']}: " if several else "") + GOLD_ROWS[r["row"].partition("/")[0]]
