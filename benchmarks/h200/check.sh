#!/usr/bin/env bash
# On the H200, first call of a session (< 10 min): every GPU test (8 workers; each fla kernel family and head width keeps to
# one, as fla autotunes per process), then, with --bench, the attention and verify kernel
# benchmarks (measured in session 3). Each part has its own time limit; logs and JSON go to $OUT.
# Usage (from the repo root): bash benchmarks/h200/check.sh [TESTS_S] [--bench]
source benchmarks/h200/env.sh
set +e
tests_s=${1:-540}
start=$(date +%s)
# SIGINT, so that pytest still prints the failures it has seen when the time runs out.
timeout -s INT -k 30 "$tests_s" python3 -m pytest -v -m gpu -p no:cacheprovider -n 8 --dist loadgroup --timeout 240 --tb=short -rfEs > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests: exit $? after $(( $(date +%s) - start )) s"
grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -3
echo "so far: $(grep -c ' PASSED' "$OUT/gpu_tests.txt") passed, $(grep -c ' FAILED' "$OUT/gpu_tests.txt") failed"
grep -E "FAILED|ERROR" "$OUT/gpu_tests.txt" | head -20
if [ "${2:-}" = "--bench" ]; then
  timeout 110 python3 benchmarks/bench_attention.py --out "$OUT/attention" > "$OUT/attention.log" 2>&1
  echo "bench_attention: exit $?"; tail -4 "$OUT/attention.log"
  timeout 100 python3 benchmarks/bench_kernels.py "$OUT/kernels" --only verify > "$OUT/verify.log" 2>&1
  echo "bench_kernels verify: exit $?"; tail -4 "$OUT/verify.log"
fi
echo "total $(( $(date +%s) - start )) s"
bash benchmarks/h200/pack.sh attention kernels
bash benchmarks/h200/keep_autotune.sh
