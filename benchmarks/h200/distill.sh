#!/usr/bin/env bash
# On the H200: distil the default teacher with a config; copy the run's report and metrics to $OUT.
# Usage (from the repo root): bash benchmarks/h200/distill.sh configs/h200-smollm2-attn50.yaml
set -eo pipefail
source benchmarks/h200/env.sh
config=$1
run_dir=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['out'])" "$config")
start=$(date +%s)
python3 -m mambaify.cli -v distill --config "$config" --no-progress 2>&1 | tee "$OUT/$(basename "$config" .yaml).log" | grep -v "it/s\]" || true
echo "wall time: $(( $(date +%s) - start )) s"
for f in metrics.json metrics.jsonl report.md loss_curve.png before_after.png config.yaml; do
  [ -f "$run_dir/$f" ] && cp "$run_dir/$f" "$OUT/"
done
nvidia-smi --query-gpu=name,memory.used --format=csv
