#!/usr/bin/env bash
# On nvidia-h200-x2: two independent jobs in one call, one per GPU, so that a session's device
# minutes (counted per machine held, not per GPU) buy twice the work. Each job sees one GPU
# (CUDA_VISIBLE_DEVICES) and logs to $OUT/gpu0.log / $OUT/gpu1.log; the Triton autotuning
# results are packed once, after both (keep_autotune.sh). Jobs write their own results under
# $OUT and pack them (pack.sh) as the single-GPU scripts do.
# SHARE_GPU=1 (environment) on a one-GPU machine: both jobs on GPU 0, side by side. Only for jobs
# whose timings do not matter (the GPU tests beside a training run); never for two benchmarks.
# Usage (from the repo root): bash benchmarks/h200/pair.sh "JOB FOR GPU 0" "JOB FOR GPU 1"
source benchmarks/h200/env.sh
set +e
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
second=1
if [ "$gpus" -lt 2 ]; then
  if [ "${SHARE_GPU:-0}" = 1 ]; then
    second=0; echo "one GPU: both jobs share it (SHARE_GPU=1)"
  else
    echo "pair.sh needs 2 GPUs, this machine has $gpus: ask for kind nvidia-h200-x2 (or SHARE_GPU=1)"; exit 2
  fi
fi
start=$(date +%s)
for slot in 0 1; do
  job=$1; shift
  gpu=$slot; [ "$slot" = 1 ] && gpu=$second
  ( CUDA_VISIBLE_DEVICES=$gpu KEEP_AUTOTUNE=0 bash -c "$job" > "$OUT/gpu$slot.log" 2>&1
    echo "job $slot (gpu $gpu): exit $? after $(( $(date +%s) - start )) s" >> "$OUT/gpu$slot.log" ) &
done
wait
for slot in 0 1; do echo "=== job $slot"; tail -n 25 "$OUT/gpu$slot.log"; done
bash benchmarks/h200/keep_autotune.sh
