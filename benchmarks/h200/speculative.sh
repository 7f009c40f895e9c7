#!/usr/bin/env bash
# On the H200 (two calls of < 10 min; the default teacher must be carried, see benchmarks/README.md):
# distil the default teacher's 50% hybrid, distil a draft from the teacher's first and last layers
# against that hybrid, then time plain vs speculative decoding at batch 1 and 8 (issue 5, (a)),
# and both engines compiled (EXACT=1: also check the greedy output in float32).
# Each step has its own time limit, so a failing step leaves the others' results in $OUT. The run
# folders stay in runs/h200-spec while the machine is warm: a second call resumes or skips what is
# done.
# The whole call keeps within DEADLINE_S (default 570 s): a step that no longer fits is left for
# the next call, which resumes (the machine must still be warm).
# Usage (from the repo root): bash benchmarks/h200/speculative.sh [HYBRID_S] [DRAFT_S] [DEADLINE_S]
# TAG and BENCH_ARGS (environment): a variant of the benchmarks (see bench below).
# TRAIN_ARGS (environment): added to both trainings, e.g. TRAIN_ARGS=--compile (compiled steps).
# ROUND_TIMING=1 / EAGER=0 / E2E_DRAFT_VOCAB / COMPILED_LIMIT_S (environment): see the benchmarks below.
# DRAFT_SPLIT=1 (environment): a draft budget longer than one call (e.g. DRAFT_S 700) trains until
# this call's deadline, and the next call (machine still warm) resumes it where it stopped.
# TRAIN_ONLY=1 (environment): train the hybrid and the draft, skip the benchmarks (for a call that
# runs the GPU tests beside the training on one GPU: timings would be disturbed, training only slowed).
# DRAFT and DRAFT_ARGS (environment): a second draft, trained with DRAFT_ARGS added, against the
# hybrid an earlier call trained (e.g. on the second GPU of pair.sh: DRAFT=draft-l01
# DRAFT_ARGS="--layers 0,1"); its folder is runs/h200-spec/$DRAFT, its results $OUT/spec-$DRAFT.
source benchmarks/h200/env.sh
set +e
hybrid_s=${1:-120}
draft_s=${2:-150}
deadline=$(( $(date +%s) + ${3:-570} ))
runs=runs/h200-spec
draft=${DRAFT:-draft}
out="$OUT/spec"; suffix=""
[ "$draft" = draft ] || { out="$OUT/spec-$draft"; suffix="-$draft"; }
mkdir -p "$out" "$runs"
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $out/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  if (( start + limit > deadline )); then
    # A resumable training (DRAFT_SPLIT=1) runs until the deadline instead: interrupted there, it
    # keeps its last checkpoint (every 100 steps) and the next call resumes it.
    if [ "${SPLITTABLE:-0}" = 1 ] && (( deadline - start >= 120 )); then
      echo "$name: needs up to $limit s, runs the $(( deadline - start )) s left; the next call resumes it"
      limit=$(( deadline - start ))
    else
      echo "$name: needs up to $limit s, $(( deadline - start )) s left in this call: run the script again"
      return
    fi
  fi
  run_logged "$out/$name.log" "$limit" 6 "$@"
}
# The hybrid: its final model, or else its last saved stage (a stage folder holds the tokenizer
# too), so that a run cut short in its final evaluation still gives a target.
if [ ! -f "$runs/hybrid50/model/config.json" ] && [ -z "$(ls "$runs"/hybrid50/stages/*/config.json 2>/dev/null)" ]; then
  # A second draft never trains a hybrid of its own (two jobs would share one run folder).
  [ "$draft" = draft ] || { echo "$draft: no hybrid in $runs/hybrid50 yet: run the first draft's call first"; exit 2; }
  # --resume on any earlier folder: it continues a checkpoint, and starts afresh where an earlier
  # call trained nothing (a plain start would refuse the folder that call left).
  resume=""; [ -d "$runs/hybrid50" ] && resume="--resume"
  step hybrid 280 python3 -m mambaify.cli -v distill --config configs/h200-smollm2-attn50.yaml $resume \
    --out "$runs/hybrid50" --init linear-attention --time-budget-s "$hybrid_s" --num-prompts 1024 --no-progress $TRAIN_ARGS
