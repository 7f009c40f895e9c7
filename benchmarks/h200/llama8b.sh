#!/usr/bin/env bash
# On the H200, the Llama-3-8B-shaped family (random weights, built on the GPU: nothing to carry
# but the wheels), in parts that each fit one call (< 9 min):
#   profile   where the batch-1 decode step's time goes (benchmarks/profile_decode.py), compiled
#             (teacher, 25% hybrid: 68-74% of the corrected roofline in session 6, 74-76% with max-autotune)
#   profile-eager  the same uncompiled (teacher, 25% and 0% hybrids)
#   compiled  `mambaify bench --compile` at batch 1, 1k context (the roofline target: teacher,
#             25% and 0% hybrids), then issue 5 (b) again: the verify call against K + 1 steps
#             with K-call draft rounds, the draft's LM head whole and cut to 32k rows
#   verify-compiled  issue 5 (b) through the engines as generate() runs them, compiled: the plain
#             decode step and the speculative draft and verify rounds (draft head cut to 32k rows),
#             batch 1, K = 2, 3, 4
#   autotune  `mambaify bench --compile --compile-mode max-autotune-no-cudagraphs` at batch 1, 1k
#             context, teacher and 25% hybrid: inductor's matmul templates against cuBLAS (the
#             roofline target; minutes of autotuning per model)
#   b64       `mambaify bench --compile` at batch 64, 8k context (the 3x target), teacher and 25%
# (The whole uncompiled grid: grid.sh llama8b.)
# Results are packed into $OUT/llama8b-PART.tgz; logs beside them.
# Usage (from the repo root): bash benchmarks/h200/llama8b.sh PART [PART...]
source benchmarks/h200/env.sh
set +e
[ $# -gt 0 ] || { echo "usage: llama8b.sh PART [PART...], PART: profile|profile-eager|compiled|verify-compiled|autotune|b64"; exit 2; }
run() {  # run LIMIT_S NAME COMMAND...: with a time limit, log to $dir/NAME.log (env.sh's run_logged)
  local limit=$1 name=$2; shift 2
  run_logged "$dir/$name.log" "$limit" 12 "$@"
}
for part in "$@"; do
dir="$OUT/llama8b-$part"
mkdir -p "$dir"
case $part in
  profile)
    run 300 compiled python3 benchmarks/profile_decode.py --out "$dir/compiled" --family llama8b --attention 1,0.25 \
      --batch 1 --compile ;;
  profile-eager)
    run 200 eager python3 benchmarks/profile_decode.py --out "$dir/eager" --family llama8b --attention 1,0.25,0 --batch 1 ;;
  verify-compiled)
    # Acceptance: session 6's measured 1.47 at K = 4, and 1.8 / 2.2 (what 2x needs with the cut head, uncompiled).
    run 270 verify python3 benchmarks/bench_speculative.py --out "$dir/verify" --shape llama8b --attention 0.5 \
      --verify-batch 1 --verify-k 2,3,4 --draft-vocab 32768 --compile --accepted 1.47,1.8,2.2 --accepted-k 4 \
      --repeats 5 --time-budget-s 250 ;;
  compiled)
    run 225 b1 python3 -m mambaify.cli bench --compile --families llama8b --attention 1,0.25,0 --batch 1 --context 1024 \
      --paths engine --repeats 3 --time-budget-s 205 --out "$dir/b1"
    # Acceptance: session 5's measured lengths at K = 4 (batch 1 and 8) and the 2x target's 2.2.
    run 250 verify python3 benchmarks/bench_speculative.py --out "$dir/verify" --shape llama8b --attention 0.5 \
      --verify-batch 1,8 --verify-k 2,3,4,6 --draft-vocab 0,32768 --accepted 1.32,1.40,2.2 --accepted-k 4 \
      --repeats 5 --time-budget-s 225 ;;
  autotune)
    run 520 b1 python3 -m mambaify.cli bench --compile --compile-mode max-autotune-no-cudagraphs --families llama8b \
      --attention 1,0.25 --batch 1 --context 1024 --paths engine --repeats 3 --time-budget-s 500 --out "$dir/b1" ;;
  b64)
    run 300 b64 python3 -m mambaify.cli bench --compile --families llama8b --attention 1,0.25 --batch 64 --context 8192 \
      --paths engine --repeats 2 --time-budget-s 280 --out "$dir/b64" ;;
  *) echo "unknown part $part: profile, profile-eager, compiled, verify-compiled, autotune or b64"; continue ;;
esac
bash benchmarks/h200/pack.sh "llama8b-$part"
done
bash benchmarks/h200/keep_autotune.sh
