"""`zipper eval --compare`: the side-by-side table and its paired tests on hand-made per-utterance errors
with known answers, provenance of the aligned-data fraction, plots, and every refusal with its message."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zipper_cli.atomic import write_json, write_jsonl
from zipper_cli.errors import ZipperError
from zipper_cli.metrics import score, utterance_errors, wer_by_length_panels
from zipper_cli.plots import plot_wer_by_length
from zipper_cli.rundir import marker_path
from zipper_cli.stages.compare import CompareConfig, compare_evals
from zipper_cli.stages.evaluate import length_label, render_markdown

REF = "one two three four"
IDS = [f"u{i}" for i in range(9)]
# Per-utterance word errors (of 4 words each). B - A = 1 2 0 1 2 1 3 0 -1: Wilcoxon W+ = 25.5, exact two-sided
# p = 10/128 (worked out in test_metrics.test_wilcoxon_ties_by_hand), normal p = 0.0473. C = A + 2 everywhere.
ERR_A = [0, 1, 0, 2, 0, 0, 1, 0, 2]
ERR_B = [1, 3, 0, 3, 2, 1, 4, 0, 1]
ERR_C = [e + 2 for e in ERR_A]
PNG = b"\x89PNG\r\n\x1a\n"


def hyp_with(errors: int, ref: str = REF) -> str:
    words = ref.split()
    return " ".join(["zero"] * errors + words[errors:])


def utt_rows(decode: str, row: str, ids, errors, ref: str = REF, refs=None) -> list[dict]:
    refs = refs or [ref] * len(ids)
    hyps = [hyp_with(e, r) for e, r in zip(errors, refs)]
    return [dict(u, id=i, decode=decode, row=row) for i, u in zip(ids, utterance_errors(refs, hyps))]


def make_model(run: Path, name: str, aligned: int, arch: str = "zipper", freeze: str = "text") -> str:
    write_json(run / "fused" / name / "config.json", {"arch": arch, "freeze": freeze, "aligned_utterances": aligned})
    return f"fused/{name}"


def make_eval(run: Path, tag: str, model: str, asr=None, tts=None, judges=None, ids=IDS, perplexity=None,
              refs=None) -> None:
    """eval/TAG as `zipper eval` leaves it: report.json, utterances.jsonl, its completion marker. `asr`: errors
    per utterance; `tts`: {judge: (errors vs gold, errors vs target)}."""
    report, rows = {"run": str(run), "decode": {}, "judges": {}}, []
    if asr is not None:
        r = utt_rows("asr", "asr", ids, asr, refs=refs)
        rows += r
        report["decode"]["asr"] = {"model": model, "outputs": ["text"], "split": "test",
                                   "asr": score([x["ref"] for x in r], [x["hyp"] for x in r]).to_dict()}
    if tts is not None:
        sec = report["decode"].setdefault("tts", {"model": model, "outputs": ["speech"], "split": "test"})
        for j, (gold, target) in tts.items():
            report["judges"][j] = (judges or {}).get(j, {"name": j, "version": f"{j}-v1"})
            sec.setdefault("tts", {})[j] = {}
            for name, errs in (("tts_vs_gold", gold), ("tts_vs_target", target)):
                r = utt_rows("tts", f"{name}/{j}", ids, errs, ref="five six seven eight")
                rows += r
                sec["tts"][j][name] = score([x["ref"] for x in r], [x["hyp"] for x in r]).to_dict()
    if perplexity is not None:
        report["perplexity"] = {"split": "test", "sequences": 9, "text_tower": 4.5,
                                model: {"perplexity": perplexity, "arch": "zipper", "freeze": "text",
                                        "unchanged": perplexity == 4.5}}
    write_jsonl(run / "eval" / tag / "utterances.jsonl", rows)
    write_json(run / "eval" / tag / "report.json", report)
    write_json(marker_path(run, f"eval-{tag}"), {"stage": f"eval-{tag}", "config": {}, "inputs": {}, "outputs": {}})


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_jsonl(run / "data" / "aligned.jsonl", [{"id": f"a{i}"} for i in range(1000)])
    ma, mb, mc = make_model(run, "zA", 100), make_model(run, "zB", 10), make_model(run, "sd", 100, "single-decoder", "none")
    make_eval(run, "A", ma, asr=ERR_A, tts={"ctc": (ERR_A, [0] * 9)}, perplexity=4.5)
    make_eval(run, "B", mb, asr=ERR_B, tts={"ctc": (ERR_B, ERR_A)}, perplexity=4.5)
    make_eval(run, "C", mc, asr=ERR_C, tts={"ctc": (ERR_C, ERR_C)}, perplexity=5.25)
    return run


def compare(run: Path, *systems, force: bool = False, **kw):
    kw.setdefault("resamples", 2000)
    return compare_evals(run, CompareConfig(systems=tuple(systems), **kw), force=force)


def by_row(result: dict) -> dict:
    return {c["row"]: {r["system"]: r for r in c["results"]} for c in result["rows"]}


def test_comparison_table_known_answers(run):
    res = compare(run, "A", "B", "C", tag="abc")
    rows = by_row(res)
    assert [c["row"] for c in res["rows"]] == ["asr", "tts_vs_gold/ctc", "tts_vs_target/ctc"]
    asr = rows["asr"]
    assert asr["A"]["wer"] == pytest.approx(6 / 36) and asr["B"]["wer"] == pytest.approx(15 / 36)
    assert asr["A"]["vs_reference"] is None
    vb = asr["B"]["vs_reference"]
    assert vb["delta_wer"] == pytest.approx(9 / 36)
    assert vb["wilcoxon"]["statistic"] == 25.5 and vb["wilcoxon"]["p"] == 10 / 128
    assert vb["wilcoxon"]["p_normal"] == pytest.approx(0.04734500208525525, rel=1e-9)
    assert vb["verdict"] == "n.s."  # the exact test does not reach 0.05 on 9 utterances
    vc = asr["C"]["vs_reference"]
    assert vc["wilcoxon"]["p"] == 2 / 2**9 and vc["bootstrap"]["p_two_sided"] == 0.0
    assert vc["bootstrap"]["ci95"] == [pytest.approx(0.5), pytest.approx(0.5)] and vc["verdict"] == "worse"
    # TTS vs target: B's errors against the target are ERR_A, A has none: 4 positive differences 1 2 1 2,
    # W+ = 1.5 + 3.5 + 1.5 + 3.5 = 10 (all of them), exact two-sided p = 2/16
    w = rows["tts_vs_target/ctc"]["B"]["vs_reference"]["wilcoxon"]
    assert (w["statistic"], w["n_nonzero"], w["p"]) == (10.0, 4, 2 / 16)
    # provenance: decode -> fused model config -> aligned utterances / data/aligned.jsonl
    assert (asr["A"]["aligned_utterances"], asr["A"]["aligned_fraction"]) == (100, 0.1)
    assert (asr["B"]["aligned_fraction"], asr["C"]["arch"]) == (0.01, "single-decoder")
    assert [(p["system"], p["unchanged"]) for p in res["perplexity"]] == [("A", True), ("B", True), ("C", False)]
    out = run / "eval" / "abc"
    assert json.loads((out / "compare.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    md = (out / "compare.md").read_text()
    assert "| asr | B | fused/zB | 10 (1.0%) | 41.67% | " in md and "| +25.00% |" in md and "0.0781" in md
    assert "WER by reference length (words), ASR:" in md
    for png in ("wer_by_length.png", "wer_vs_aligned.png"):  # the models differ in aligned data
        assert (out / png).read_bytes()[:8] == PNG and png in res["plots"]
    assert set(res["wer_by_length"]) == {"ASR", "TTS, judge ctc"} and set(res["wer_by_length"]["ASR"]) == {"A", "B", "C"}


def test_no_aligned_plot_when_models_share_the_data(run):
    make_eval(run, "A2", "fused/zA", asr=ERR_B)
    res = compare(run, "A", "A2")
    assert res["plots"] == ["wer_by_length.png"]
    assert not (run / "eval" / "compare-A+A2" / "wer_vs_aligned.png").exists()
    # the same errors: nothing to test
    same = compare(run, "B", "A2", tag="same")
    assert by_row(same)["asr"]["A2"]["vs_reference"]["wilcoxon"]["p"] == 1.0
    # a different comparison under a finished tag: refused, then redone with --force without the stale plot
    compare(run, "A", "B", tag="t")
    assert (run / "eval" / "t" / "wer_vs_aligned.png").exists()
    with pytest.raises(ZipperError, match="stage 'eval-t' already finished .* with a different config"):
        compare(run, "A", "A2", tag="t")
    compare(run, "A", "A2", tag="t", force=True)
    assert not (run / "eval" / "t" / "wer_vs_aligned.png").exists()


def test_partial_overlap_uses_common_utterances(run):
    make_eval(run, "P", "fused/zB", asr=ERR_B[:5] + [0, 0], ids=IDS[:5] + ["x1", "x2"])
    res = compare(run, "A", "P")
    c = res["rows"][0]
    assert c["utterances"] == 5 and by_row(res)["asr"]["P"]["scored_utterances"] == 7
    assert by_row(res)["asr"]["A"]["wer"] == pytest.approx(3 / 20)
    assert "compared on the 5 utterances all systems have (A scored 9; P scored 7)" in \
        (run / "eval" / "compare-A+P" / "compare.md").read_text()
    assert res["not_compared"] == {"tts_vs_gold/ctc": ["P"], "tts_vs_target/ctc": ["P"]}


def test_rerun_skips_and_reprints(run, capsys):
    first = compare(run, "A", "B", tag="t")
    capsys.readouterr()
    again = compare(run, "A", "B", tag="t")
    out = capsys.readouterr().out
    assert "already done" in out and "verdict" in out and again["rows"] == json.loads(json.dumps(first["rows"]))


def refused(run, *systems, **kw) -> str:
    with pytest.raises(ZipperError) as e:
        compare(run, *systems, **kw)
    return str(e.value)


def test_refusals(run):
    make_eval(run, "D", "fused/zA", asr=ERR_A, ids=[f"v{i}" for i in range(9)])
    assert refused(run, "A", "D") == ("asr: eval/A and eval/D were scored on different utterances (no id in common); "
                                      "compare evals of the same split")
    make_eval(run, "P", "fused/zA", tts={"pocketsphinx": (ERR_A, ERR_A)})
    assert refused(run, "A", "P") == ("different judges: eval/A was judged by ctc, eval/P by pocketsphinx; "
                                      "they share none")
    make_eval(run, "Q", "fused/zA", tts={"ctc": (ERR_A, ERR_A), "pocketsphinx": (ERR_A, ERR_A)})
    assert refused(run, "A", "Q") == ("different judges: eval/A was judged by ctc, eval/Q by ctc,pocketsphinx; "
                                      "pass --judges ctc to compare on the judges they share")
    assert by_row(compare(run, "A", "Q", judges=("ctc",)))["tts_vs_gold/ctc"]["Q"]["wer"] == pytest.approx(6 / 36)
    assert refused(run, "Q", "A", judges=("pocketsphinx",)) == \
        "--judges pocketsphinx: eval/A was not judged by pocketsphinx (its judges: ctc)"
    make_eval(run, "V", "fused/zA", tts={"ctc": (ERR_A, ERR_A)}, judges={"ctc": {"name": "ctc", "version": "ctc-v2"}})
    assert refused(run, "A", "V") == ("different judges: ctc is ctc-v1 in eval/A but ctc-v2 in eval/V; score both "
                                      "with the same judge")
    make_eval(run, "R", "fused/zA", asr=ERR_A, refs=["one two three five"] + [REF] * 8)
    assert refused(run, "A", "R") == ("asr: utterance u0 has reference 'one two three four' in eval/A but "
                                      "'one two three five' in eval/R: they were scored against different references")
    (run / "eval" / "B" / "utterances.jsonl").unlink()
    assert refused(run, "A", "B") == (f"--compare B: {run / 'eval' / 'B' / 'utterances.jsonl'} is missing: no "
                                      "per-utterance results for the paired tests (rerun `zipper eval --tag B --force`)")
    write_jsonl(run / "eval" / "B" / "utterances.jsonl", utt_rows("asr", "asr", IDS, ERR_B))
    assert refused(run, "A", "B") == (f"--compare B: {run / 'eval' / 'B' / 'utterances.jsonl'} has no per-utterance "
                                      "results for tts_vs_gold/ctc of decode tts, tts_vs_target/ctc of decode tts "
                                      "(rerun `zipper eval --tag B --force`)")
    make_eval(run, "T", "fused/zA", tts={"ctc": (ERR_A, ERR_A)})
    make_eval(run, "S", "fused/zA", asr=ERR_A)
    assert refused(run, "S", "T") == ("nothing to compare: no row is in every system (eval/S: asr; eval/T: "
                                      "tts_vs_gold/ctc, tts_vs_target/ctc)")
    assert refused(run, "A", "nope") == ("--compare nope: no eval/nope in " + str(run) +
                                         " (evals there: A, B, C, D, P, Q, R, S, T, V, compare-A+Q)")
    assert refused(run, "A", "compare-A+Q") == (f"--compare compare-A+Q: {run / 'eval' / 'compare-A+Q' / 'report.json'} "
                                                "is missing (eval/compare-A+Q is a comparison, not an eval of decode "
                                                "outputs)")
    assert refused(run, "A", "C:nope") == "--compare C:nope: eval/C did not score decode 'nope' (it scored asr, tts)"
    assert refused(run, "A") == ("--compare needs at least two eval tags (e.g. --compare zipper,single); the first is "
                                 "the reference")
    assert refused(run, "A", "A") == "--compare names A twice"


def test_one_decode_of_an_eval_and_ambiguous_rows(run):
    rows = utt_rows("asr", "asr", IDS, ERR_A) + utt_rows("asr2", "asr", IDS, ERR_B)
    make_eval(run, "two", "fused/zA", asr=ERR_A)
    report = json.loads((run / "eval" / "two" / "report.json").read_text())
    report["decode"]["asr2"] = dict(report["decode"]["asr"], model="fused/zB")
    write_json(run / "eval" / "two" / "report.json", report)
    write_jsonl(run / "eval" / "two" / "utterances.jsonl", rows)
    assert refused(run, "A", "two") == "--compare two: eval/two has asr rows from two decodes (asr, asr2); name one as two:DECODE"
    res = compare(run, "two:asr", "two:asr2")
    assert by_row(res)["asr"]["two:asr2"]["model"] == "fused/zB"
    assert (run / "eval" / "compare-two-asr+two-asr2" / "compare.json").exists()


def cli(*args, cwd):
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "zipper_cli.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_table_and_errors(run):
    res = cli("eval", "--run-dir", str(run), "--compare", "A,B", "--compare", "C", "--resamples", "500", cwd=run.parent)
    assert res.returncode == 0, res.stderr
    assert re.search(r"ASR\s+│\s+A\s+│\s+16\.67%\s+│\s+\S+%\s+│\s+reference", res.stdout), res.stdout
    assert re.search(r"│\s+B\s+│\s+41\.67%\s+│\s+\S+%\s+│\s+\+25\.00%\s+│\s+\[.*\]\s+│\s+0\.0781\s+│", res.stdout)
    assert "TTS vs target (ctc)" in res.stdout and "worse" in res.stdout and "n.s." in res.stdout
    assert "A: fused/zA (zipper, freeze text, 100 aligned utterances, 10.0%)" in res.stdout
    assert "<2e-03" in res.stdout  # C's bootstrap p: below the resolution of 500 resamples
    assert (run / "eval" / "compare-A+B+C" / "compare.md").exists()
    bad = cli("eval", "--run-dir", str(run), "--compare", "A,B", "--decode", "x", cwd=run.parent)
    assert (bad.returncode, bad.stderr) == (2, "error: --compare takes finished eval tags and --decode scores decode "
                                               "outputs: give one of them\n")
    bad = cli("eval", "--run-dir", str(run), "--compare", "A", cwd=run.parent)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "at least two eval tags" in bad.stderr


def test_eval_report_wer_by_length_and_markdown(tmp_path):
    """A normal eval's length table: ASR and each judge's gold-referenced TTS rows, buckets by gold length."""
    refs = ["one two", "one two", "one two three four", "one two three four five six"]
    rows = utt_rows("asr", "asr", ["a", "b", "c", "d"], [1, 0, 2, 3], refs=refs)
    rows += utt_rows("tts", "tts_vs_gold/ctc", ["a", "b", "c", "d"], [2, 2, 0, 0], refs=refs)
    rows += utt_rows("tts", "oracle_vs_gold/ctc", ["a", "b", "c", "d"], [0, 0, 0, 1], refs=refs)
    rows += utt_rows("tts", "tts_vs_target/ctc", ["a", "b", "c", "d"], [1, 1, 1, 1], refs=refs)
    panels = wer_by_length_panels(rows, lambda r: r["row"])
    assert set(panels) == {"ASR", "TTS, judge ctc"} and set(panels["TTS, judge ctc"]) == {"tts_vs_gold/ctc",
                                                                                        "oracle_vs_gold/ctc"}
    assert [(b["lo"], b["wer"]) for b in panels["ASR"]["asr"]] == [(2, 0.25), (4, 0.5), (6, 0.5)]
    named = wer_by_length_panels(rows, length_label(rows))
    assert set(named["TTS, judge ctc"]) == {"generated", "oracle (gold units)"} and set(named["ASR"]) == {"ASR"}
    two = rows + [dict(r, decode="asr2") for r in rows if r["row"] == "asr"]
    assert set(wer_by_length_panels(two, length_label(two))["ASR"]) == {"asr: ASR", "asr2: ASR"}
    plot_wer_by_length(panels, tmp_path / "w.png", "t")
    assert (tmp_path / "w.png").read_bytes()[:8] == PNG
    report = {"run": "r", "decode": {"asr": {"model": "fused/x", "outputs": ["text"], "split": "test",
                                             "asr": score(refs, ["one", "one two", "one two", "one two three"]).to_dict()}},
              "judges": {}, "wer_by_length": panels}
    md = render_markdown(report)
    assert "WER by reference length (words), ASR:" in md and "| asr | 0.250 (2) | 0.500 (1) | 0.500 (1) |" in md