fi
cp "$runs/hybrid50/metrics.json" "$out/hybrid50-metrics.json" 2>/dev/null
target="$runs/hybrid50/model"
[ -f "$target/config.json" ] || target=$(dirname "$(ls "$runs"/hybrid50/stages/*/config.json 2>/dev/null | tail -1)")
echo "target: $target"
if [ ! -f "$runs/$draft/model/config.json" ]; then
  resume=""; [ -d "$runs/$draft" ] && resume="--resume"
  # --tokens is an upper bound: the time budget decides how long the draft trains. The whole
  # offline corpus, each title asked in about three phrasings (24,000 answers): session 4's draft
  # memorised the defaults' 0.14 M tokens, session 5's passed 8 times over 2.2 M.
  # The limit covers the target's labels and the evaluations around the training (about 130 s
  # on the H200 in session 5, when 120 s more cut the run; it resumed in the next call).
  if [ -f "$runs/$draft/config.yaml" ]; then
    # A started draft resumes with the options it was started with (its config.yaml), whatever
    # DRAFT_ARGS this call has: session 17's second call, without the first's, was refused.
    SPLITTABLE=${DRAFT_SPLIT:-0} step "$draft" $(( draft_s + 150 )) python3 -m mambaify.cli -v distill-draft --resume \
      --out "$runs/$draft" --no-progress $TRAIN_ARGS
  else
    SPLITTABLE=${DRAFT_SPLIT:-0} step "$draft" $(( draft_s + 150 )) python3 -m mambaify.cli -v distill-draft --target "$target" $resume \
      --draft-from smollm2-135m-instruct --out "$runs/$draft" --time-budget-s "$draft_s" --tokens 200000000 \
      --seq-len 1024 --batch-size 32 --lr 1e-3 --text-docs 9000 --num-prompts 24000 --label-tokens 128 \
      --label-batch-size 1024 --eval-texts 256 --eval-chats 64 --no-progress $TRAIN_ARGS $DRAFT_ARGS
  fi
fi
cp "$runs/$draft/metrics.json" "$out/$draft-metrics.json" 2>/dev/null
# The benchmarks write into the run folder (kept while the machine is warm: a later call skips a
# finished one) and are copied to $OUT at the end, in order of importance: plain vs speculative
# (bf16), the same greedy output in float32, then both engines compiled (each batch size and K
# compiles its own step or rounds, about 40-60 s each on the H200). TAG and BENCH_ARGS name and
# add to a variant of all three, e.g. TAG=-b16 BENCH_ARGS="--batch 16".
benches=()
bench() {  # bench NAME LIMIT_S ARGS...
  local name=$1$suffix$TAG limit=$2; shift 2
  [ -f "$runs/$draft/model/config.json" ] || return
  [ "${TRAIN_ONLY:-0}" = 1 ] && { echo "$name: skipped (TRAIN_ONLY=1)"; return; }
  benches+=("$name")
  [ -f "$runs/$name/bench_speculative.json" ] && { echo "$name: done in an earlier call"; return; }
  step "$name" "$limit" python3 benchmarks/bench_speculative.py --out "$runs/$name" --target "$target" \
    --draft "$runs/$draft/model" "$@" $BENCH_ARGS
}
# ROUND_TIMING=1: first, round_timing.py on this trained pair (compiled, batch 1, K = 2 and 3): a
# round's wall time against its device time, launch-ahead on and off, from one random prompt.
if [ "${ROUND_TIMING:-0}" = 1 ] && [ -f "$runs/$draft/model/config.json" ] && [ "${TRAIN_ONLY:-0}" != 1 ]; then
  step round_timing$suffix 200 python3 benchmarks/round_timing.py --out "$out/round_timing$suffix" --compile \
    --target "$target" --draft "$runs/$draft/model" --batch 1 --k 2,3 --repeats 3
fi
# EAGER=0: skip the uncompiled benchmark (measured in sessions 4-6).
[ "${EAGER:-1}" = 1 ] && bench end_to_end 200 --k 2,3,4,6,auto --batch 1,8 --new-tokens 128 --prompts 16 \
  --repeats 3 --time-budget-s 170
# Greedy speculative output equals plain output exactly in float32 (bf16 rounds the verify call
# and single steps differently, so near-ties part them): the same check on the GPU, briefly.
# Measured in session 5 (every token equal); EXACT=1 runs it again.
[ "${EXACT:-0}" = 1 ] && bench exact_f32 100 --dtype float32 --k 2,4 --batch 1,8 --new-tokens 48 --prompts 8 \
  --repeats 1 --time-budget-s 80
# Compiled, K = 2 and 3 and adaptive K over those two (each batch size and K compiles its rounds
# once; "auto" reuses them).
# Session 9: 330 s ended this one while it compiled its seventh point (45-56 s a compile), so it
# has 450 s (COMPILED_LIMIT_S: less for fewer points, so that it fits a shorter call);
# E2E_DRAFT_VOCAB (e.g. 0,8192) adds a cut draft head beside the whole one.
bench end_to_end_compiled "${COMPILED_LIMIT_S:-450}" --compile --k 2,3,auto --batch 1,8 --new-tokens 128 --prompts 16 --repeats 3 \
  --time-budget-s $(( ${COMPILED_LIMIT_S:-450} - 30 )) --e2e-draft-vocab "${E2E_DRAFT_VOCAB:-0}"
for name in "${benches[@]}"; do [ -d "$runs/$name" ] && cp -r "$runs/$name" "$out/"; done
cat "$runs/end_to_end$suffix$TAG/bench_speculative.md" 2>/dev/null
for run in hybrid50 "$draft"; do  # the runs' reports and plots beside the step logs
  for f in report.md metrics.jsonl loss_curve.png before_after.png config.yaml; do
    [ -f "$runs/$run/$f" ] && cp "$runs/$run/$f" "$out/$run-$f"
  done
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
bash benchmarks/h200/pack.sh "$(basename "$out")"
bash benchmarks/h200/keep_autotune.sh
