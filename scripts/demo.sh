#!/usr/bin/env bash
# The quick demo: set-up, then every stage that exists on the built-in `demo` corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec recipes/demo/run.sh "$@"
