#!/usr/bin/env bash
# On the H200, one family's whole `mambaify bench` grid (teacher and hybrids at 50/25/12.5/0%
# attention x batch 1/16/64 x context 1k/8k/32k; smollm2 also transformers' generate), uncompiled
# as the session-2 grid in BENCHMARKS.md, now with the split-K decode attention both engines run
# (the session-2 grid gave the teacher SDPA over a mask, slow at long context). One call each
# (< 9.5 min; smollm2 needs the default teacher carried, see benchmarks/README.md). Results
# packed into $OUT/grid-FAMILY.tgz.
# Usage (from the repo root): bash benchmarks/h200/grid.sh smollm2|llama8b
source benchmarks/h200/env.sh
set +e
family=${1:?usage: grid.sh smollm2|llama8b}
case $family in
  smollm2) paths=engine,hf ;;
  llama8b) paths=engine ;;
  *) echo "unknown family $family: smollm2 or llama8b"; exit 2 ;;
esac
mkdir -p "$OUT/grid-$family"
run_logged "$OUT/grid-$family/bench.log" 540 20 python3 -m mambaify.cli bench --families "$family" --paths "$paths" \
  --repeats 2 --time-budget-s 500 --out "$OUT/grid-$family"
bash benchmarks/h200/pack.sh "grid-$family"
bash benchmarks/h200/keep_autotune.sh
