#!/usr/bin/env bash
# On the H200 (one call, < 10 min; the default teacher must be carried, see benchmarks/README.md):
# distil the default teacher's 50% hybrid, distil a draft from the teacher's first and last layers
# against that hybrid, then time plain vs speculative decoding at batch 1 and 8 (issue 5, (a)).
# Each step has its own time limit, so a failing step leaves the others' results in $OUT.
# Usage (from the repo root): bash benchmarks/h200/speculative.sh [HYBRID_S] [DRAFT_S]
source benchmarks/h200/env.sh
set +e
hybrid_s=${1:-150}
draft_s=${2:-100}
runs=runs/h200-spec
mkdir -p "$OUT/spec" "$runs"
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/spec/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/spec/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s"
  grep -v "it/s\]\|s/it\]" "$OUT/spec/$name.log" | tail -6
}
if [ ! -f "$runs/hybrid50/model/config.json" ]; then
  step hybrid 330 python3 -m mambaify.cli distill --config configs/h200-smollm2-attn50.yaml \
    --out "$runs/hybrid50" --init linear-attention --time-budget-s "$hybrid_s" --num-prompts 1024 --no-progress
fi
cp "$runs/hybrid50/metrics.json" "$OUT/spec/hybrid50-metrics.json" 2>/dev/null
if [ ! -f "$runs/draft/model/config.json" ]; then
  step draft 240 python3 -m mambaify.cli distill-draft --target "$runs/hybrid50/model" \
    --draft-from smollm2-135m-instruct --out "$runs/draft" --time-budget-s "$draft_s" \
    --seq-len 1024 --batch-size 32 --lr 1e-3 --num-prompts 1024 --no-progress
fi
cp "$runs/draft/metrics.json" "$OUT/spec/draft-metrics.json" 2>/dev/null
step end_to_end 200 python3 benchmarks/bench_speculative.py --out "$OUT/spec/end_to_end" \
  --target "$runs/hybrid50/model" --draft "$runs/draft/model" --k 2,3,4,6,auto --batch 1,8 \
  --new-tokens 128 --prompts 16 --time-budget-s 170
cp -r "$OUT/spec/end_to_end" "$runs/" 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
