#!/usr/bin/env bash
# Set-up shared by demo.sh and test.sh: system programs, .venv, the package. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

# System programs: Festival voices and espeak-ng synthesize the built-in corpora, sox shifts pitch,
# wordnet-base and bible-kjv-text hold the `english` corpus's sentences.
APT_PKGS="festival festvox-kallpc16k festvox-us-slt-hts espeak-ng sox wordnet-base bible-kjv bible-kjv-text libsndfile1"
missing=""
for p in $APT_PKGS; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing$missing"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: missing system packages; install them with: sudo apt-get install -y$missing" >&2
    exit 1
  fi
fi

# Python: torch 2.14.1 with torchaudio 2.11 (the CPU-only torch 2.13 cannot load torchaudio 2.11).
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.zipper-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the package into .venv (first run takes a few minutes)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q torch==2.14.1 torchaudio==2.11.0
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
