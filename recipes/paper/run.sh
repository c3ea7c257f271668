#!/usr/bin/env bash
# The paper's comparisons (arXiv 2405.18669, Tables 1-3 and Figure 3) on the built-in `demo` corpus:
# Zipper with the speech tower trained ("unfrozen") and frozen, and the single-decoder baseline, each
# fine-tuned on nested subsets of the aligned data under one compute budget, then decoded (ASR and TTS on
# the test split), scored (ASR WER, TTS WER vs gold and vs target with both judges, text perplexity) and
# compared with paired significance tests. Writes RESULTS.md (and plots/) in the run directory, or in
# recipes/paper/ with --publish.
#
#   recipes/paper/run.sh [--stage N] [--stop-stage M] [--run-dir DIR] [--fractions "1 0.3 0.1 0.03"]
#                        [--steps S] [--max-tokens T] [--limit N] [--demo-recipe] [--publish]
#
# Stages: 1-3 the demo recipe's tokenize and pretraining (shared by every model), 4 fuse every
# (model, fraction), 5 decode, 6 eval each model, 7 compare and write RESULTS.md.
# The budget is the same for every model: --steps optimizer steps of at most --max-tokens padded tokens.
# --demo-recipe fuses and decodes as recipes/demo does (none of it is in the paper, see README): both
# Zipper models get the demo's cross-attention (a learned clock for positions on a shared time axis, a
# diagonal start, open gates over zero-initialised branches), its auxiliary CTC loss on ASR and TTS
# examples and its noised TTS input units; Zipper ASR is decoded by joint CTC/attention beam search and
# Zipper TTS as the best of 16 samples by its CTC head; the single decoder (no CTC head) by beam search
# (ASR 4 beams, TTS 8). Training runs in bf16 where the CPU multiplies bf16 natively, as in the demo.
# Without it: the paper's block, no CTC loss, greedy decoding, zipper's own precision.
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=1
stop_stage=100
run_dir=runs/paper
fractions="1 0.3 0.1 0.03"
steps=600
max_tokens=2048
limit=200
publish=0
demo_recipe=0
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --fractions) fractions=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --limit) limit=$2; shift 2 ;;
    --publish) publish=1; shift ;;
    --demo-recipe) demo_recipe=1; shift ;;
    *) echo "recipes/paper/run.sh: unknown option $1 (options: --stage N --stop-stage M --run-dir DIR" \
            "--fractions LIST --steps S --max-tokens T --limit N --demo-recipe --publish)" >&2; exit 2 ;;
  esac
done

zipper=.venv/bin/zipper
[ -x "$zipper" ] || zipper=zipper
python=.venv/bin/python
[ -x "$python" ] || python=python3

# model name -> fuse options. Zipper runs keep the text tower frozen (as in the paper); the learning
# rates are the paper's choices for each condition scaled to this budget (see recipes/paper/README.md).
zip_opts="--arch zipper --input-proj none --gate-lr-mult 10 --lr 1e-3 --dropout 0.1"
asr_opts="" tts_opts="" zip_asr_opts="" zip_tts_opts="" precision=auto
if [ "$demo_recipe" = 1 ]; then
  zip_opts="$zip_opts --xattn-pos learned --xattn-prior 8 --gate-init 0.5 --ctc-weight 3 --ctc-tts-weight 3"
  zip_opts="$zip_opts --speech-input-noise 0.3"
  asr_opts="--strategy beam --beam 4" tts_opts="--strategy beam --beam 8"
  zip_asr_opts="$asr_opts --ctc-weight 0.3" zip_tts_opts="--strategy sample --temperature 0.7 --best-of 16"
  # The demo recipe's precision choice (bf16 on CPUs with native bf16 matmuls).
  # shellcheck source=recipes/native_bf16.sh
  . recipes/native_bf16.sh
  if native_bf16; then precision=bf16; fi
fi
declare -A fuse_opts=(
  [zipper-unfrozen]="$zip_opts --freeze text"
  [zipper-frozen]="$zip_opts --freeze text,speech"
  [single-decoder]="--arch single-decoder --freeze none --lr 1e-3"
)
models="zipper-unfrozen zipper-frozen single-decoder"
tags=()
for f in $fractions; do
  for m in $models; do tags+=("$m-f$f"); done
done

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 1 ]; then
  # mel-kmeans units: the demo's ctc-kmeans units learn from all aligned transcripts, which would hand
  # the smaller aligned fractions labels they are not supposed to have.
  recipes/demo/run.sh --run-dir "$run_dir" --stage "$stage" --stop-stage "$(( stop_stage < 3 ? stop_stage : 3 ))" \
    --speech-tokenizer mel-kmeans
fi

if [ "$stage" -le 4 ] && [ "$stop_stage" -ge 4 ]; then
  for f in $fractions; do
    for m in $models; do
      echo "== stage 4: fuse $m on fraction $f of the aligned data ($steps steps x $max_tokens tokens)"
      # shellcheck disable=SC2086  # fuse_opts holds several options
      $zipper fuse --run-dir "$run_dir" ${fuse_opts[$m]} --aligned-fraction "$f" --tag "$m-f$f" \
        --steps "$steps" --warmup 50 --max-tokens "$max_tokens" --eval-every 100 --ckpt-every 100 \
        --precision "$precision"
    done
  done
fi

if [ "$stage" -le 5 ] && [ "$stop_stage" -ge 5 ]; then
  for t in "${tags[@]}"; do
    echo "== stage 5: decode $t (ASR and TTS, first $limit test utterances)"
    # Zipper models under --demo-recipe have a CTC head: joint CTC/attention ASR, best-of-N TTS.
    asr=$asr_opts tts=$tts_opts
    if [ "$demo_recipe" = 1 ] && [ "${t#zipper}" != "$t" ]; then asr=$zip_asr_opts tts=$zip_tts_opts; fi
    # shellcheck disable=SC2086  # the option strings hold several options
    $zipper decode --run-dir "$run_dir" --model "fused/$t" --outputs text --split test --limit "$limit" --tag "$t-asr" $asr
    # shellcheck disable=SC2086
    $zipper decode --run-dir "$run_dir" --model "fused/$t" --outputs speech --split test --limit "$limit" --tag "$t-tts" $tts
  done
fi

if [ "$stage" -le 6 ] && [ "$stop_stage" -ge 6 ]; then
  for t in "${tags[@]}"; do
    echo "== stage 6: eval $t"
    $zipper eval --run-dir "$run_dir" --decode "$t-asr" --decode "$t-tts" --tag "$t"
  done
fi

if [ "$stage" -le 7 ] && [ "$stop_stage" -ge 7 ]; then
  echo "== stage 7: compare (reference: ${tags[0]}) and write RESULTS.md"
  # --force: the comparison is derived from the evals above, so it is redone whenever the set of models
  # changes (e.g. fractions added to a finished run); nothing else is recomputed.
  $zipper eval --run-dir "$run_dir" --compare "$(IFS=,; echo "${tags[*]}")" --tag paper --force
  out="$run_dir/RESULTS.md"
  if [ "$publish" = 1 ]; then out=recipes/paper/RESULTS.md; fi
  $python recipes/paper/results.py --run-dir "$run_dir" --compare paper --out "$out" \
    --command "recipes/paper/run.sh --fractions \"$fractions\" --steps $steps --max-tokens $max_tokens --limit $limit$([ "$demo_recipe" = 1 ] && echo " --demo-recipe")"
  echo "== results: $out"
fi
