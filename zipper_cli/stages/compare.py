"""`zipper eval --compare A,B,...`: finished evals side by side, with paired significance tests.

A system is an eval tag (eval/TAG holds report.json and the per-utterance results in utterances.jsonl), or
TAG:DECODE for one decode of an eval that scored several. The first system is the reference. Compared rows:
ASR, and TTS vs gold and vs target for each judge. Each row is scored on the utterance ids every system has,
and every system is tested against the reference on those utterances with the Wilcoxon signed-rank test and
the paired bootstrap of per-utterance word errors. Refused: systems with no utterance in common, scored by
different judges, against different references, or without per-utterance results.

Provenance: a decode records its model (fused/TAG); the fused model's config.json records its architecture,
frozen tower and aligned utterances, and data/aligned.jsonl the run's aligned total, so each row carries the
aligned-data fraction its model was fine-tuned on.

Writes eval/TAG/: compare.json, compare.md, wer_by_length.png, and wer_vs_aligned.png when the compared
models were fine-tuned on different amounts of aligned data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import read_jsonl, sha256_file, write_json, write_text
from ..console import log
from ..errors import ZipperError
from ..metrics import paired_bootstrap, score, wer_by_length_panels, wilcoxon
from ..plots import plot_wer_by_length, plot_wer_vs_aligned
from ..rundir import config_dict, init_run_dir, open_stage, read_marker
from .compare_report import print_comparison, render_markdown

ALPHA = 0.05
COMPARED = ("asr", "tts_vs_gold", "tts_vs_target")
"""Row kinds a comparison tests (the oracle and ground-truth rows do not depend on the model)."""


@dataclass(frozen=True)
class CompareConfig:
    """What `zipper eval --compare` puts side by side."""

    systems: tuple[str, ...] = ()
    """--compare A,B,... (or repeated): eval tags under eval/ (TAG:DECODE for one decode of a tag); the first is
    the reference every other system is tested against."""
    judges: tuple[str, ...] | None = None
    """--judges: compare only these TTS judges (default: all, and every system must have been scored by the same)."""
    tag: str | None = None
    """--tag: name under eval/ (default compare-A+B...)."""
    resamples: int = 10_000
    """--resamples: paired bootstrap resamples."""
    seed: int = 0
    """--seed: paired bootstrap seed."""

    def validate(self) -> None:
        if len(self.systems) < 2:
            raise ZipperError("--compare needs at least two eval tags (e.g. --compare zipper,single); the first is "
                              "the reference")
        if len(set(self.systems)) != len(self.systems):
            dup = next(s for s in self.systems if self.systems.count(s) > 1)
            raise ZipperError(f"--compare names {dup} twice")
        for s in self.systems:
            if not s or s.startswith((".", "/")) or "/" in s:
                raise ZipperError(f"--compare: {s!r} is not an eval tag (a directory name under eval/, or TAG:DECODE)")
        if self.resamples < 100:
            raise ZipperError(f"--resamples must be at least 100 (got {self.resamples})")

    def resolved_tag(self) -> str:
        return self.tag or "compare-" + "+".join(s.replace(":", "-") for s in self.systems)


def _kind(row: str) -> tuple[str, str | None]:
    kind, _, judge = row.partition("/")
    return kind, judge or None


def load_system(run_dir: Path, spec: str) -> dict:
    """One compared system: its eval's report, per-utterance rows by row ("asr", "tts_vs_gold/ctc", ...) and
    the decode and model behind each row."""
    tag, _, only = spec.partition(":")
    d = run_dir / "eval" / tag
    if not d.is_dir():
        have = sorted(p.name for p in (run_dir / "eval").iterdir() if p.is_dir() and p.name != "cache") \
            if (run_dir / "eval").is_dir() else []
        raise ZipperError(f"--compare {spec}: no eval/{tag} in {run_dir} (evals there: {', '.join(have) or 'none'})")
    if not (d / "report.json").exists():
        what = "a comparison, not an eval of decode outputs" if (d / "compare.json").exists() else "not finished"
        raise ZipperError(f"--compare {spec}: {d / 'report.json'} is missing (eval/{tag} is {what})")
    if read_marker(run_dir, f"eval-{tag}") is None:
        raise ZipperError(f"--compare {spec}: eval/{tag} is not finished (no stages/eval-{tag}.done.json); rerun "
                          f"`zipper eval --tag {tag}`")
    report = json.loads((d / "report.json").read_text())
    if only and only not in report["decode"]:
        raise ZipperError(f"--compare {spec}: eval/{tag} did not score decode {only!r} "
                          f"(it scored {', '.join(report['decode'])})")
    decodes = {k: v for k, v in report["decode"].items() if not only or k == only}
    expected = {(dtag, "asr") for dtag, sec in decodes.items() if "asr" in sec}
    expected |= {(dtag, f"{kind}/{j}") for dtag, sec in decodes.items() for j in sec.get("tts", {}) for kind in COMPARED[1:]}
    if not expected:
        raise ZipperError(f"--compare {spec}: eval/{tag} has no ASR or TTS rows to compare")
    upath = d / "utterances.jsonl"
    if not upath.exists():
        raise ZipperError(f"--compare {spec}: {upath} is missing: no per-utterance results for the paired tests "
                          f"(rerun `zipper eval --tag {tag} --force`)")
    rows: dict[str, dict[str, dict]] = {}
    source: dict[str, str] = {}
    for r in read_jsonl(upath):
        if (r.get("decode"), r.get("row")) not in expected:
            continue
        if source.setdefault(r["row"], r["decode"]) != r["decode"]:
            raise ZipperError(f"--compare {spec}: eval/{tag} has {r['row']} rows from two decodes "
                              f"({source[r['row']]}, {r['decode']}); name one as {tag}:DECODE")
        rows.setdefault(r["row"], {})[r["id"]] = r
    missing = sorted(f"{row} of decode {dtag}" for dtag, row in expected if row not in rows)
    if missing:
        raise ZipperError(f"--compare {spec}: {upath} has no per-utterance results for {', '.join(missing)} "
                          f"(rerun `zipper eval --tag {tag} --force`)")
    judges = {_kind(row)[1] for row in rows} - {None}
    return {"spec": spec, "eval": tag, "report": report, "rows": rows, "judges": judges,
            "decode": source, "model": {row: decodes[dtag].get("model") for row, dtag in source.items()},
            "inputs": {"report": sha256_file(d / "report.json"), "utterances": sha256_file(upath)}}


def model_provenance(run_dir: Path, model: str | None) -> dict:
    """What a decode's model was fine-tuned on: architecture, frozen tower, aligned utterances and fraction."""
    if not model or not model.startswith("fused/"):
        return {"arch": model.split("/")[0] if model else None}
    try:
        meta = json.loads((run_dir / model / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZipperError(f"{run_dir / model / 'config.json'}: cannot read the fused model config ({e})") from None
    n = meta.get("aligned_utterances")
    total_path = run_dir / "data" / "aligned.jsonl"
    total = sum(1 for line in total_path.open(encoding="utf-8") if line.strip()) if total_path.exists() else None
    return {"arch": meta.get("arch"), "freeze": meta.get("freeze"), "aligned_utterances": n,
            "aligned_total": total, "aligned_fraction": n / total if n and total else None}


def _check_judges(systems: list[dict], wanted: tuple[str, ...] | None) -> list[str]:
    """The judges compared: --judges (each must be in every system scored on TTS), else every system's, which
    must agree; the same judge name must mean the same judge (version: its checksum) in every system."""
    tts = [s for s in systems if s["judges"]]
    if wanted is not None:
        for s in tts:
            lacking = [j for j in wanted if j not in s["judges"]]
            if lacking:
                raise ZipperError(f"--judges {','.join(wanted)}: eval/{s['eval']} was not judged by "
                                  f"{','.join(lacking)} (its judges: {','.join(sorted(s['judges']))})")
        judges = list(wanted)
    else:
        judges = sorted(tts[0]["judges"]) if tts else []
        for s in tts[1:]:
            if s["judges"] != tts[0]["judges"]:
                common = sorted(s["judges"] & tts[0]["judges"])
                hint = f"pass --judges {','.join(common)} to compare on the judges they share" if common else \
                    "they share none"
                raise ZipperError(f"different judges: eval/{tts[0]['eval']} was judged by "
                                  f"{','.join(sorted(tts[0]['judges']))}, eval/{s['eval']} by "
                                  f"{','.join(sorted(s['judges']))}; {hint}")
    for j in judges:
        v0 = tts[0]["report"]["judges"].get(j, {}).get("version")
        for s in tts[1:]:
            v = s["report"]["judges"].get(j, {}).get("version")
            if v != v0:
                raise ZipperError(f"different judges: {j} is {v0} in eval/{tts[0]['eval']} but {v} in eval/{s['eval']}; "
                                  "score both with the same judge")
    return judges


def _row_order(judges: list[str]) -> list[str]:
    return ["asr"] + [f"{kind}/{j}" for j in judges for kind in COMPARED[1:]]


def compare_rows(systems: list[dict], row: str, resamples: int, seed: int) -> dict:
    """One row kind: every system scored on the utterances all have, each tested against the first."""
    ref = systems[0]
    ids = set(ref["rows"][row])
    for s in systems[1:]:
        if not ids & set(s["rows"][row]):
            raise ZipperError(f"{row}: eval/{ref['eval']} and eval/{s['eval']} were scored on different utterances "
                              f"(no id in common); compare evals of the same split")
        ids &= set(s["rows"][row])
    if not ids:
        raise ZipperError(f"{row}: the compared evals share no utterance; compare evals of the same split")
    ids = sorted(ids)
    refs = [ref["rows"][row][i]["ref"] for i in ids]
    for s in systems[1:]:
        for i, r in zip(ids, refs):
            if s["rows"][row][i]["ref"] != r:
                raise ZipperError(f"{row}: utterance {i} has reference {r!r} in eval/{ref['eval']} but "
                                  f"{s['rows'][row][i]['ref']!r} in eval/{s['eval']}: they were scored against "
                                  f"different references")
    words = [ref["rows"][row][i]["ref_words"] for i in ids]
    base = [ref["rows"][row][i]["errors"] for i in ids]
    results = []
    for k, s in enumerate(systems):
        utt = [s["rows"][row][i] for i in ids]
        errors = [u["errors"] for u in utt]
        res = {"system": s["spec"], "decode": s["decode"][row], "model": s["model"][row], **s["provenance"][row],
               **score(refs, [u["hyp"] for u in utt]).to_dict(), "errors": sum(errors),
               "scored_utterances": len(s["rows"][row]), "vs_reference": None}
        if k:
            w, b = wilcoxon(base, errors), paired_bootstrap(base, errors, words, n=resamples, seed=seed)
            significant = w["p"] < ALPHA and b["p_two_sided"] < ALPHA
            verdict = "n.s." if not significant else ("worse" if b["delta_wer"] > 0 else "better")
            res["vs_reference"] = {"delta_wer": b["delta_wer"], "wilcoxon": w, "bootstrap": b, "verdict": verdict}
        results.append(res)
    return {"row": row, "utterances": len(ids), "results": results}


def compare_evals(run_dir: Path, cfg: CompareConfig, force: bool = False) -> dict:
    cfg.validate()
    run_dir = Path(run_dir)
    systems = [load_system(run_dir, spec) for spec in cfg.systems]
    judges = _check_judges(systems, cfg.judges)
    for s in systems:
        s["provenance"] = {row: model_provenance(run_dir, m) for row, m in s["model"].items()}
    order = [r for r in _row_order(judges) if any(r in s["rows"] for s in systems)]
    common = [r for r in order if all(r in s["rows"] for s in systems)]
    if not common:
        have = "; ".join(f"eval/{s['eval']}: {', '.join(r for r in order if r in s['rows']) or 'nothing'}"
                         for s in systems)
        raise ZipperError(f"nothing to compare: no row is in every system ({have})")
    tag = cfg.resolved_tag()
    out = run_dir / "eval" / tag
    inputs = {s["spec"]: s["inputs"] for s in systems}
    init_run_dir(run_dir)
    with open_stage(run_dir, f"eval-{tag}", config_dict(cfg), inputs, force=force, log=log) as stage:
        if stage is None:
            result = json.loads((out / "compare.json").read_text())
            print_comparison(result)
            return result
        result = {"run": str(run_dir), "reference": cfg.systems[0], "systems": list(cfg.systems), "alpha": ALPHA,
                  "judges": {j: systems[0]["report"]["judges"].get(j) for j in judges},
                  "rows": [compare_rows(systems, r, cfg.resamples, cfg.seed) for r in common],
                  "not_compared": {r: [s["spec"] for s in systems if r not in s["rows"]] for r in order if r not in common},
                  "perplexity": _perplexity_rows(systems)}
        result["wer_by_length"] = _length_panels(systems, result["rows"])
        result["plots"] = _plots(out, result, tag)
        write_json(out / "compare.json", result)
        write_text(out / "compare.md", render_markdown(result))
        print_comparison(result)
        stage.finish(outputs={"compare": str(out / "compare.json")})
        return result


def _perplexity_rows(systems: list[dict]) -> list[dict]:
    rows = []
    for s in systems:
        p = s["report"].get("perplexity")
        if not p:
            continue
        for model in dict.fromkeys(s["model"].values()):
            if isinstance(p.get(model), dict):
                rows.append({"system": s["spec"], "model": model, "split": p["split"], "sentences": p["sequences"],
                             "perplexity": p[model]["perplexity"], "text_tower": p["text_tower"],
                             "unchanged": p[model]["unchanged"]})
    return rows


def _length_panels(systems: list[dict], compared: list[dict]) -> dict:
    rows = []
    for c in compared:
        if _kind(c["row"])[0] == "tts_vs_target":
            continue  # bucketed by gold length only
        ids = {i for i in systems[0]["rows"][c["row"]]}
        for s in systems:
            ids &= set(s["rows"][c["row"]])
        for s in systems:
            rows += [dict(s["rows"][c["row"]][i], system=s["spec"]) for i in sorted(ids)]
    return wer_by_length_panels(rows, lambda r: r["system"])


def _plots(out: Path, result: dict, tag: str) -> list[str]:
    plots = []
    if result["wer_by_length"]:
        plot_wer_by_length(result["wer_by_length"], out / "wer_by_length.png", f"WER by utterance length: {tag}")
        plots.append("wer_by_length.png")
    fused = [r for c in result["rows"] for r in c["results"] if r.get("aligned_utterances")]
    fraction = all(r.get("aligned_fraction") is not None for r in fused)  # one x axis: fractions, else counts
    panels = {}
    for c in result["rows"]:
        kind, judge = _kind(c["row"])
        pts = [r for r in c["results"] if r.get("aligned_utterances")]
        if kind == "tts_vs_target" or len({r["aligned_utterances"] for r in pts}) < 2:
            continue
        series = panels.setdefault("ASR" if kind == "asr" else f"TTS vs gold, judge {judge}", {})
        for r in pts:
            family = f"{r['arch']}" + (f", freeze {r['freeze']}" if r["arch"] == "zipper" else "")
            x = r["aligned_fraction"] if fraction else r["aligned_utterances"]
            series.setdefault(family, []).append((x, r["wer"], r["system"]))
    stale = out / "wer_vs_aligned.png"
    if panels:
        plot_wer_vs_aligned(panels, stale, "aligned-data fraction" if fraction else "aligned utterances",
                            f"WER vs aligned data: {tag}")
        plots.append("wer_vs_aligned.png")
    elif stale.exists():  # from an earlier comparison under this tag (--force)
        stale.unlink()
    return plots
