#!/usr/bin/env bash
# The Zipper recipe on local LibriSpeech / LibriLight / LibriTTS copies (see recipes/librispeech/README.md):
# speech tower on unlabeled audio (LibriLight), text tower on text (librispeech-lm-norm.txt), fusion on
# a chosen fraction of the aligned LibriSpeech (+ LibriTTS) training pairs, then ASR and TTS on test-clean.
# Not run in CI; tests/test_librispeech_recipe.py runs its stages on a tiny directory in the same layout.
#
#   recipes/librispeech/run.sh [--size S|L] [--stage N] [--stop-stage M] [--run-dir DIR]
#       [--librispeech DIR] [--librilight DIR] [--libritts DIR] [--lm-text FILE] [--lm-lines N]
#       [--aligned-fraction F] [--nproc-per-node G] [--nnodes N --node-rank R --master-addr HOST] ...
#
# Stages: 1 tokenize, 2 pretrain text, 3 pretrain speech, 4 fuse (Zipper, text tower frozen, speech
# tower trained), 5 decode the test split (ASR and TTS), 6 eval. Every stage is restartable: rerunning
# skips finished stages and resumes interrupted ones from their last checkpoint.
# Stages 2-4 run under torchrun when --nproc-per-node x --nnodes > 1. Several machines: run stage 1 on
# one machine first, then stages 2-4 on every machine (same command, its own --node-rank) with the run
# directory on a filesystem they all share; stages 1, 5 and 6 only run on --node-rank 0.
set -euo pipefail
cd "$(dirname "$0")/../.."

usage() {
  cat >&2 <<'EOF'
options (defaults in brackets; data roots also from the environment variables of the same name):
  --stage N --stop-stage M       stages to run [1, 6]: 1 tokenize, 2 text tower, 3 speech tower, 4 fuse, 5 decode, 6 eval
  --size S|L|demo|tiny           tower preset and the schedule that goes with it [S]
  --run-dir DIR                  [runs/librispeech-SIZE]
  --librispeech DIR              LibriSpeech root [$LIBRISPEECH or /data/LibriSpeech]
  --librilight DIR               LibriLight root, unlabeled audio for the speech tower ('' = none) [$LIBRILIGHT or /data/LibriLight]
  --libritts DIR                 LibriTTS root: its train subsets join the aligned pairs ('' = none) [$LIBRITTS or '']
  --lm-text FILE                 text for the text tower ('' = none) [$LM_TEXT or LIBRISPEECH/librispeech-lm-norm.txt]
  --lm-lines N                   use an evenly spaced sample of N lines of it (0 = all) [0]
  --train-sets "A B"             LibriSpeech (and LibriTTS) subsets of aligned pairs [train-clean-100 train-clean-360 train-other-500]
  --speech-sets "A B"            LibriSpeech subsets used as audio only, for the speech tower ['']
  --librilight-sets "A B"        LibriLight subsets ('' = every one found) ['']
  --dev-sets "A B" --test-sets "A B"   [dev-clean] [test-clean]
  --aligned-fraction F           fraction of the aligned pairs used by fuse (nested subsets) [1.0]
  --speech-tokenizer mel-kmeans|ssl-kmeans  [mel-kmeans]
  --ssl-checkpoint FILE --ssl-arch A --ssl-layer L   ssl-kmeans: local HuBERT state_dict [hubert_base, 6]
  --units K --frame-rate HZ --text-vocab V   tokenizer sizes [per size]
  --steps N                      optimizer steps of stages 2, 3 and 4 (or --text-steps --speech-steps --fuse-steps)
  --tokens-per-step N            padded tokens per optimizer step, all GPUs together [per size]
  --micro-tokens N               padded tokens per forward pass per GPU (memory) [per size]
  --lr X --fuse-lr X --warmup N --eval-every N --ckpt-every N   [per size]
  --nproc-per-node G --nnodes N --node-rank R --master-addr HOST --master-port P   torchrun [1 1 0 localhost 29500]
  --workers W                    tokenize worker processes [nproc]
  --decode-limit N --decode-batch N --max-new-tokens N --vocoder-steps N   stage 5 [all 32 - -]
  --judges ctc,pocketsphinx --judge-steps N   stage 6 [ctc,pocketsphinx -]
  --tag T                        name of the fused model (fused/T), its decodes (T-asr, T-tts) and report (eval/T) [ls]
EOF
}

