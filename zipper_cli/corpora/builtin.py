"""Built-in corpora (`demo`, `english`): text made offline, read aloud by Festival, cached by config hash.

    corpus_dir = build_builtin_corpus(BuiltinCorpusConfig("demo", seed=0), Path("~/.cache/zipper"))
    corpus_dir / "manifest.jsonl"   {"id", "role", "text", "audio", "speaker", "duration"} per line
    corpus_dir / "wav/ID.wav"       16 kHz mono 16-bit PCM
    corpus_dir / "corpus.json"      resolved config, counts and hours per role, build time, tool versions

Every sentence is used once in the whole corpus: roles are filled from one deterministic stream in the
order test, dev, aligned, speech, text, so test never leaks into another role, and the test set depends
only on (name, seed, n_test) - asking for more text does not change it.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import sha256_json, write_json, write_jsonl
from ..errors import ZipperError
from . import demo_text, english_text, synth

VERSION = 1  # bump when a change alters the sentences or audio made for the same config
NAMES = ("demo", "english")
ROLES = ("text", "speech", "aligned", "dev", "test")  # manifest order
FILL_ORDER = ("test", "dev", "aligned", "speech", "text")  # test first: it claims its sentences before any other role
AUDIO_ROLES = ("speech", "aligned", "dev", "test")
DEFAULT_SIZES = {
    "demo": {"text": 30000, "speech": 4000, "aligned": 2000, "dev": 200, "test": 200},
    "english": {"text": 60000, "speech": 8000, "aligned": 4000, "dev": 300, "test": 300},
}
# Festival voices for every audio role: two speakers, speed variants and mild pitch variants.
DEFAULT_FESTIVAL_MIX = ("kal", "kal@0.9", "kal@1.1", "slt", "slt@0.9", "slt@1.1", "kal^+2", "slt^-2")
# espeak-ng only in the speech role and only a small share: an independent recogniser transcribes it at
# 70-95% WER (Festival: 21-38%), so it adds acoustic variety but must not dominate.
DEFAULT_ESPEAK_MIX = ("espeak:en-us", "espeak:en+f3")
DEFAULT_ESPEAK_SHARE = 0.08


@dataclass(frozen=True)
class BuiltinCorpusConfig:
    """What to synthesize; every field is part of the cache key."""

    name: str
    """Which built-in corpus: "demo" (small-vocabulary, an4-like) or "english" (WordNet + KJV Bible)."""
    seed: int = 0
    """Seed for the sentences, their split into roles and the voice of each utterance (--corpus-seed)."""
    n_text: int | None = None
    """Text-only sentences, role "text" (--n-text); None = the corpus's default."""
    n_speech: int | None = None
    """Audio-only utterances, role "speech" (--n-speech); None = the corpus's default."""
    n_aligned: int | None = None
    """(audio, transcript) pairs, role "aligned" (--n-aligned); None = the corpus's default."""
    n_dev: int | None = None
    """Held-out pairs for model selection, role "dev" (--n-dev); None = the corpus's default."""
    n_test: int | None = None
    """Held-out pairs for the final report, role "test" (--n-test); None = the corpus's default."""
    voices: str = "default"
    """Comma list of voice specs (kal, slt, espeak:en-us, kal@0.9, slt^-2, ...), used uniformly in every
    audio role (--voices); "default" = Festival kal/slt with speed and pitch variants, plus 8% espeak-ng
    in the speech role only."""

    def validate(self) -> None:
        """Raise ZipperError naming the offending flag."""
        if self.name not in NAMES:
            raise ZipperError(f"--corpus: unknown built-in corpus {self.name!r} (choose from {', '.join(NAMES)})")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ZipperError(f"--corpus-seed must be an integer >= 0 (got {self.seed!r})")
        for role in ROLES:
            n, least = getattr(self, f"n_{role}"), 1 if role in ("dev", "test") else 0
            if n is not None and (not isinstance(n, int) or n < least):
                raise ZipperError(f"--n-{role} must be >= {least} (got {n!r})")
        if self.voices != "default":
            synth.parse_voices(self.voices)

    def sizes(self) -> dict[str, int]:
        """Sentences per role with the corpus defaults filled in."""
        return {r: DEFAULT_SIZES[self.name][r] if getattr(self, f"n_{r}") is None else getattr(self, f"n_{r}")
                for r in ROLES}

    def voice_mix(self) -> tuple[list[synth.Voice], list[synth.Voice], float]:
        """(voices for every audio role, extra voices for the speech role, the extras' share)."""
        if self.voices == "default":
            return ([synth.parse_voice(v) for v in DEFAULT_FESTIVAL_MIX],
                    [synth.parse_voice(v) for v in DEFAULT_ESPEAK_MIX], DEFAULT_ESPEAK_SHARE)
        return synth.parse_voices(self.voices), [], 0.0

    def resolved(self) -> dict:
        """Everything that determines the corpus's content: the cache key."""
        mix, extra, share = self.voice_mix()
        return {"name": self.name, "seed": self.seed, "sizes": self.sizes(), "voices": [v.spec for v in mix],
                "speech_extra_voices": [v.spec for v in extra], "speech_extra_share": share, "version": VERSION}


