#!/usr/bin/env bash
# The demo recipe on the built-in `demo` corpus (spoken digits, numbers, dates, times, amounts,
# letters, commands), sized for a 2-core laptop CPU. Every stage is restartable: rerunning skips
# finished stages and resumes interrupted ones.
#
#   recipes/demo/run.sh [--stage N] [--stop-stage M] [--run-dir DIR] [--workers W]
#
# Stages: 1 tokenize (later issues add: 2 pretrain text, 3 pretrain speech, 4 fuse, 5 decode, 6 eval).
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=1
stop_stage=100
run_dir=runs/demo
workers=2
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    *) echo "recipes/demo/run.sh: unknown option $1 (options: --stage N --stop-stage M --run-dir DIR --workers W)" >&2; exit 2 ;;
  esac
done

zipper=.venv/bin/zipper
[ -x "$zipper" ] || zipper=zipper

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  echo "== stage 1: tokenize the demo corpus"
  $zipper tokenize --run-dir "$run_dir" --corpus demo --text-vocab 256 --workers "$workers"
fi

last_built=1
if [ "$stop_stage" -gt "$last_built" ]; then
  echo "== stages after $last_built (pretrain, fuse, decode, eval) are not built yet; see the open issues"
fi
echo "== done: artifacts in $run_dir"