stage=1
stop_stage=100
size=S
run_dir=
librispeech=${LIBRISPEECH:-/data/LibriSpeech}
librilight=${LIBRILIGHT-/data/LibriLight}
libritts=${LIBRITTS:-}
lm_text=${LM_TEXT-__default__}
lm_lines=0
train_sets="train-clean-100 train-clean-360 train-other-500"
speech_sets=
librilight_sets=
dev_sets=dev-clean
test_sets=test-clean
aligned_fraction=1.0
speech_tokenizer=mel-kmeans
ssl_checkpoint=
ssl_arch=hubert_base
ssl_layer=6
units= frame_rate= text_vocab=
steps= text_steps= speech_steps= fuse_steps=
tokens_per_step= micro_tokens=
lr= fuse_lr= warmup= eval_every= ckpt_every=
nproc_per_node=1 nnodes=1 node_rank=0 master_addr=localhost master_port=29500
workers=$(nproc 2>/dev/null || echo 1)
decode_limit= decode_batch=32 max_new_tokens= vocoder_steps=
judges=ctc,pocketsphinx judge_steps=
tag=ls

while [ $# -gt 0 ]; do
  case "$1" in -h|--help) usage; exit 0 ;; esac
  [ $# -ge 2 ] || { echo "recipes/librispeech/run.sh: $1 needs a value (--help lists the options)" >&2; exit 2; }
  case "$1" in
    --stage) stage=$2 ;; --stop-stage) stop_stage=$2 ;; --size) size=$2 ;; --run-dir) run_dir=$2 ;;
    --librispeech) librispeech=$2 ;; --librilight) librilight=$2 ;; --libritts) libritts=$2 ;;
    --lm-text) lm_text=$2 ;; --lm-lines) lm_lines=$2 ;;
    --train-sets) train_sets=$2 ;; --speech-sets) speech_sets=$2 ;; --librilight-sets) librilight_sets=$2 ;;
    --dev-sets) dev_sets=$2 ;; --test-sets) test_sets=$2 ;; --aligned-fraction) aligned_fraction=$2 ;;
    --speech-tokenizer) speech_tokenizer=$2 ;; --ssl-checkpoint) ssl_checkpoint=$2 ;;
    --ssl-arch) ssl_arch=$2 ;; --ssl-layer) ssl_layer=$2 ;;
    --units) units=$2 ;; --frame-rate) frame_rate=$2 ;; --text-vocab) text_vocab=$2 ;;
    --steps) steps=$2 ;; --text-steps) text_steps=$2 ;; --speech-steps) speech_steps=$2 ;; --fuse-steps) fuse_steps=$2 ;;
    --tokens-per-step) tokens_per_step=$2 ;; --micro-tokens) micro_tokens=$2 ;;
    --lr) lr=$2 ;; --fuse-lr) fuse_lr=$2 ;; --warmup) warmup=$2 ;; --eval-every) eval_every=$2 ;; --ckpt-every) ckpt_every=$2 ;;
    --nproc-per-node) nproc_per_node=$2 ;; --nnodes) nnodes=$2 ;; --node-rank) node_rank=$2 ;;
    --master-addr) master_addr=$2 ;; --master-port) master_port=$2 ;; --workers) workers=$2 ;;
    --decode-limit) decode_limit=$2 ;; --decode-batch) decode_batch=$2 ;; --max-new-tokens) max_new_tokens=$2 ;;
    --tag) tag=$2 ;; --vocoder-steps) vocoder_steps=$2 ;; --judges) judges=$2 ;; --judge-steps) judge_steps=$2 ;;
    *) echo "recipes/librispeech/run.sh: unknown option $1" >&2; usage; exit 2 ;;
  esac
  shift 2
done

# Per-size schedule: tokenizer sizes, steps, tokens per optimizer step (global) and per forward pass
# (per GPU), learning rates. Resource estimates for S and L: recipes/librispeech/README.md.
case "$size" in
  #      units vocab  text  speech fuse   tok/step fuse tok/step  micro  fuse micro  lr    fuse lr warmup eval ckpt
  tiny) d=(16   48     20    20     20     512      512           512    512         2e-3  1e-3    2      5    5) ;;
  demo) d=(512  1000   2000  2000   2000   8192     8192          8192   8192        2e-3  1e-3    100    200  200) ;;
  S)    d=(512  8000   10000 20000  10000  262144   131072        32768  16384       6e-4  1e-3    1000   1000 1000) ;;
  L)    d=(1024 16000  8000  20000  10000  524288   262144        16384  8192        3e-4  5e-4    2000   1000 1000) ;;
  *) echo "recipes/librispeech/run.sh: --size must be S, L, demo or tiny (got $size)" >&2; exit 2 ;;
