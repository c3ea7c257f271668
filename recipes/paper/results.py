"""Write RESULTS.md for recipes/paper/run.sh from its `zipper eval --compare` output.

Systems are eval tags named MODEL-fFRACTION (zipper-unfrozen-f0.1, single-decoder-f1, ...). The page holds
the WER of every (model, fraction) per row kind, the paper's claims checked against those numbers (each
claim: the measured values and whether they support it), the text-perplexity retention, the full
comparison table with significance tests, and the plots.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

MODELS = ("zipper-unfrozen", "zipper-frozen", "single-decoder")


def parse(system: str) -> tuple[str, float]:
    m = re.fullmatch(r"(.+)-f([0-9.]+)", system)
    if not m:
        raise SystemExit(f"results.py: system {system!r} is not named MODEL-fFRACTION")
    return m.group(1), float(m.group(2))


def wer_table(result: dict) -> dict[str, dict[tuple[str, float], dict]]:
    """row kind -> (model, fraction) -> that system's result (WER, CER, test against the reference)."""
    out: dict[str, dict] = {}
    for c in result["rows"]:
        out[c["row"]] = {parse(r["system"]): r for r in c["results"]}
    return out


def pivot(rows: dict[tuple[str, float], dict], fractions: list[float]) -> list[str]:
    models = [m for m in MODELS if any((m, f) in rows for f in fractions)]
    lines = ["| model | " + " | ".join(f"{f:g} aligned" for f in fractions) + " |",
             "|---" * (len(fractions) + 1) + "|"]
    for m in models:
        cells = [f"{rows[(m, f)]['wer']:.1%}" if (m, f) in rows else "-" for f in fractions]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def claims(table: dict, fractions: list[float]) -> list[str]:
    """The paper's claims, each with the measured numbers that bear on it."""
    lines = []
    asr = table.get("asr", {})
    tts = {row: v for row, v in table.items() if row.startswith("tts_vs_target")}
    top = max(fractions)

    def w(rows, m, f):
        return rows.get((m, f), {}).get("wer")

    a_z, a_s = w(asr, "zipper-unfrozen", top), w(asr, "single-decoder", top)
    if a_z is not None and a_s is not None:
        lines.append(f"- **ASR about equal (paper: Zipper 2.95-3.54 vs single decoder 3.49-3.78 on test-clean).** "
                     f"At fraction {top:g}: Zipper (speech unfrozen) {a_z:.1%}, single decoder {a_s:.1%}; "
                     f"{_verdict(asr, 'zipper-unfrozen', 'single-decoder', top)}.")
    for row, rows in sorted(tts.items()):
        z, s, fz = w(rows, "zipper-unfrozen", top), w(rows, "single-decoder", top), w(rows, "zipper-frozen", top)
        if z is not None and s is not None:
            lines.append(f"- **TTS clearly better for Zipper ({row}; paper: 17.70-27.87 vs 32.35-33.38 vs gold).** "
                         f"At fraction {top:g}: Zipper {z:.1%}, single decoder {s:.1%}; "
                         f"{_better(rows, 'zipper-unfrozen', 'single-decoder', top)}.")
        if z is not None and fz is not None:
            lines.append(f"- **TTS better with the speech tower unfrozen ({row}; paper: 20.14 vs 27.87).** "
                         f"At fraction {top:g}: unfrozen {z:.1%}, frozen {fz:.1%}; "
                         f"{_better(rows, 'zipper-unfrozen', 'zipper-frozen', top)}.")
    if len(fractions) > 1 and asr:
        low = min(fractions)
        deg = {m: (w(asr, m, low), w(asr, m, top)) for m in ("zipper-unfrozen", "single-decoder")}
        if all(a is not None and b is not None for a, b in deg.values()):
            (zl, zt), (sl, st) = deg["zipper-unfrozen"], deg["single-decoder"]
            graceful = (zl - zt) < (sl - st)
            lines.append(f"- **Zipper degrades more gracefully as aligned data shrinks (paper at 1%: ~16 vs ~103 "
                         f"WER).** ASR WER from fraction {top:g} to {low:g}: Zipper {zt:.1%} -> {zl:.1%}, single "
                         f"decoder {st:.1%} -> {sl:.1%}; {'supported' if graceful else 'not supported'} by these numbers.")
    return lines


def _paired(rows, a, b, f):
    """The paired test between a and b at fraction f, when one of them is the reference: (the other one,
    its vs_reference result, the test as text); else None."""
    for x, y in ((a, b), (b, a)):
        r = rows.get((y, f), {}).get("vs_reference")
        if r is not None and rows.get((x, f), {}).get("vs_reference") is None:
            return y, r, (f"{y} vs {x}: ΔWER {r['delta_wer']:+.2%}, Wilcoxon p {r['wilcoxon']['p']:.3g}, "
                          f"bootstrap p {r['bootstrap']['p_two_sided']:.3g}")
    return None


