#!/usr/bin/env bash
# On the H200, one call (< 10 min): the 8B shape's batch-1 decode step with each decode fusion
# switch, side by side, after the GPU tests of those paths. Variants (compiled, split-K GEMV, 1k
# context, teacher and 0% hybrid): "plain" with both switches off (session 12's step), "folded"
# with the norms folded (MAMBAIFY_FOLD_NORMS), "folded-conv" with the conv step inside the SSD
# step as well (MAMBAIFY_FUSED_CONV_STEP; both on by default since session 13), "tuned" with
# MAMBAIFY_GEMV_TUNE=1 as well (each GEMV shape's fastest launch configuration, K blocks of 128
# among them, timed on its first call), "bk256" the defaults with session 13's one-row GEMV
# configuration forced on every call (MAMBAIFY_GEMV_CONFIG=32,256,4: gate+up with K blocks of 256
# again), "pdl" the defaults launched as programmatic dependent launches (MAMBAIFY_PDL=1),
# "stages3" / "stages4" the defaults with the one-row GEMV loop pipelined over 3 or 4 stages
# (MAMBAIFY_GEMV_STAGES: the next weight tiles stream into shared memory while the current one
# is reduced). Each part has its own time limit; everything goes to $OUT/steps.tgz.
# VARIANTS="..." runs only those (default: folded-conv stages3 stages4 bk256 pdl). Usage (from the repo root): bash benchmarks/h200/step_variants.sh [TESTS_S] [BENCH_S_EACH]
source benchmarks/h200/env.sh
set +e
tests_s=${1:-150}
bench_s=${2:-120}
out="$OUT/steps"
mkdir -p "$out"
start=$(date +%s)
# SIGINT, so that pytest still prints what it has seen when the time runs out.
timeout -s INT -k 20 "$tests_s" python3 -m pytest -q -m gpu -p no:cacheprovider -n 4 --timeout 100 -rA \
  tests/test_triton_ops.py tests/test_engine.py tests/test_speculative_engine.py tests/test_quantize.py \
  -k "fold or gated_rmsnorm or fused_operands or conv_ssd or fused_conv or compiled_graph or small_batch or split_sums or gated_up or qkv or pipelined or prepared or int8" \
  > "$out/gpu-tests.log" 2>&1
echo "gpu tests: exit $? after $(( $(date +%s) - start )) s"
grep -E "passed|failed" "$out/gpu-tests.log" | tail -2
grep -E "^(FAILED|ERROR)" "$out/gpu-tests.log" | head -10
for variant in ${VARIANTS:-folded-conv stages3 stages4 bk256 pdl}; do
  case $variant in
    plain) switches=(MAMBAIFY_FOLD_NORMS=0 MAMBAIFY_FUSED_CONV_STEP=0) ;;
    folded) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_FUSED_CONV_STEP=0) ;;
    folded-conv) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_FUSED_CONV_STEP=1) ;;
    tuned) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_FUSED_CONV_STEP=1 MAMBAIFY_GEMV_TUNE=1) ;;
    bk256) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_FUSED_CONV_STEP=1 MAMBAIFY_GEMV_CONFIG=32,256,4) ;;
    pdl) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_FUSED_CONV_STEP=1 MAMBAIFY_PDL=1) ;;
    stages3) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_FUSED_CONV_STEP=1 MAMBAIFY_GEMV_STAGES=3) ;;
    stages4) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_FUSED_CONV_STEP=1 MAMBAIFY_GEMV_STAGES=4) ;;
    *) echo "step_variants: unknown variant $variant (plain, folded, folded-conv, tuned, bk256, pdl, stages3, stages4)"; continue ;;
  esac
  env "${switches[@]}" timeout -s INT -k 10 "$bench_s" python3 -m mambaify.cli bench --compile --linear split-k \
    --families llama8b --attention 1,0 --batch 1 --context 1024 --paths engine --repeats 3 \
    --out "$out/$variant" > "$out/$variant.log" 2>&1
  echo "$variant: exit $? after $(( $(date +%s) - start )) s"
  grep -E "llama8b .* b=1 ctx=1024" "$out/$variant.log" | tail -2
done
bash benchmarks/h200/pack.sh steps