esac
units=${units:-${d[0]}} text_vocab=${text_vocab:-${d[1]}}
text_steps=${text_steps:-${steps:-${d[2]}}} speech_steps=${speech_steps:-${steps:-${d[3]}}}
fuse_steps=${fuse_steps:-${steps:-${d[4]}}}
micro_tokens=${micro_tokens:-${d[7]}}
lr=${lr:-${d[9]}} fuse_lr=${fuse_lr:-${d[10]}} warmup=${warmup:-${d[11]}}
eval_every=${eval_every:-${d[12]}} ckpt_every=${ckpt_every:-${d[13]}}
[ "$warmup" -lt "$text_steps" ] || warmup=$(( text_steps / 5 > 0 ? text_steps / 5 : 1 ))
run_dir=${run_dir:-runs/librispeech-$size}
[ "$lm_text" != __default__ ] || lm_text=$librispeech/librispeech-lm-norm.txt

world=$(( nproc_per_node * nnodes ))
# --max-tokens is global (all processes together); --grad-accum reaches the tokens per optimizer step
# while each GPU's share of a forward pass stays within its --micro-tokens. The same target gives the
# same settings on any number of GPUs that needs no accumulation, so a rerun on more GPUs resumes.
batch_args() {  # $1: target padded tokens per optimizer step, $2: per-GPU tokens per forward pass
  local target=${tokens_per_step:-$1} per_gpu=$2
  local accum=$(( (target + per_gpu * world - 1) / (per_gpu * world) ))
  [ "$accum" -ge 1 ] || accum=1
  echo "--max-tokens $(( (target + accum - 1) / accum )) --grad-accum $accum"
}

python=.venv/bin/python
[ -x "$python" ] || python=python3
zipper=("$python" -m zipper_cli.cli)
if [ "$world" -gt 1 ]; then
  if [ "$nnodes" -gt 1 ]; then
    launch=("$python" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" \
      --master_addr "$master_addr" --master_port "$master_port" --nproc_per_node "$nproc_per_node" -m zipper_cli.cli)
  else
    launch=("$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc_per_node" -m zipper_cli.cli)
  fi
else
  launch=("${zipper[@]}")
fi
run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
one_machine_stage() {  # stages that run on one machine only
  run_stage "$1" || return 1
  if [ "$node_rank" -ne 0 ]; then echo "== stage $1: skipped on --node-rank $node_rank (runs on node 0)"; return 1; fi
}
echo "== size $size, run dir $run_dir, $world process(es) for training"

if one_machine_stage 1; then
  echo "== stage 1: tokenize (LibriSpeech ${train_sets// /,} aligned; ${dev_sets// /,} dev; ${test_sets// /,} test)"
  corpora=()
  roles=()
  in_list() { local x; for x in $2; do [ "$x" = "$1" ] && return 0; done; return 1; }
  for s in $train_sets $speech_sets $dev_sets $test_sets; do
    [ -d "$librispeech/$s" ] || { echo "error: $librispeech/$s not found (set --librispeech or LIBRISPEECH)" >&2; exit 2; }
    corpora+=(--corpus "librispeech:$librispeech/$s")
  done
  for s in $speech_sets; do roles+=(--subset-role "$s=speech"); done
  for s in $train_sets; do roles+=(--subset-role "$s=aligned"); done
  for s in $dev_sets; do roles+=(--subset-role "$s=dev"); done
  for s in $test_sets; do roles+=(--subset-role "$s=test"); done
  if [ -n "$libritts" ]; then  # LibriTTS's training subsets join the aligned pairs (the paper's fine-tuning mix)
    for s in $train_sets; do
      if [ -d "$libritts/$s" ]; then corpora+=(--corpus "librispeech:$libritts/$s"); else echo "   (LibriTTS has no $s: skipped)"; fi
    done
  fi
  if [ -n "$librilight" ]; then  # unlabeled: role speech, files cut into windows of at most 20 s
    [ -d "$librilight" ] || { echo "error: $librilight not found (set --librilight or LIBRILIGHT; '' for none)" >&2; exit 2; }
    if [ -n "$librilight_sets" ]; then
      for s in $librilight_sets; do
        in_list "$s" "$train_sets $speech_sets $dev_sets $test_sets" && { echo "error: LibriLight subset $s has the name of a LibriSpeech subset" >&2; exit 2; }
        corpora+=(--corpus "librispeech:$librilight/$s")
      done
    else
      corpora+=(--corpus "librispeech:$librilight")
    fi
  else
    echo "   (no LibriLight: the speech tower trains on the aligned audio only)"
  fi
  text_args=()
  if [ -n "$lm_text" ]; then
    [ -f "$lm_text" ] || { echo "error: $lm_text not found (set --lm-text or LM_TEXT; '' for none)" >&2; exit 2; }
    if [ "$lm_lines" -gt 0 ]; then  # an evenly spaced sample: the file is ordered by book
      mkdir -p "$run_dir/local"
      sample=$run_dir/local/lm-text.$lm_lines.txt
      if [ ! -s "$sample" ]; then
        total=$(wc -l < "$lm_text")
        awk -v n="$lm_lines" -v total="$total" 'BEGIN { k = total / n; if (k < 1) k = 1; next_at = 1 }
          NR >= next_at && taken < n { print; taken++; next_at = 1 + int(taken * k) }' "$lm_text" > "$sample.tmp"
        mv "$sample.tmp" "$sample"
      fi
      text_args=(--text-file "$sample")
    else
      text_args=(--text-file "$lm_text")
    fi
  else
    echo "   (no LM text: the text tower trains on the aligned transcripts only)"
  fi
  speech_args=(--speech-tokenizer "$speech_tokenizer" --units "$units")
  case "$speech_tokenizer" in
    mel-kmeans) speech_args+=(--frame-rate "${frame_rate:-25}") ;;
    ssl-kmeans)
      [ -n "$ssl_checkpoint" ] || { echo "error: --speech-tokenizer ssl-kmeans needs --ssl-checkpoint FILE (a local $ssl_arch state_dict)" >&2; exit 2; }
      speech_args+=(--ssl-arch "$ssl_arch" --ssl-layer "$ssl_layer" --ssl-checkpoint "$ssl_checkpoint") ;;
    *) echo "error: --speech-tokenizer must be mel-kmeans or ssl-kmeans (got $speech_tokenizer)" >&2; exit 2 ;;
  esac
  "${zipper[@]}" tokenize --run-dir "$run_dir" "${corpora[@]}" "${roles[@]}" "${text_args[@]}" \
    --text-vocab "$text_vocab" "${speech_args[@]}" --workers "$workers"
