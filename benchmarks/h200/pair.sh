#!/usr/bin/env bash
# On nvidia-h200-x2: two independent jobs in one call, one per GPU, so that a session's device
# minutes (counted per machine held, not per GPU) buy twice the work. Each job sees one GPU
# (CUDA_VISIBLE_DEVICES) and logs to $OUT/gpu0.log / $OUT/gpu1.log; the Triton autotuning
# results are packed once, after both (keep_autotune.sh). Jobs write their own results under
# $OUT and pack them (pack.sh) as the single-GPU scripts do.
# Usage (from the repo root): bash benchmarks/h200/pair.sh "JOB FOR GPU 0" "JOB FOR GPU 1"
source benchmarks/h200/env.sh
set +e
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
  echo "pair.sh needs 2 GPUs, this machine has $gpus: ask for kind nvidia-h200-x2"; exit 2
fi
start=$(date +%s)
for gpu in 0 1; do
  job=$1; shift
  ( CUDA_VISIBLE_DEVICES=$gpu KEEP_AUTOTUNE=0 bash -c "$job" > "$OUT/gpu$gpu.log" 2>&1
    echo "gpu $gpu: exit $? after $(( $(date +%s) - start )) s" >> "$OUT/gpu$gpu.log" ) &
done
wait
for gpu in 0 1; do echo "=== gpu $gpu"; tail -n 25 "$OUT/gpu$gpu.log"; done
bash benchmarks/h200/keep_autotune.sh
