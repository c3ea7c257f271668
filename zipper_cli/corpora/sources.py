"""Corpus specs and the adapters for users' own data: LibriSpeech/LibriTTS, Kaldi dirs, JSONL manifests.

`--corpus` takes KIND[:PATH][@ROLE]:
  demo | english                 built-in, synthesized offline (corpora/builtin.py)
  librispeech:DIR                LibriSpeech, LibriTTS or LibriLight (unlabeled) layout; subsets map to
                                 roles (--subset-role)
  kaldi:DIR@ROLE                 wav.scp (+ text, segments, utt2spk); ROLE defaults to aligned
  manifest:FILE.jsonl[@ROLE]     one JSON object per line: id, audio and/or text, role (or @ROLE)

Every adapter returns rows {id, role, text, audio, speaker, start, end, source} and rejects
{source, id, reason, detail}; a problem with one entry is a reject, a problem with the whole source
(missing directory, no wav.scp) is a ZipperError.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ZipperError

ROLES = ("text", "speech", "aligned", "dev", "test")
BUILTIN = ("demo", "english")
KINDS = BUILTIN + ("librispeech", "kaldi", "manifest")


@dataclass(frozen=True)
class CorpusSpec:
    kind: str
    path: str | None
    role: str | None
    raw: str


def parse_corpus_spec(spec: str) -> CorpusSpec:
    """Parse one --corpus value, with an error naming the flag on anything unexpected."""
    body, role = spec, None
    if "@" in spec and spec.rsplit("@", 1)[1] in ROLES + tuple(r.upper() for r in ROLES):
        body, role = spec.rsplit("@", 1)
        role = role.lower()
    elif "@" in spec and "/" not in spec.rsplit("@", 1)[1]:
        raise ZipperError(f"--corpus {spec}: unknown role {spec.rsplit('@', 1)[1]!r} (roles: {', '.join(ROLES)})")
    kind, _, path = body.partition(":")
    if kind not in KINDS:
        raise ZipperError(f"--corpus {spec}: unknown corpus kind {kind!r} (kinds: {', '.join(KINDS)})")
    if kind in BUILTIN:
        if path or role:
            raise ZipperError(f"--corpus {spec}: the built-in corpus {kind!r} takes no path or role")
        return CorpusSpec(kind, None, None, spec)
    if not path:
        raise ZipperError(f"--corpus {spec}: {kind} needs a path, e.g. {kind}:/data/{'LibriSpeech' if kind == 'librispeech' else 'x'}")
    if not Path(path).exists():
        raise ZipperError(f"--corpus {spec}: {path} does not exist")
    if kind == "librispeech" and role:
        raise ZipperError(f"--corpus {spec}: librispeech maps subsets to roles with --subset-role NAME=ROLE, not @ROLE")
    return CorpusSpec(kind, path, role, spec)


def parse_subset_roles(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, role = pair.partition("=")
        if not sep or not name or role not in ROLES:
            raise ZipperError(f"--subset-role {pair!r}: expected NAME=ROLE with ROLE one of {', '.join(ROLES)}")
        out[name] = role
    return out


def _row(uid, role, text, audio, source, speaker=None, start=None, end=None) -> dict:
    return {"id": uid, "role": role, "text": text, "audio": audio, "speaker": speaker,
            "start": start, "end": end, "source": source}


def _reject(source, uid, reason, detail) -> dict:
    return {"source": source, "id": uid, "reason": reason, "detail": detail}


def _decode_lines(path: Path, source: str, rejects: list, first_word_is_id: bool = True) -> list[tuple[int, str]]:
    """Lines of a text file, each decoded on its own so one bad line is a reject, not a crash."""
    out = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            uid = raw.split(maxsplit=1)[0].decode("utf-8", "replace") if first_word_is_id and raw.strip() else None
            rejects.append(_reject(source, uid, "non_utf8_text", f"{path}:{n}: not valid UTF-8"))
            continue
        if line.strip():
            out.append((n, line.rstrip("\r\n")))
    return out


# ---------------------------------------------------------------------------------------------- LibriSpeech


def default_subset_role(name: str) -> str:
    n = name.lower()
    return "test" if "test" in n else "dev" if "dev" in n else "aligned"


UNLABELED_WINDOW_SECONDS = 20.0
_AUDIO_EXTS = (".flac", ".wav", ".opus", ".ogg", ".mp3")


def _has_transcripts(d: Path) -> bool:
    return bool(next(d.glob("*/*/*.trans.txt"), None) or next(d.glob("*/*/*.normalized.txt"), None))


def _has_audio(d: Path) -> bool:
    return any(next(d.glob(f"*/*/*{ext}"), None) for ext in _AUDIO_EXTS)


def read_librispeech(spec: CorpusSpec, subset_roles: dict[str, str], check_unknown: bool = True,
                     window_seconds: float = UNLABELED_WINDOW_SECONDS) -> tuple[list, list, dict]:
    """LibriSpeech (SPK/CHAP/SPK-CHAP.trans.txt + .flac), LibriTTS (ID.normalized.txt + ID.wav), or
    LibriLight (SPK/BOOK/*.flac, no transcripts).

    Subsets are the directories holding speaker folders: DIR's children, or DIR itself when it is
    one subset. A subset with audio but no transcript anywhere (LibriLight's small/medium/large) is
    unlabeled: its role is `speech` (the only one it can take), and each file longer than
    `window_seconds` is cut into equal windows no longer than that (rows with start/end, read from
    the header only), since LibriLight files are whole chapters. Returns rows, rejects and
    {subset: (role, utterances)} for the summary. `check_unknown=False` leaves the check that every
    --subset-role name exists to a caller that reads several such corpora.
    """
    root = Path(spec.path)
    usable = lambda d: _has_transcripts(d) or _has_audio(d)
    subsets = [root] if usable(root) else sorted(d for d in root.iterdir() if d.is_dir() and usable(d))
    if not subsets:
        raise ZipperError(f"--corpus {spec.raw}: no LibriSpeech (*.trans.txt), LibriTTS (*.normalized.txt) or "
                          f"LibriLight (SPK/BOOK/*.flac) subsets found under {root}")
    unknown = set(subset_roles) - {d.name for d in subsets}
    if check_unknown and unknown:
        raise ZipperError(f"--subset-role names {', '.join(sorted(unknown))}, not a subset of {root} "
                          f"(subsets: {', '.join(d.name for d in subsets)})")
    rows, rejects, summary = [], [], {}
    for subset in subsets:
        before = len(rows)
        if not _has_transcripts(subset):
            role = subset_roles.get(subset.name, "speech")
            if role != "speech":
                raise ZipperError(f"--subset-role {subset.name}={role}: {subset} has no transcripts "
                                  "(LibriLight layout), so it can only be role speech")
            rows += _unlabeled_rows(subset, spec.raw, rejects, window_seconds)
            summary[subset.name] = (role, len(rows) - before)
            continue
        role = subset_roles.get(subset.name, default_subset_role(subset.name))
        for trans in sorted(subset.glob("*/*/*.trans.txt")):  # LibriSpeech
            for n, line in _decode_lines(trans, spec.raw, rejects):
                uid, _, text = line.partition(" ")
                audio = _find_audio(trans.parent, uid)
                rows.append(_row(uid, role, text, str(audio) if audio else str(trans.parent / f"{uid}.flac"),
                                 spec.raw, speaker=uid.split("-")[0]))
        for norm in sorted(subset.glob("*/*/*.normalized.txt")):  # LibriTTS
            uid = norm.name[: -len(".normalized.txt")]
            lines = _decode_lines(norm, spec.raw, rejects)
            audio = _find_audio(norm.parent, uid)
            rows.append(_row(uid, role, " ".join(t for _, t in lines), str(audio) if audio else str(norm.parent / f"{uid}.wav"),
                             spec.raw, speaker=uid.split("_")[0]))
        summary[subset.name] = (role, len(rows) - before)
    return rows, rejects, summary


def _unlabeled_rows(subset: Path, source: str, rejects: list, window_seconds: float) -> list:
    """Speech-role rows for every audio file under SUBSET/SPK/BOOK/, long files cut into windows.

    Ids are SPK-BOOK-STEM (LibriLight stems repeat across books), with _wNNNN per window.
    """
    import soundfile as sf

    rows = []
    files = sorted(p for ext in _AUDIO_EXTS for p in subset.glob(f"*/*/*{ext}"))
    for path in files:
        spk, book = path.parent.parent.name, path.parent.name
        uid = f"{spk}-{book}-{path.stem}".replace(" ", "_").replace("/", "_")
        try:
            info = sf.info(str(path))
            seconds = info.frames / info.samplerate
        except Exception as e:  # noqa: BLE001 - any header problem is this file's reject
            rejects.append(_reject(source, uid, "unreadable", f"{path}: {' '.join(str(e).split()) or type(e).__name__}"))
            continue
        n = max(1, math.ceil(seconds / window_seconds - 1e-9)) if window_seconds > 0 else 1
        if n == 1:
            rows.append(_row(uid, "speech", None, str(path), source, speaker=spk))
            continue
        step = seconds / n
        for k in range(n):
            rows.append(_row(f"{uid}_w{k:04d}", "speech", None, str(path), source, speaker=spk,
                             start=round(k * step, 3), end=round((k + 1) * step, 3) if k < n - 1 else None))
    return rows


def _find_audio(directory: Path, uid: str) -> Path | None:
    for ext in _AUDIO_EXTS:
        if (directory / f"{uid}{ext}").exists():
            return directory / f"{uid}{ext}"
    return None


# ---------------------------------------------------------------------------------------------- Kaldi


def read_kaldi(spec: CorpusSpec) -> tuple[list, list]:
    """A Kaldi data dir: wav.scp (plain paths only), text, optional segments and utt2spk."""
    root, role, src = Path(spec.path), spec.role or "aligned", spec.raw
    rejects: list = []
    if not (root / "wav.scp").exists():
        raise ZipperError(f"--corpus {src}: {root / 'wav.scp'} not found (a Kaldi data dir needs wav.scp)")
    wavs = {}
    for n, line in _decode_lines(root / "wav.scp", src, rejects):
        uid, _, path = line.strip().partition(" ")
        path = path.strip()
        if path.endswith("|") or path.startswith("-"):
            rejects.append(_reject(src, uid, "piped_command", f"{root / 'wav.scp'}:{n}: piped commands are not run; "
                                   "write the audio to files (e.g. with sox) and list their paths"))
        elif not path:
            rejects.append(_reject(src, uid, "bad_line", f"{root / 'wav.scp'}:{n}: expected 'ID PATH'"))
        else:
            wavs[uid] = _resolve(path, root)
    texts = {}
    if (root / "text").exists():
        for _, line in _decode_lines(root / "text", src, rejects):
            uid, _, text = line.strip().partition(" ")
            texts[uid] = text
    elif role != "speech":
        raise ZipperError(f"--corpus {src}: {root / 'text'} not found (needed for role {role}; use @speech for audio only)")
    spk = {}
    if (root / "utt2spk").exists():
        spk = dict(line.split(maxsplit=1) for _, line in _decode_lines(root / "utt2spk", src, rejects) if len(line.split()) >= 2)
    rows = []
    if (root / "segments").exists():
        for n, line in _decode_lines(root / "segments", src, rejects):
            parts = line.split()
            try:
                uid, rec, start, end = parts[0], parts[1], float(parts[2]), float(parts[3])
            except (IndexError, ValueError):
                rejects.append(_reject(src, parts[0] if parts else None, "bad_line",
                                       f"{root / 'segments'}:{n}: expected 'UTT REC START END'"))
                continue
            if rec not in wavs:
                rejects.append(_reject(src, uid, "missing_file", f"{root / 'segments'}:{n}: recording {rec} not in wav.scp"))
                continue
            rows.append(_row(uid, role, texts.get(uid) if role != "speech" else None, wavs[rec], src, spk.get(uid, "").strip() or None,
                             start, end if end > 0 else None))
    else:
        for uid, path in wavs.items():
            rows.append(_row(uid, role, texts.get(uid) if role != "speech" else None, path, src, spk.get(uid, "").strip() or None))
    if role != "speech":
        have = {r["id"] for r in rows}
        for r in rows:
            if r["id"] not in texts:
                rejects.append(_reject(src, r["id"], "missing_text", f"{root / 'text'}: no transcript for {r['id']}"))
        rows = [r for r in rows if r["id"] in texts]
        for uid in sorted(set(texts) - have - {x["id"] for x in rejects}):
            rejects.append(_reject(src, uid, "missing_file", f"{root / 'wav.scp'}: no audio for {uid}"))
    return rows, rejects


# ---------------------------------------------------------------------------------------------- JSONL manifest


def read_manifest(spec: CorpusSpec) -> tuple[list, list]:
    """One JSON object per line: id, audio (path, relative to the file) and/or text, role (or @ROLE)."""
    path, src = Path(spec.path), spec.raw
    rejects: list = []
    rows = []
    for n, line in _decode_lines(path, src, rejects, first_word_is_id=False):
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rejects.append(_reject(src, None, "bad_line", f"{where}: not JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), (str, int)) or str(obj.get("id")).strip() == "":
            rejects.append(_reject(src, None, "bad_line", f"{where}: expected an object with a non-empty 'id'"))
            continue
        uid = str(obj["id"])
        role = spec.role or obj.get("role")
        if role is None:
            rejects.append(_reject(src, uid, "missing_role", f"{where}: no 'role' (or give @ROLE after the path)"))
            continue
        if role not in ROLES:
            rejects.append(_reject(src, uid, "unknown_role", f"{where}: role {role!r} is not one of {', '.join(ROLES)}"))
            continue
        audio, text = obj.get("audio"), obj.get("text")
        if audio is not None and not isinstance(audio, str) or text is not None and not isinstance(text, str):
            rejects.append(_reject(src, uid, "bad_line", f"{where}: 'audio' and 'text' must be strings"))
            continue
        if audio:
            audio = str((path.parent / audio).resolve())
        rows.append(_row(uid, role, text, audio, src, obj.get("speaker"), obj.get("start"), obj.get("end")))
    return rows, rejects


def _resolve(path: str, data_dir: Path) -> str:
    """Kaldi resolves relative wav.scp paths from the recipe's working directory; fall back to the data dir."""
    p = Path(path)
    if not p.is_absolute():
        p = p if p.exists() else data_dir / p
    return str(p.resolve())


def read_text_file(path: str) -> tuple[list, list]:
    """--text-file: extra text-only data, one sentence per line, for the text role."""
    p = Path(path)
    if not p.is_file():
        raise ZipperError(f"--text-file {path}: no such file")
    rejects: list = []
    rows = [_row(f"{p.stem}-{n:08d}", "text", line, None, f"text-file:{path}")
            for n, line in _decode_lines(p, f"text-file:{path}", rejects, first_word_is_id=False)]
    return rows, rejects


_ID_OK = re.compile(r"^[^\s]+$")


def valid_id(uid: str) -> bool:
    """Ids become file names of WAV outputs later: no whitespace, no path separators."""
    return bool(_ID_OK.match(uid)) and "/" not in uid and uid not in (".", "..")