def _better(rows, a, b, f) -> str:
    """'a better than b' judged by the paired tests when one of them is the reference; else by the WERs."""
    paired = _paired(rows, a, b, f)
    if paired is None:
        wa, wb = rows[(a, f)]["wer"], rows[(b, f)]["wer"]
        return f"{'supported' if wa < wb else 'not supported'} by the WERs alone (no paired test between them)"
    y, r, test = paired
    if r["verdict"] == "n.s.":
        return f"not shown ({test}: no significant difference)"
    held = (r["verdict"] == "worse") == (y == b)  # b, the other one, significantly worse than a
    return f"{'supported' if held else 'contradicted'} ({test}: {y} significantly {r['verdict']})"


def _verdict(rows, a, b, f) -> str:
    """'About equal' judged by the paired tests of a against b (when one of them is the reference)."""
    paired = _paired(rows, a, b, f)
    if paired is None:
        return "no direct paired test (neither is the reference)"
    y, r, test = paired
    held = "supported (no significant difference)" if r["verdict"] == "n.s." else \
        f"not supported ({y} significantly {r['verdict']})"
    return f"{test}: {held}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--compare", default="paper", help="eval tag of the comparison")
    p.add_argument("--command", default="recipes/paper/run.sh", help="the command that produced the run")
    p.add_argument("--out", type=Path, help="where to write (default RUN_DIR/RESULTS.md); plots go to plots/ beside it")
    a = p.parse_args()
    dest = a.out or a.run_dir / "RESULTS.md"
    (dest.parent / "plots").mkdir(parents=True, exist_ok=True)
    out = a.run_dir / "eval" / a.compare
    result = json.loads((out / "compare.json").read_text())
    table = wer_table(result)
    fractions = sorted({f for rows in table.values() for _, f in rows}, reverse=True)
    fused = {s: json.loads((a.run_dir / "fused" / s / "config.json").read_text()) for s in result["systems"]
             if (a.run_dir / "fused" / s / "config.json").exists()}
    stages = {s: json.loads((a.run_dir / "stages" / f"fuse-{s}.done.json").read_text())
              for s in result["systems"] if (a.run_dir / "stages" / f"fuse-{s}.done.json").exists()}
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    lines = ["# The paper's comparisons, reproduced on the demo corpus", "",
             f"Produced by `{a.command}` on {datetime.now(timezone.utc):%Y-%m-%d} (zipper {rev}, "
             f"{platform.machine()}, {platform.processor() or 'cpu'}). Every number below is measured in this run; "
             "nothing is copied from the paper except the quoted reference values.", ""]
    budgets = set()
    for s in result["systems"]:
        marker = a.run_dir / "stages" / f"fuse-{s}.done.json"
        if marker.exists():
            t = json.loads(marker.read_text())["config"]["train"]
            budgets.add(f"{t['max_steps']} optimizer steps of at most {t['max_tokens']} padded tokens")
    lines += [f"Compute budget per model: {' / '.join(sorted(budgets)) or '?'} (train time is wall clock on this "
              "machine, shared with other jobs).", ""]
    lines += ["## Models", "", "| system | arch | frozen | aligned utterances | params | trainable | dev ASR loss "
              "(step 0 -> end) | dev TTS loss (step 0 -> end) | train time |", "|---|---|---|---|---|---|---|---|---|"]
    for s in result["systems"]:
        c, st = fused.get(s, {}), stages.get(s, {}).get("outputs", {})
        ini, fin = st.get("initial", {}), st.get("final", {})

        def loss(k):
            return f"{ini[k]:.3f} -> {fin[k]:.3f}" if k in ini and k in fin else "-"
        metrics = a.run_dir / "fused" / s / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
        secs = max((r.get("elapsed", 0) for r in rows), default=0)
        lines.append(f"| {s} | {c.get('arch', '?')} | {c.get('freeze', '?')} | {c.get('aligned_utterances', '?')} | "
                     f"{st.get('params', 0) / 1e6:.2f}M | {st.get('trainable_params', 0) / 1e6:.2f}M | "
                     f"{loss('dev_asr_loss')} | {loss('dev_tts_loss')} | {f'{secs / 60:.1f} min' if secs else '-'} |")
    lines += ["", "## WER by model and aligned fraction", ""]
    for row, rows in table.items():
        lines += [f"### {row}", ""] + pivot(rows, fractions) + [""]
    lines += ["## The paper's claims against these numbers", ""] + (claims(table, fractions) or ["- (not enough systems)"])
    lines += ["", "## Full comparison (paired tests against the first system)", ""]
    body = (out / "compare.md").read_text().splitlines()
    for png in out.glob("*.png"):
        shutil.copyfile(png, dest.parent / "plots" / png.name)
    lines += [ln.replace("](", "](plots/") if ln.startswith("![") else ln for ln in body[1:]]
    tmp = dest.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(dest)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