# --- sentences ---------------------------------------------------------------------------------

def plan_sentences(cfg: BuiltinCorpusConfig) -> dict[str, list[str]]:
    """Distinct sentences per role, deterministic from (name, seed, sizes); no sentence is in two roles."""
    cfg.validate()
    sizes = cfg.sizes()
    if cfg.name == "demo":
        return _plan_demo(sizes, cfg.seed)
    return _plan_english(sizes, cfg.seed)


def _plan_demo(sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    rng = random.Random(f"demo-sentences-{seed}")  # str seeds hash with sha512: stable across runs
    seen: set[str] = set()
    plan = {}
    for role in FILL_ORDER:
        out = []
        misses = 0
        while len(out) < sizes[role]:
            s = demo_text.demo_sentence(rng)
            if s in seen:
                misses += 1
                if misses > 100_000:  # the domain has far more sentences than any sensible request
                    raise ZipperError(f"--n-{role} {sizes[role]}: the demo domain ran out of distinct sentences "
                                      f"after {len(seen)}; ask for fewer")
                continue
            seen.add(s)
            out.append(s)
        plan[role] = out
    return plan


def _plan_english(sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    audio_pool, extra = english_text.english_pools()
    audio_pool = list(audio_pool)
    rng = random.Random(f"english-sentences-{seed}")
    rng.shuffle(audio_pool)
    need = sum(sizes[r] for r in AUDIO_ROLES)
    if need > len(audio_pool):
        raise ZipperError(f"--n-speech + --n-aligned + --n-dev + --n-test = {need} exceeds the {len(audio_pool)} "
                          f"WordNet sentences of the english corpus; ask for fewer")
    plan, start = {}, 0
    for role in FILL_ORDER[:-1]:
        plan[role] = audio_pool[start:start + sizes[role]]
        start += sizes[role]
    text_pool = audio_pool[start:] + list(extra)  # disjoint by construction (english_pools)
    rng.shuffle(text_pool)
    if sizes["text"] > len(text_pool):
        raise ZipperError(f"--n-text {sizes['text']} exceeds the {len(text_pool)} sentences left for the text "
                          f"role of the english corpus; ask for fewer")
    plan["text"] = text_pool[:sizes["text"]]
    return plan


def assign_voices(plan: dict[str, list[str]], cfg: BuiltinCorpusConfig) -> dict[str, list[synth.Voice]]:
    """One voice per audio utterance, deterministic from the seed."""
    mix, extra, share = cfg.voice_mix()
    rng = random.Random(f"voices-{cfg.seed}")
    out = {}
    for role in FILL_ORDER[:-1]:
        out[role] = [rng.choice(extra) if role == "speech" and extra and rng.random() < share else rng.choice(mix)
                     for _ in plan[role]]
    return out


def utterance_id(cfg: BuiltinCorpusConfig, role: str, i: int) -> str:
    return f"{cfg.name}-s{cfg.seed}-{role}-{i:06d}"


# --- the build ---------------------------------------------------------------------------------

def corpus_dir_for(cfg: BuiltinCorpusConfig, cache_root: Path) -> Path:
    return Path(cache_root).resolve() / f"{cfg.name}-{sha256_json(cfg.resolved())[:12]}"


def build_builtin_corpus(cfg: BuiltinCorpusConfig, cache_root: Path, workers: int = 2, log=print) -> Path:
    """Build (or reuse) the corpus and return its directory, which holds manifest.jsonl and wav/.

    Cached under cache_root / f"{cfg.name}-{hash of resolved cfg}"; built in a temp dir and renamed into
    place when complete, so an interrupted build is never mistaken for a finished one; a second call with
    the same cfg returns the cached dir immediately (log says "reusing cached corpus ...").
    """
    cfg.validate()
    if not isinstance(workers, int) or workers < 1:
        raise ZipperError(f"--workers must be >= 1 (got {workers!r})")
    final = corpus_dir_for(cfg, cache_root)
    if (final / "corpus.json").is_file():
        log(f"[corpus] reusing cached corpus {final}")
        return final
    if final.exists():  # not ours to trust: no completion marker
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final)

    mix, extra, _ = cfg.voice_mix()
    if cfg.name == "english":
        english_text.check_installed()
    audio_roles = [r for r in AUDIO_ROLES if cfg.sizes()[r] > 0]
    if audio_roles:
        synth.check_voices(mix + (extra if "speech" in audio_roles else []))

    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "wav").mkdir(parents=True)
    try:
        _build_into(cfg, tmp, final, workers, log)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "corpus.json").is_file():
                raise
            log(f"[corpus] another process finished {final.name} first; using its copy")
            shutil.rmtree(tmp)
    except BaseException:  # interrupted or failed: leave nothing that looks like a corpus
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _build_into(cfg: BuiltinCorpusConfig, tmp: Path, final: Path, workers: int, log) -> None:
    t0 = time.time()
    sizes = cfg.sizes()
    log(f"[corpus] building {cfg.name} corpus (seed {cfg.seed}, " +
        ", ".join(f"{r} {sizes[r]}" for r in ROLES) + f") into {final}")
    plan = plan_sentences(cfg)
    voices = assign_voices(plan, cfg)
    speakable = demo_text.speakable if cfg.name == "demo" else (lambda s: s)

    jobs = []
    for role in AUDIO_ROLES:
        for i, (text, voice) in enumerate(zip(plan[role], voices[role])):
            uid = utterance_id(cfg, role, i)
            jobs.append(synth.Job(uid, speakable(text), voice, tmp / "wav" / f"{uid}.wav"))
    durations = synth.synthesize(jobs, workers=workers, log=log)
    if jobs and not durations:
        raise ZipperError(f"speech synthesis produced no usable audio for the {cfg.name} corpus (see the warnings "
                          f"above); check that this works: echo hello | festival --tts")

    rows, seconds = [], {r: 0.0 for r in ROLES}
    for role in ROLES:
        for i, text in enumerate(plan[role]):
            uid = utterance_id(cfg, role, i)
            if role == "text":
                rows.append({"id": uid, "role": role, "text": text, "audio": None, "speaker": None, "duration": None})
                continue
            if uid not in durations:  # failed synthesis, already warned about
                continue
            seconds[role] += durations[uid]
            rows.append({"id": uid, "role": role, "text": None if role == "speech" else text,
                         "audio": str(final / "wav" / f"{uid}.wav"), "speaker": voices[role][i].spec,
                         "duration": round(durations[uid], 4)})
    counts = {r: sum(1 for row in rows if row["role"] == r) for r in ROLES}
    if any(counts[r] < sizes[r] for r in ROLES):
        log(f"[corpus] warning: {sum(sizes.values()) - len(rows)} utterances failed and are left out")
    write_jsonl(tmp / "manifest.jsonl", rows)
    vocab = {w for role in ("text", "aligned", "dev", "test") for s in plan[role] for w in s.split()}
    write_json(tmp / "corpus.json", {  # written last: the completion marker
        "config": cfg.resolved(), "requested": asdict(cfg), "counts": counts,
        "hours": {r: round(seconds[r] / 3600, 4) for r in ROLES}, "vocab_size": len(vocab),
        "audio_format": f"{synth.SAMPLE_RATE} Hz mono 16-bit PCM WAV", "build_seconds": round(time.time() - t0, 1),
        "workers": workers, "tools": synth.tool_versions(),
    })
    log(f"[corpus] built {cfg.name} in {time.time() - t0:.0f} s: " +
        ", ".join(f"{r} {counts[r]}" + (f" ({seconds[r] / 3600:.2f} h)" if r != "text" else "") for r in ROLES))


def _remove_stale_builds(final: Path) -> None:
    """Remove temp dirs of builds of this corpus whose process is gone (killed mid-build)."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
