# Sourced by the recipes: native_bf16 succeeds when this CPU multiplies bf16 natively (AVX512-BF16 or
# AMX), where bf16 autocast trains the demo tower 2.5x faster than fp32 (scripts/bench.py pretrain).
native_bf16() {
  grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null
}
