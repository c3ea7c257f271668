"""recipes/paper/results.py: RESULTS.md from a comparison, with the claims checked against its numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _result(system: str, wer: float, ref: bool) -> dict:
    vs = None if ref else {"delta_wer": wer - 0.2, "wilcoxon": {"p": 0.01}, "bootstrap": {"p_two_sided": 0.01},
                           "verdict": "worse"}
    return {"system": system, "wer": wer, "cer": wer / 2, "vs_reference": vs}


def test_results_page_pivots_by_model_and_fraction_and_checks_the_claims(tmp_path):
    run = tmp_path / "run"
    out = run / "eval" / "paper"
    out.mkdir(parents=True)
    wers = {("zipper-unfrozen", 1): 0.2, ("zipper-frozen", 1): 0.25, ("single-decoder", 1): 0.3,
            ("zipper-unfrozen", 0.1): 0.4, ("zipper-frozen", 0.1): 0.5, ("single-decoder", 0.1): 0.9}
    systems = [f"{m}-f{f:g}" for m, f in wers]
    rows = [{"row": row, "utterances": 10,
             "results": [_result(f"{m}-f{f:g}", w + (0.1 if row != "asr" else 0), i == 0)
                         for i, ((m, f), w) in enumerate(wers.items())]}
            for row in ("asr", "tts_vs_target/ctc")]
    (out / "compare.json").write_text(json.dumps({"systems": systems, "rows": rows}))
    (out / "compare.md").write_text("# title\n\n| a | b |\n\n![wer_vs_aligned.png](wer_vs_aligned.png)\n")
    (out / "wer_vs_aligned.png").write_bytes(b"png")
    res = subprocess.run([sys.executable, str(ROOT / "recipes" / "paper" / "results.py"), "--run-dir", str(run)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    page = (run / "RESULTS.md").read_text()
    assert "| zipper-unfrozen | 20.0% | 40.0% |" in page and "| single-decoder | 30.0% | 90.0% |" in page
    assert "| zipper-unfrozen | 30.0% | 50.0% |" in page  # the TTS row kind
    assert "Zipper 20.0% -> 40.0%, single decoder 30.0% -> 90.0%; supported" in page
    assert "single-decoder vs zipper-unfrozen: ΔWER +10.00%" in page and "not supported (single-decoder significantly worse)" in page
    assert "unfrozen 30.0%, frozen 35.0%; supported (zipper-frozen vs zipper-unfrozen: ΔWER +15.00%" in page
    assert "Zipper 30.0%, single decoder 40.0%; supported (single-decoder vs zipper-unfrozen" in page
    assert "![wer_vs_aligned.png](plots/wer_vs_aligned.png)" in page and (run / "plots" / "wer_vs_aligned.png").exists()
