#!/usr/bin/env python
"""Decoding speed: tokens/s of greedy generation with a demo-size Tower (tower_preset("demo", 515)),
200 new tokens after a 50-token prompt, at batch 1 and 16: KV-cached vs uncached (full recompute every
step), and against Hugging Face transformers' `generate` on a LlamaForCausalLM of the same shape (hidden
256, 4 layers, 4 heads, SwiGLU intermediate = the tower's ffn_hidden, tied embeddings), greedy,
use_cache=True. transformers is a benchmark-only extra (`.venv/bin/pip install transformers`); without
it that row is reported as skipped. Both sides generate exactly 200 tokens (our end token is forbidden
until then via min_new_tokens; HF gets min_new_tokens as well).

  .venv/bin/python scripts/bench_decode.py [--repeats 5] [--threads 1] [--new 200] [--prompt 50]

Targets: cached / uncached >= 10x at 200 tokens; ours / transformers >= 1.0x at batch 1 and 16.
Timings on a shared machine are noisy: each number is the median of --repeats runs after a warm-up, the
contenders interleaved; *_tok_s are per wall second, *_tok_cpu_s per CPU second of this process (one
thread), which other processes on the machine disturb much less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _interleaved_medians(fns: dict, repeats: dict) -> dict:
    """Median (wall seconds, CPU seconds) of each fn, the runs interleaved round-robin so that load
    changes on a shared machine hit every contender alike. Each fn runs once first as a warm-up. CPU
    seconds (this process, one thread) exclude time spent waiting for a core that other processes hold:
    on a busy machine they measure the work done far more steadily than the wall clock."""
    for fn in fns.values():
        fn()
    times: dict = {k: ([], []) for k in fns}
    for i in range(max(repeats.values())):
        for k, fn in fns.items():
            if i < repeats[k]:
                t, c = time.perf_counter(), time.process_time()
                fn()
                times[k][0].append(time.perf_counter() - t)
                times[k][1].append(time.process_time() - c)
    return {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in times.items()}


def _hf_model(tower_cfg):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    cfg = LlamaConfig(
        vocab_size=tower_cfg.vocab_size, hidden_size=tower_cfg.n_embd, intermediate_size=tower_cfg.ffn_hidden,
        num_hidden_layers=tower_cfg.n_layer, num_attention_heads=tower_cfg.n_head,
        num_key_value_heads=tower_cfg.n_kv_head, max_position_embeddings=tower_cfg.max_seq_len,
        rms_norm_eps=tower_cfg.norm_eps, rope_theta=tower_cfg.rope_base, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def bench_decode(args) -> dict:
    from zipper_cli.generate import GenerationConfig, TowerGenerator
    from zipper_cli.models.tower import Tower, tower_preset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tcfg = tower_preset("demo", 515)
    tower = Tower(tcfg).eval()
    gen = TowerGenerator(tower, "text")
    hf = _hf_model(tcfg)
    g = torch.Generator().manual_seed(0)
    out: dict = {"new_tokens": args.new, "prompt": args.prompt, "threads": args.threads, "repeats": args.repeats,
                 "rows": []}
    for batch in (1, 16):
        # Prompt = [bos] + pieces: args.prompt tokens in all (pieces avoid the specials 0..3).
        prompts = torch.randint(4, tcfg.vocab_size, (batch, args.prompt - 1), generator=g).tolist()
        row: dict = {"batch": batch}
        fns, reps = {}, {}
        for name, use_cache, n in (("cached", True, args.repeats), ("uncached", False, args.repeats_uncached)):
            cfg = GenerationConfig(max_new_tokens=args.new, min_new_tokens=args.new, batch_size=batch,
                                   use_cache=use_cache)

            def run_ours(cfg=cfg):
                res = gen.generate(prompts, cfg=cfg)
                assert all(len(r.tokens[0]) == args.new for r in res)

            fns[name], reps[name] = run_ours, n
        if hf is not None:
            ids = torch.tensor([[2] + p for p in prompts])
            mask = torch.ones_like(ids)

            def run_hf():
                with torch.inference_mode():
                    o = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                                    min_new_tokens=args.new, do_sample=False, use_cache=True, num_beams=1)
                assert o.shape[1] == args.prompt + args.new

            fns["transformers"], reps["transformers"] = run_hf, args.repeats
        sec = _interleaved_medians(fns, reps)
        for name in ("cached", "uncached", "transformers"):
            if name in sec:
                row[f"{name}_tok_s"] = round(batch * args.new / sec[name][0], 1)
                row[f"{name}_tok_cpu_s"] = round(batch * args.new / sec[name][1], 1)
        if hf is None:
            row["transformers_tok_s"] = "skipped (transformers not importable)"
        else:
            row["ours_over_transformers"] = round(row["cached_tok_s"] / row["transformers_tok_s"], 2)
            row["ours_over_transformers_cpu"] = round(row["cached_tok_cpu_s"] / row["transformers_tok_cpu_s"], 2)
        row["cached_over_uncached"] = round(row["cached_tok_s"] / row["uncached_tok_s"], 2)
        row["cached_over_uncached_cpu"] = round(row["cached_tok_cpu_s"] / row["uncached_tok_cpu_s"], 2)
        out["rows"].append(row)
    return out


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cached / transformers number (median)")
    p.add_argument("--repeats-uncached", type=int, default=3, help="timed runs per uncached number (median)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--new", type=int, default=200, help="tokens generated per row")
    p.add_argument("--prompt", type=int, default=50, help="prompt length in tokens (bos included)")
    return p


if __name__ == "__main__":
    result = bench_decode(add_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args())
    print(json.dumps(result, indent=2))
