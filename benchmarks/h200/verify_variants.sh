#!/usr/bin/env bash
# On the H200, one call (< 10 min): issue 5's (b) on the 8B-shaped hybrid (50% attention, batch
# 1, compiled, split-K GEMV, the draft head of 32768 rows) at the acceptance measured in (a), with
# each decode switch that changes the verify call: "plain" with the norms as kernels of their
# own (MAMBAIFY_FOLD_NORMS=0), "folded" with them folded (the residual adds at every row count,
# the norms at one row; at several rows the norms as kernels, MAMBAIFY_PREPARED_NORMS=0), "folded-tuned" with MAMBAIFY_GEMV_TUNE=1
# as well (each GEMV shape's fastest launch configuration, timed on its first call),
# "folded-stages3" with the one-row GEMV loop pipelined (MAMBAIFY_GEMV_STAGES=3: the plain step
# and the draft's one-row calls; the verify call's rows are pipelined either way),
# "folded-prepared" with the norms at several rows prepared by the residual-add GEMV before
# them (MAMBAIFY_PREPARED_NORMS=1, the default since session 17: no norm kernel between the
# verify call's GEMVs but the first layer's), "folded-int8" with the draft's layers in int8 (--draft-int8: half the bytes of a
# draft step; its speed-up holds at the float draft's acceptance only as far as (a) measured
# with an int8 draft says). Everything goes to $OUT/verify.tgz.
# VARIANTS="..." runs only those. Usage (from the repo root): bash benchmarks/h200/verify_variants.sh [KS] [ACCEPTED] [BENCH_S_EACH]
source benchmarks/h200/env.sh
set +e
ks=${1:-3,4}
accepted=${2:-1.485}
bench_s=${3:-180}
out="$OUT/verify"
mkdir -p "$out"
start=$(date +%s)
for variant in ${VARIANTS:-plain folded folded-tuned}; do
  extra=()
  case $variant in
    plain) switches=(MAMBAIFY_FOLD_NORMS=0) ;;
    folded) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_PREPARED_NORMS=0) ;;
    folded-tuned) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_PREPARED_NORMS=0 MAMBAIFY_GEMV_TUNE=1) ;;
    folded-stages3) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_PREPARED_NORMS=0 MAMBAIFY_GEMV_STAGES=3) ;;
    folded-prepared) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_PREPARED_NORMS=1) ;;
    folded-int8) switches=(MAMBAIFY_FOLD_NORMS=1 MAMBAIFY_PREPARED_NORMS=0) extra=(--draft-int8) ;;
    *) echo "verify_variants: unknown variant $variant (plain, folded, folded-tuned, folded-stages3, folded-prepared, folded-int8)"; continue ;;
  esac
  env "${switches[@]}" timeout -s INT -k 10 "$bench_s" python3 benchmarks/bench_speculative.py --out "$out/$variant" \
    --shape llama8b --attention 0.5 --verify-batch 1 --verify-k "$ks" --draft-vocab 32768 --compile \
    --accepted "$accepted" --accepted-k 3 --repeats 3 --small-batch-linear "${extra[@]}" > "$out/$variant.log" 2>&1
  echo "$variant: exit $? after $(( $(date +%s) - start )) s"
  grep -E "^\[(verify_cost|speedup)\]" "$out/$variant.log" | sed -E 's/"(attention|batch|kernel|context|draft_vocab|compiled|acceptance|accepted_source)": [^,]*, //g'
done
bash benchmarks/h200/pack.sh verify
