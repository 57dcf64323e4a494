#!/usr/bin/env bash
# The CPU benchmark runs behind README "Performance" (needs `make demo` first: engines and data/).
# About 45 minutes on the 2-core VM; run it on a quiet machine.
# Usage: bash tools/bench-cpu.sh [RUN-NAME]   (results in docs/benchmarks/RUN-NAME{-paired,,-c16-poisson,-t0.7})
# Concurrency 1 and 4 run interleaved (the modes take turns on each prompt, or wave of 4 prompts
# sent at once; two passes): on this VM machine speed drifts 10-25% over a run, which otherwise
# falls on whichever mode ran last.
set -x
B=.venv/bin/cosine-bench
D=docs/benchmarks
N=${1:-$(date +%F)-cpu-qwen}
$B run --config config.toml --modes autoregressive,speculative,cosine --concurrency 1 --interleave --repeat 2 \
  --domains code,docs,prose,german --prompts data/prompts.json --per-domain 2 --max-tokens 64 \
  --peers none --out $D/$N-paired
$B run --config config.toml --modes autoregressive,speculative,cosine --concurrency 4 --interleave --repeat 2 \
  --domains code,docs,prose,german --prompts data/prompts.json --per-domain 2 --max-tokens 64 \
  --peers none --out $D/$N
$B run --config config.toml --modes autoregressive,speculative,cosine --concurrency 16 \
  --domains code,docs,prose,german --prompts data/prompts.json --per-domain 4 --max-tokens 32 \
  --poisson-rate 0.5 --poisson-requests 8 --peers none --out $D/$N-c16-poisson
$B run --config config.toml --modes autoregressive,cosine --concurrency 1 --temperature 0.7 \
  --domains code,docs,prose,german --prompts data/prompts.json --per-domain 1 --max-tokens 32 \
  --peers none --out $D/$N-t0.7
