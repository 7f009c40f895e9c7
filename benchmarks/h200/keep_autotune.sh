#!/usr/bin/env bash
# On the H200, at the end of a call: copy the autotuning results in Triton's cache (small JSON
# files, one per kernel and shape key; not the compiled kernels) to $OUT/autotune. Back here,
# `cp -r FILES_AT/autotune/. .gpu/triton-cache/` and carry .gpu/triton-cache in the next session's
# first call: fla then compiles only the configurations it picked instead of timing them all.
# Usage (from the repo root, after source benchmarks/h200/env.sh): bash benchmarks/h200/keep_autotune.sh
cd "$TRITON_CACHE_DIR" || exit 0
mkdir -p "$OUT/autotune"
find . -name "*.autotune.json" -exec cp --parents {} "$OUT/autotune/" \;
echo "autotune results kept: $(find "$OUT/autotune" -name "*.autotune.json" | wc -l) files, $(du -sh "$OUT/autotune" | cut -f1)"
