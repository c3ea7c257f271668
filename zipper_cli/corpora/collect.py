"""Gather every --corpus into one list of rows, then apply the checks that do not need audio.

Checks here (each failure is a reject with a reason, the rest goes on):
  bad_id, duplicate_id, missing_audio, empty_text, text_too_long, test_overlap.
Test sentences never appear in any other role: a non-test row whose normalised text is a test
sentence is rejected as test_overlap (the speech role has no text, so it cannot be checked).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..atomic import sha256_file
from ..text_norm import normalize_text
from .sources import (BUILTIN, UNLABELED_WINDOW_SECONDS, parse_corpus_spec, parse_subset_roles, read_kaldi,
                      read_librispeech, read_manifest, read_text_file, valid_id, _reject)

NEEDS_TEXT = ("text", "aligned", "dev", "test")
NEEDS_AUDIO = ("speech", "aligned", "dev", "test")


def collect_rows(cfg, cache_dir: Path, log) -> tuple[list[dict], list[dict], dict]:
    """Rows and rejects from every corpus and text file in `cfg`, plus input checksums for the marker."""
    from ..atomic import read_jsonl

    rows, rejects, inputs = [], [], {}
    subsets_seen: set[str] = set()
    subset_roles = parse_subset_roles(list(cfg.subset_roles))
    specs = [parse_corpus_spec(s) for s in cfg.corpus]
    if not specs:
        from ..errors import ZipperError
        raise ZipperError("--corpus is required (demo, english, librispeech:DIR, kaldi:DIR@ROLE, manifest:FILE.jsonl)")
    for spec in specs:
        if spec.kind in BUILTIN:
            from .builtin import BuiltinCorpusConfig, build_builtin_corpus

            bcfg = BuiltinCorpusConfig(name=spec.kind, seed=cfg.corpus_seed, n_text=cfg.n_text, n_speech=cfg.n_speech,
                                       n_aligned=cfg.n_aligned, n_dev=cfg.n_dev, n_test=cfg.n_test, voices=cfg.voices)
            bcfg.validate()
            corpus_dir = build_builtin_corpus(bcfg, cache_dir, workers=cfg.workers, log=log)
            for r in read_jsonl(corpus_dir / "manifest.jsonl"):
                rows.append({"id": r["id"], "role": r["role"], "text": r.get("text"), "audio": r.get("audio"),
                             "speaker": r.get("speaker"), "start": None, "end": None, "source": spec.raw})
            inputs[spec.raw] = sha256_file(corpus_dir / "manifest.jsonl")
        elif spec.kind == "librispeech":
            # Unlabeled (LibriLight) files are cut into windows the audio limits accept.
            window = min(UNLABELED_WINDOW_SECONDS, cfg.limits.max_seconds)
            got, rej, summary = read_librispeech(spec, subset_roles, check_unknown=False, window_seconds=window)
            rows += got
            rejects += rej
            subsets_seen.update(summary)
            for subset, (role, n) in summary.items():
                log(f"[tokenize] {spec.raw}: subset {subset} -> role {role} ({n} utterances)")
            listing = sorted(Path(spec.path).rglob("*.trans.txt")) + sorted(Path(spec.path).rglob("*.normalized.txt"))
            unlabeled = sorted({r["audio"] for r in got if r["text"] is None and r["role"] == "speech"})
            inputs[spec.raw] = _digest(listing, names=unlabeled)
        elif spec.kind == "kaldi":
            got, rej = read_kaldi(spec)
            rows += got
            rejects += rej
            inputs[spec.raw] = _digest([p for p in (Path(spec.path) / n for n in ("wav.scp", "text", "segments", "utt2spk")) if p.exists()])
        else:
            got, rej = read_manifest(spec)
            rows += got
            rejects += rej
            inputs[spec.raw] = sha256_file(spec.path)
    if subset_roles and not any(s.kind == "librispeech" for s in specs):
        from ..errors import ZipperError
        raise ZipperError("--subset-role applies to librispeech:DIR corpora only")
    unknown = set(subset_roles) - subsets_seen
    if unknown and subsets_seen:
        from ..errors import ZipperError
        raise ZipperError(f"--subset-role names {', '.join(sorted(unknown))}, not a subset of any librispeech:DIR "
                          f"corpus (subsets: {', '.join(sorted(subsets_seen))})")
    for path in cfg.text_files:
        got, rej = read_text_file(path)
        rows += got
        rejects += rej
        inputs[f"text-file:{path}"] = sha256_file(path)
    return rows, rejects, inputs


def _digest(paths: list[Path], names: list[str] = ()) -> str:
    """One checksum over the listing files of a corpus (the audio itself is not hashed: too slow), and
    over the names and sizes of `names` (unlabeled audio, which has no listing file)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode())
        h.update(p.read_bytes())
    for name in names:
        h.update(f"{name}\0{Path(name).stat().st_size}\0".encode())
    return h.hexdigest()


def clean_rows(rows: list[dict], max_text_words: int) -> tuple[list[dict], list[dict]]:
    """Apply the text-level checks; adds `norm` (normalised text) to each kept row."""
    kept, rejects, seen = [], [], set()
    for r in rows:
        uid, role, src = r["id"], r["role"], r["source"]
        if not valid_id(uid):
            rejects.append(_reject(src, uid, "bad_id", f"id {uid!r} is empty or holds whitespace or '/'"))
            continue
        if uid in seen:
            rejects.append(_reject(src, uid, "duplicate_id", f"id {uid} appears more than once; the first is kept"))
            continue
        seen.add(uid)
        r = dict(r, norm=None)
        if role in NEEDS_AUDIO and not r["audio"]:
            rejects.append(_reject(src, uid, "missing_audio", f"role {role} needs audio but {uid} has none"))
            continue
        if role in NEEDS_TEXT:
            r["norm"] = normalize_text(r["text"] or "")
            if not r["norm"]:
                rejects.append(_reject(src, uid, "empty_text", f"{uid}: transcript is empty after normalisation"))
                continue
            n_words = len(r["norm"].split())
            if n_words > max_text_words:
                rejects.append(_reject(src, uid, "text_too_long", f"{uid}: {n_words} words > --max-text-words {max_text_words}"))
                continue
        else:
            r["text"] = None  # the speech role is audio only, whatever the source knew
        kept.append(r)
    test_texts = {r["norm"] for r in kept if r["role"] == "test"}
    out = []
    for r in kept:
        if r["role"] != "test" and r["norm"] in test_texts:
            rejects.append(_reject(r["source"], r["id"], "test_overlap",
                                   f"{r['id']}: its sentence is in the test role; test sentences never appear elsewhere"))
        else:
            out.append(r)
    return out, rejects
