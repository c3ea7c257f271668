"""Offline speech synthesis for the built-in corpora: Festival (main) and espeak-ng, 16 kHz mono 16-bit WAV.

Voice specs: `kal`, `slt` (Festival), `espeak:VOICE` (espeak-ng, e.g. espeak:en-us, espeak:en+f3),
each with an optional `@STRETCH` (durations x STRETCH: 1.1 is slower) and `^SEMITONES` (pitch shift
via sox), e.g. `kal@0.9`, `slt^-2`, `kal@1.1^+2`.

Speed: one Festival process synthesizes a whole chunk of utterances from one Scheme script (start-up
~0.3 s; per 2 s utterance ~25 ms with kal, ~150 ms with the HTS voice slt); chunks run in parallel.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ..errors import ZipperError

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.3  # shorter output is a failed synthesis (and the tokenizer would reject it anyway)

# spec name -> (Scheme function selecting it, name in (voice.list), Debian package)
FESTIVAL_VOICES = {
    "kal": ("voice_kal_diphone", "kal_diphone", "festvox-kallpc16k"),
    "slt": ("voice_cmu_us_slt_arctic_hts", "cmu_us_slt_arctic_hts", "festvox-us-slt-hts"),
}
SPEC_HELP = "kal, slt or espeak:VOICE, optionally with @STRETCH and ^SEMITONES, e.g. kal@0.9, slt^-2"
_SPEC = re.compile(r"(kal|slt|espeak:[A-Za-z0-9_+\-]+)(?:@([0-9]*\.?[0-9]+))?(?:\^([+-]?[0-9]*\.?[0-9]+))?")


@dataclass(frozen=True)
class Voice:
    engine: str  # "festival" or "espeak"
    name: str  # "kal", "slt" or an espeak-ng voice name
    stretch: float = 1.0
    semitones: float = 0.0

    @property
    def spec(self) -> str:
        """Canonical spec string; also the `speaker` recorded in the manifest."""
        s = self.name if self.engine == "festival" else f"espeak:{self.name}"
        s += f"@{self.stretch:g}" if self.stretch != 1.0 else ""
        return s + (f"^{self.semitones:+g}" if self.semitones else "")


def parse_voice(spec: str) -> Voice:
    m = _SPEC.fullmatch(spec.strip())
    if not m:
        raise ZipperError(f"--voices: cannot parse voice {spec!r} (expected {SPEC_HELP})")
    name, stretch, semitones = m.group(1), float(m.group(2) or 1.0), float(m.group(3) or 0.0)
    if not 0.5 <= stretch <= 2.0:
        raise ZipperError(f"--voices: stretch in {spec!r} must be in [0.5, 2.0] (got {stretch:g})")
    if not -12 <= semitones <= 12:
        raise ZipperError(f"--voices: pitch shift in {spec!r} must be in [-12, 12] semitones (got {semitones:g})")
    if name.startswith("espeak:"):
        return Voice("espeak", name[len("espeak:"):], stretch, semitones)
    return Voice("festival", name, stretch, semitones)


def parse_voices(specs: str) -> list[Voice]:
    voices = [parse_voice(s) for s in specs.split(",") if s.strip()]
    if not voices:
        raise ZipperError(f"--voices: no voice given in {specs!r} (expected a comma list of {SPEC_HELP})")
    return voices


def _version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def tool_versions() -> dict:
    return {"festival": _version(["festival", "--version"]), "espeak-ng": _version(["espeak-ng", "--version"]),
            "sox": _version(["sox", "--version"])}


def check_voices(voices: list[Voice]) -> None:
    """Raise a one-line ZipperError naming what to apt-get install if a tool or voice is missing."""
    fest = sorted({v.name for v in voices if v.engine == "festival"})
    if fest:
        if shutil.which("festival") is None:
            pkgs = " ".join(FESTIVAL_VOICES[n][2] for n in fest)
            raise ZipperError(f"festival is not installed; install with: apt-get install -y festival {pkgs}")
        # Select each voice and say one word: catches missing voices and a missing lexicon alike.
        # One form per voice: an error aborts the whole form, so "OK" is printed only if all of it worked.
        probe = "".join(f'(begin ({FESTIVAL_VOICES[n][0]}) (utt.synth (Utterance Text "hello")) '
                        f'(format t "OK {n}\\n"))\n' for n in fest)
        out = subprocess.run(["festival", "--pipe"], input=probe, capture_output=True, text=True, timeout=120)
        broken = [n for n in fest if f"OK {n}" not in out.stdout]
        if broken:
            pkgs = " ".join(FESTIVAL_VOICES[n][2] for n in broken)
            err = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise ZipperError(f"festival cannot speak with voice(s) {', '.join(broken)} ({err}); "
                              f"install with: apt-get install -y festival festlex-cmu {pkgs}")
    espeak = sorted({v.name for v in voices if v.engine == "espeak"})
    if espeak and shutil.which("espeak-ng") is None:
        raise ZipperError("espeak-ng is not installed; install with: apt-get install -y espeak-ng")
    for name in espeak:
        if subprocess.run(["espeak-ng", "-v", name, "-q", "test"], capture_output=True, timeout=30).returncode != 0:
            raise ZipperError(f"--voices: espeak-ng has no voice {name!r} (list them with: espeak-ng --voices=en)")
    # sox converts espeak's 22.05 kHz output and does the pitch shifts.
    if (espeak or any(v.semitones for v in voices)) and shutil.which("sox") is None:
        raise ZipperError("sox is not installed (needed for espeak voices and ^pitch shifts); "
                          "install with: apt-get install -y sox")


@dataclass(frozen=True)
class Job:
    uid: str
    text: str  # what the voice says (may differ from the transcript, e.g. capitalised letters)
    voice: Voice
    path: Path  # the final 16 kHz WAV


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _raw_path(job: Job) -> Path:
    """Where the engine writes: the final path, or a side file when sox post-processes it."""
    return job.path.with_suffix(".raw.wav") if job.voice.semitones or job.voice.engine == "espeak" else job.path


def _festival_script(jobs: list[Job]) -> str:
    lines, current = [], None
    for job in jobs:
        v = job.voice
        if (v.name, v.stretch) != current:  # jobs come sorted by voice, so this switches rarely
            current = (v.name, v.stretch)
            lines.append(f"({FESTIVAL_VOICES[v.name][0]})")
            lines.append(f"(Parameter.set 'Duration_Stretch {v.stretch:g})")
            if v.name == "slt":  # the HTS engine ignores Duration_Stretch; its -r is a speed factor
                lines.append(f"(set! hts_engine_params (append cmu_us_slt_arctic_hts::hts_engine_params "
                             f"'((\"-r\" {1 / v.stretch:.6f}))))")
        lines.append(f"(set! u (utt.synth (Utterance Text {_scheme_string(job.text)})))")
        lines.append(f"(utt.wave.resample u {SAMPLE_RATE})")  # slt is 32 kHz
        lines.append(f"(utt.save.wave u {_scheme_string(str(_raw_path(job)))} 'riff)")
    return "\n".join(lines) + "\n"


def _run_festival(jobs: list[Job], log) -> None:
    """Synthesize `jobs` in one Festival process; on a crash, skip the utterance it died on and go on."""
    pending, fruitless = list(jobs), 0
    while pending:
        with tempfile.NamedTemporaryFile("w", suffix=".scm", delete=False) as f:
            f.write(_festival_script(pending))
        try:
            proc = subprocess.run(["festival", "-b", f.name], capture_output=True, text=True,
                                  timeout=120 + 5 * len(pending))
            err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            err = "timed out"
        finally:
            Path(f.name).unlink()
        missing = [j for j in pending if not _raw_path(j).exists()]
        if not missing:
            return
        # Festival stops at the first error, so the first missing utterance is the culprit: skip it, retry
        # the rest. Twice in a row with no output at all means Festival itself is broken: give up.
        fruitless = fruitless + 1 if len(missing) == len(pending) else 0
        log(f"[corpus] warning: festival failed on {missing[0].uid} ({missing[0].voice.spec}: "
            f"{missing[0].text!r}): {err}; skipping it")
        pending = missing[1:]
        if fruitless >= 2 and pending:
            log(f"[corpus] warning: festival produces no audio ({err}); skipping {len(pending)} more utterances")
            return


def _run(cmd: list[str], job: Job, log) -> bool:
    """Run one helper program for `job`; a failure is a warning, never a crash."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log(f"[corpus] warning: {cmd[0]} failed on {job.uid}: {e}")
        return False
    if proc.returncode != 0:
        log(f"[corpus] warning: {cmd[0]} failed on {job.uid}: {proc.stderr.strip()[:200]}")
    return proc.returncode == 0


