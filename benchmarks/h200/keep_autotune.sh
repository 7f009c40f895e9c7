#!/usr/bin/env bash
# On the H200, at the end of a call: pack the autotuning results in Triton's cache (small JSON
# files, one per kernel and shape key; not the compiled kernels) into $OUT/triton-autotune.tgz.
# One file, because a call brings back at most 8 files. Back here, merge them into the committed
# benchmarks/h200/triton-autotune.tgz (benchmarks/README.md says how), which env.sh unpacks into
# the cache of every later machine: fla then compiles only the configurations it picked instead
# of timing them all (minutes per kernel and shape on a cold cache; session 7's first hybrid
# distillation spent its whole 280 s step autotuning).
# Usage (from the repo root, after source benchmarks/h200/env.sh): bash benchmarks/h200/keep_autotune.sh
# KEEP_AUTOTUNE=0: a job of pair.sh, which packs once after both of its jobs.
[ "${KEEP_AUTOTUNE:-1}" = 1 ] || exit 0
cd "$TRITON_CACHE_DIR" || exit 0
find . -name "*.autotune.json" > "$OUT/.autotune-list"
tar czf "$OUT/triton-autotune.tgz" -T "$OUT/.autotune-list"
echo "autotune results kept: $(wc -l < "$OUT/.autotune-list") files in triton-autotune.tgz ($(du -h "$OUT/triton-autotune.tgz" | cut -f1))"
rm -f "$OUT/.autotune-list"
