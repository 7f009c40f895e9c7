#!/usr/bin/env bash
# On two H200s (device kind nvidia-h200-x2): the same short distillation of the default teacher
# with the student sharded by FSDP2 and with plain data parallelism, then the FSDP run killed
# and resumed; prints both runs' held-out KL and the largest weight difference.
# Carry .gpu/whl .gpu/cache/data and .gpu/model/smollm2.gguf.part00 in one call, part01 in the
# next (env.sh joins them). Usage: bash benchmarks/h200/fsdp.sh [TOKENS]   (default 4,000,000)
set -eo pipefail
source benchmarks/h200/env.sh
tokens=${1:-4000000}
common=(distill --teacher smollm2-135m-instruct --attention 0.5 --tokens "$tokens" --save-every 10
        --batch-size 8 --seq-len 1024 --no-progress)
fsdp=(accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2
      --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap HybridDecoderLayer
      --fsdp_state_dict_type FULL_STATE_DICT -m mambaify.cli)
run_logged "$OUT/fsdp.log" 240 4 "${fsdp[@]}" "${common[@]}" --out "$OUT/fsdp"
run_logged "$OUT/ddp.log" 240 4 torchrun --standalone --nproc_per_node 2 -m mambaify.cli "${common[@]}" --out "$OUT/ddp"
# Killed a few steps in, then resumed under FSDP.
run_logged "$OUT/killed.log" 45 2 "${fsdp[@]}" "${common[@]}" --out "$OUT/resumed" || true
run_logged "$OUT/resumed.log" 240 4 "${fsdp[@]}" "${common[@]}" --out "$OUT/resumed" --resume
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
runs = {name: out / name for name in ("fsdp", "ddp", "resumed") if (out / name / "model").is_dir()}
for name, run in runs.items():
    after = json.loads((run / "metrics.json").read_text())["after"]
    print(name, {part: round(after[part]["kl"], 4) for part in ("text", "chat") if part in after})
weights = {name: load_file(str(run / "model" / "model.safetensors")) for name, run in runs.items()}
for a, b in (("fsdp", "ddp"), ("resumed", "fsdp")):
    if a in weights and b in weights:
        print(f"{a} vs {b}: largest weight difference",
              max(float((weights[a][k].float() - weights[b][k].float()).abs().max()) for k in weights[a]))
PY
for name in fsdp ddp resumed; do rm -rf "$OUT/$name/model" "$OUT/$name/checkpoint" "$OUT/$name/stages"; done