def _run_espeak(job: Job, log) -> None:
    wpm = round(175 / job.voice.stretch)  # espeak-ng's default rate is 175 words per minute
    _run(["espeak-ng", "-v", job.voice.name, "-s", str(wpm), "-w", str(_raw_path(job)), job.text], job, log)


def _postprocess(job: Job, log) -> None:
    """Bring engine output to 16 kHz mono 16-bit, applying the pitch shift; drop the raw file."""
    raw = _raw_path(job)
    if raw == job.path or not raw.exists():
        return
    effects = ["rate", "-h", str(SAMPLE_RATE)]
    if job.voice.semitones:
        # sox's pitch effect overshoots full scale on loud input: leave headroom first.
        effects = ["gain", "-4", "pitch", f"{100 * job.voice.semitones:g}"] + effects
    # -D: no dither, which is random and would make the audio differ from build to build.
    cmd = ["sox", "-D", str(raw), "-c", "1", "-b", "16", "-e", "signed-integer", str(job.path)] + effects
    if not _run(cmd, job, log):
        job.path.unlink(missing_ok=True)
    raw.unlink()


def _check(job: Job, log) -> float | None:
    """Duration in seconds if the file is a usable 16 kHz mono WAV, else None (and a warning)."""
    try:
        audio, sr = sf.read(job.path, dtype="int16", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError):
        log(f"[corpus] warning: no usable audio for {job.uid} ({job.voice.spec}: {job.text!r}); skipping it")
        return None
    seconds = len(audio) / sr
    if sr != SAMPLE_RATE or audio.shape[1] != 1 or seconds < MIN_SECONDS or np.abs(audio).max() < 50:
        log(f"[corpus] warning: {job.uid} is {seconds:.2f} s at {sr} Hz, {audio.shape[1]} ch "
            f"(too short, silent or wrong format); skipping it")
        job.path.unlink()
        return None
    return seconds


