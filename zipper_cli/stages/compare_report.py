"""How a comparison reads (`zipper eval --compare`, stages/compare.py): compare.md, the terminal table
with a legend of the systems' models, and the WER-by-length tables that eval's report.md shares."""

from __future__ import annotations

from ..console import console, log


def _aligned(r: dict) -> str:
    if not r.get("aligned_utterances"):
        return "-"
    frac = f" ({r['aligned_fraction']:.1%})" if r.get("aligned_fraction") is not None else ""
    return f"{r['aligned_utterances']}{frac}"


def _p_boot(b: dict) -> str:
    """A bootstrap p of 0 means below the resampling's resolution."""
    return f"{b['p_two_sided']:.3g}" if b["p_two_sided"] > 0 else f"<{1 / b['resamples']:.0e}"


def _test_cells(r: dict) -> list[str]:
    """WER, CER, dWER, 95% CI, p Wilcoxon, p bootstrap, verdict, utterances."""
    v = r["vs_reference"]
    if v is None:
        tail = ["reference", "", "", "", ""]
    else:
        lo, hi = v["bootstrap"]["ci95"]
        tail = [f"{v['delta_wer']:+.2%}", f"[{lo:+.2%}, {hi:+.2%}]", f"{v['wilcoxon']['p']:.3g}",
                _p_boot(v["bootstrap"]), v["verdict"]]
    return [f"{r['wer']:.2%}", f"{r['cer']:.2%}"] + tail + [str(r["utterances"])]


def _row_label(row: str) -> str:
    kind, _, judge = row.partition("/")
    return {"asr": "ASR", "tts_vs_gold": f"TTS vs gold ({judge})", "tts_vs_target": f"TTS vs target ({judge})"}[kind]


def _systems_legend(result: dict) -> list[str]:
    """One line per (system, model): what the model is and the aligned data it was fine-tuned on."""
    seen, lines = set(), []
    for c in result["rows"]:
        for r in c["results"]:
            if (r["system"], r["model"]) in seen:
                continue
            seen.add((r["system"], r["model"]))
            what = ", ".join(x for x in (r.get("arch"), f"freeze {r['freeze']}" if r.get("freeze") else None) if x)
            aligned = f", {r['aligned_utterances']} aligned utterances" if r.get("aligned_utterances") else ""
            if r.get("aligned_fraction") is not None:
                aligned += f", {r['aligned_fraction']:.1%}"
            lines.append(f"{r['system']}: {r['model'] or '?'}" + (f" ({what}{aligned})" if what or aligned else ""))
    return lines


TEST_HEADER = ["WER", "CER", "ΔWER", "95% CI", "p Wilcoxon", "p bootstrap", "verdict", "utts"]
MD_HEADER = ["row", "system", "model", "aligned"] + TEST_HEADER


def _notes(result: dict) -> list[str]:
    notes = [f"not compared: {row} (missing in {', '.join(lacking)})" for row, lacking in result["not_compared"].items()]
    for c in result["rows"]:
        partial = [f"{r['system']} scored {r['scored_utterances']}" for r in c["results"]
                   if r["scored_utterances"] != c["utterances"]]
        if partial:
            notes.append(f"{c['row']}: compared on the {c['utterances']} utterances all systems have ({'; '.join(partial)})")
    return notes


def render_markdown(result: dict) -> str:
    lines = [f"# zipper eval --compare: {result['run']}", "",
             f"Reference: {result['reference']}. Each row is scored on the utterances every system has; ΔWER = "
             f"WER - reference WER with its paired-bootstrap 95% interval; two-sided p of the Wilcoxon signed-rank "
             f"test and of the paired bootstrap on per-utterance word errors; verdict better/worse when both are "
             f"below {result['alpha']}.", "",
             "| " + " | ".join(MD_HEADER) + " |", "|---" * len(MD_HEADER) + "|"]
    for c in result["rows"]:
        lines += ["| " + " | ".join([c["row"], r["system"], r["model"] or "-", _aligned(r)] + _test_cells(r)) + " |"
                  for r in c["results"]]
    lines.append("")
    lines += [f"Note: {n}." for n in _notes(result)]
    if result["judges"]:
        lines += [""] + [f"Judge {j}: {info['version'] if info else '?'}." for j, info in result["judges"].items()]
    if result["perplexity"]:
        lines += ["", "| system | model | text perplexity | text tower alone | unchanged |", "|---|---|---|---|---|"]
        lines += [f"| {p['system']} | {p['model']} | {p['perplexity']:.4f} | {p['text_tower']:.4f} | "
                  f"{'yes, exactly' if p['unchanged'] else 'no'} |" for p in result["perplexity"]]
    lines.append("")
    lines += length_markdown(result.get("wer_by_length", {}))
    lines += [f"![{p}]({p})" for p in result.get("plots", [])]
    return "\n".join(lines) + "\n"


def length_markdown(panels: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Markdown tables of wer_by_length_panels: one per panel, a column per bucket, "WER (utterances)"."""
    lines = []
    for panel, series in panels.items():
        buckets = sorted({(b["lo"], b["hi"]) for rows in series.values() for b in rows})
        lines += [f"WER by reference length (words), {panel}:", "",
                  "| | " + " | ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in buckets) + " |",
                  "|---" * (len(buckets) + 1) + "|"]
        for name, rows in series.items():
            cell = {(b["lo"], b["hi"]): f"{b['wer']:.3f} ({b['utterances']})" for b in rows}
            lines.append(f"| {name} | " + " | ".join(cell.get(bk, "") for bk in buckets) + " |")
        lines.append("")
    return lines


def print_comparison(result: dict) -> None:
    """The comparison as a rich table (rows grouped by task), a legend of the systems' models, the notes."""
    from rich.table import Table

    table = Table(title=f"zipper eval --compare (reference {result['reference']}; verdict: both tests below "
                        f"{result['alpha']})")
    for col in ["task", "system"] + TEST_HEADER:
        table.add_column(col, justify="left" if col in ("task", "system", "95% CI", "verdict") else "right")
    for c in result["rows"]:
        for k, r in enumerate(c["results"]):
            table.add_row(_row_label(c["row"]) if k == 0 else "", r["system"], *_test_cells(r),
                          end_section=k == len(c["results"]) - 1)
    if console.is_terminal:
        console.print(table)
    else:  # a log or a pipe: the table's natural width, not 80 columns of wrapped cells
        from rich.console import Console
        from rich.measure import Measurement

        width = Measurement.get(console, console.options.update(width=400), table).maximum
        Console(highlight=False, width=max(console.width, width), file=console.file).print(table)
    for line in _systems_legend(result) + _notes(result):
        log(line)
    for p in result["perplexity"]:
        log(f"text perplexity {p['system']} ({p['model']}): {p['perplexity']:.4f}"
            f"{' (unchanged, exactly)' if p['unchanged'] else ''}")
