"""Token shards: per role, numbered .npz files of flat token arrays + offsets (no pickle, safe to load).

tokens/ROLE/shard-00000.npz holds, for up to `shard_size` utterances:
  ids               [N] unicode
  text, text_off    flat int32 text tokens and [N+1] int64 offsets (empty span: no text)
  speech, speech_off   the same for speech units
  durations         [N] float32 seconds (0 for text-only rows)
  text_tok, speech_tok   0-d strings: checksums of the tokenizers that made them
  rejects           0-d string: JSON list of the rejects found while making this shard
tokens/ROLE/index.json lists the shards and is written when the role is complete.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path, write_json
from .errors import ZipperError


@dataclass
class Shard:
    ids: list[str]
    text: list[np.ndarray | None]
    speech: list[np.ndarray | None]
    durations: list[float]
    text_tok: str
    speech_tok: str
    rejects: list[dict]


def _flat(seqs: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    lengths = [0 if s is None else len(s) for s in seqs]
    off = np.zeros(len(seqs) + 1, dtype=np.int64)
    off[1:] = np.cumsum(lengths)
    parts = [np.asarray(s, dtype=np.int32) for s in seqs if s is not None and len(s)]
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), off


def write_shard(path: Path, shard: Shard) -> None:
    text, text_off = _flat(shard.text)
    speech, speech_off = _flat(shard.speech)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=np.array(shard.ids, dtype=str), text=text, text_off=text_off, speech=speech,
                     speech_off=speech_off, durations=np.array(shard.durations, dtype=np.float32),
                     text_tok=np.array(shard.text_tok), speech_tok=np.array(shard.speech_tok),
                     rejects=np.array(json.dumps(shard.rejects)))


def read_shard(path: Path) -> Shard:
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = [str(x) for x in z["ids"]]

            def split(flat, off):
                return [flat[off[i]:off[i + 1]] if off[i + 1] > off[i] else None for i in range(len(ids))]

            return Shard(ids, split(z["text"], z["text_off"]), split(z["speech"], z["speech_off"]),
                         [float(d) for d in z["durations"]], str(z["text_tok"]), str(z["speech_tok"]),
                         json.loads(str(z["rejects"])))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ZipperError(f"{path}: unreadable token shard ({' '.join(str(e).split())}); rerun zipper tokenize --force") from None


def write_index(role_dir: Path, info: dict) -> None:
    write_json(role_dir / "index.json", info)


def load_role(run_dir: Path, role: str, text_tok: str | None = None, speech_tok: str | None = None) -> list[dict]:
    """All utterances of one role as dicts {id, text, speech, duration}, checking tokenizer checksums.

    text_tok / speech_tok: the checksums of the tokenizers the caller will use; units made by another
    tokenizer are a clear error, never silently wrong tokens.
    """
    role_dir = Path(run_dir) / "tokens" / role
    index_path = role_dir / "index.json"
    if not index_path.exists():
        raise ZipperError(f"{index_path} not found: run `zipper tokenize` for this run first")
    index = json.loads(index_path.read_text())
    out = []
    for name in index["shards"]:
        shard = read_shard(role_dir / name)
        for kind, have, want in (("text", shard.text_tok, text_tok), ("speech", shard.speech_tok, speech_tok)):
            if want is not None and have != want:
                raise ZipperError(f"{role_dir / name}: {kind} tokens were made by tokenizer {have[:12]} but this run's "
                                  f"{kind} tokenizer is {want[:12]}; rerun zipper tokenize --force")
        for i, uid in enumerate(shard.ids):
            out.append({"id": uid, "text": shard.text[i], "speech": shard.speech[i], "duration": shard.durations[i]})
    return out