def _run_chunk(chunk: list[Job], log) -> dict[str, float]:
    fest = [j for j in chunk if j.voice.engine == "festival"]
    if fest:
        _run_festival(fest, log)
    for job in chunk:
        if job.voice.engine == "espeak":
            _run_espeak(job, log)
        _postprocess(job, log)
    return {j.uid: d for j in chunk if (d := _check(j, log)) is not None}


def synthesize(jobs: list[Job], workers: int = 2, log=print) -> dict[str, float]:
    """Synthesize every job to job.path; return {uid: seconds} for those that succeeded.

    Jobs are sorted by voice so a chunk rarely switches voices, then cut into contiguous chunks of
    100-400 utterances: big enough that a Festival start-up (~0.3 s) is noise, small enough that the
    workers finish together (slt costs ~6x kal per second of audio) and progress shows.
    """
    if not jobs:
        return {}
    ordered = sorted(jobs, key=lambda j: (j.voice.engine, j.voice.name, j.voice.stretch, j.voice.semitones, j.uid))
    size = min(400, max(100, math.ceil(len(ordered) / (4 * workers))))
    chunks = [ordered[i:i + size] for i in range(0, len(ordered), size)]
    durations: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads suffice: the work is in subprocesses
        for i, got in enumerate(pool.map(lambda c: _run_chunk(c, log), chunks), 1):
            durations.update(got)
            log(f"[corpus] synthesized chunk {i}/{len(chunks)} ({len(durations)}/{len(jobs)} utterances, "
                f"{sum(durations.values()) / 3600:.2f} h)")
    return durations