fi

train_common=(--size "$size" --warmup "$warmup" --eval-every "$eval_every" --ckpt-every "$ckpt_every")

if run_stage 2; then
  echo "== stage 2: pretrain the text tower (LM text + aligned transcripts)"
  # shellcheck disable=SC2046
  "${launch[@]}" pretrain --run-dir "$run_dir" --tower text "${train_common[@]}" --steps "$text_steps" --lr "$lr" \
    $(batch_args "${d[5]}" "$micro_tokens")
fi

if run_stage 3; then
  echo "== stage 3: pretrain the speech tower (unlabeled audio + aligned audio)"
  # shellcheck disable=SC2046
  "${launch[@]}" pretrain --run-dir "$run_dir" --tower speech "${train_common[@]}" --steps "$speech_steps" --lr "$lr" \
    $(batch_args "${d[5]}" "$micro_tokens")
fi

if run_stage 4; then
  echo "== stage 4: zip the towers (text frozen, speech trained) on $aligned_fraction of the aligned pairs"
  # shellcheck disable=SC2046
  "${launch[@]}" fuse --run-dir "$run_dir" --arch zipper --freeze text --tag "$tag" \
    --aligned-fraction "$aligned_fraction" --steps "$fuse_steps" --lr "$fuse_lr" --warmup "$warmup" \
    --eval-every "$eval_every" --ckpt-every "$ckpt_every" $(batch_args "${d[6]}" "${d[8]}")
fi

decode_args=(--batch-size "$decode_batch")
[ -z "$decode_limit" ] || decode_args+=(--limit "$decode_limit")
[ -z "$max_new_tokens" ] || decode_args+=(--max-new-tokens "$max_new_tokens")
[ -z "$vocoder_steps" ] || decode_args+=(--vocoder-steps "$vocoder_steps")

if one_machine_stage 5; then
  echo "== stage 5: decode the test split: ASR (speech -> text) and TTS (text -> speech -> WAV)"
  "${zipper[@]}" decode --run-dir "$run_dir" --model "fused/$tag" --outputs text --split test --tag "$tag-asr" "${decode_args[@]}"
  "${zipper[@]}" decode --run-dir "$run_dir" --model "fused/$tag" --outputs speech --split test --tag "$tag-tts" "${decode_args[@]}"
fi

if one_machine_stage 6; then
  echo "== stage 6: evaluate"
  eval_args=(--judges "$judges")
  [ -z "$judge_steps" ] || eval_args+=(--judge-steps "$judge_steps")
  "${zipper[@]}" eval --run-dir "$run_dir" --decode "$tag-asr" --decode "$tag-tts" --tag "$tag" "${eval_args[@]}"
  echo "== report: $run_dir/eval/$tag/report.md; WAVs: $run_dir/decode/$tag-tts/wav/"
fi

echo "== done: artifacts in $run_dir"
