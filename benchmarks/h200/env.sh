# Source on the (offline) H200 machine from the repo root: installs the carried wheels, joins the
# carried default teacher, and points mambaify's caches at the carried folders (see shared/gpu/prep.sh).
set -eo pipefail
export PYTHONUNBUFFERED=1
if [ ! -f .gpu/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/whl/*.whl
  touch .gpu/site/.done
fi
export PYTHONPATH="$PWD/.gpu/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -f .gpu/smollm2.gguf ] && [ -f .gpu/model/smollm2.gguf.part00 ] && [ -f .gpu/model/smollm2.gguf.part01 ]; then
  cat .gpu/model/smollm2.gguf.part0* > .gpu/smollm2.gguf.tmp
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  .gpu/smollm2.gguf.tmp" | sha256sum -c --quiet
  mv .gpu/smollm2.gguf.tmp .gpu/smollm2.gguf
fi
export MAMBAIFY_SMOLLM2_GGUF="$PWD/.gpu/smollm2.gguf" MAMBAIFY_CACHE="$PWD/.gpu/cache"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Triton's cache in a carried folder: fla caches its autotuning results there (FLA_CACHE_RESULTS,
# on by default), which keep_autotune.sh brings back and a later session carries in again, so
# fla's kernels are tuned once per image rather than once per session (minutes each time).
export TRITON_CACHE_DIR="$PWD/.gpu/triton-cache"
mkdir -p "$TRITON_CACHE_DIR"
# The autotuning results of earlier sessions (keep_autotune.sh), committed: a fresh machine starts
# with them instead of timing every configuration again.
[ -f benchmarks/h200/triton-autotune.tgz ] && tar xzf benchmarks/h200/triton-autotune.tgz -C "$TRITON_CACHE_DIR" --skip-old-files
# Training reads the built-in corpus from the cache; this machine cannot download it.
wiki=$(ls "$MAMBAIFY_CACHE"/data/wiki-offline-*.jsonl 2>/dev/null | head -1 || true)
[ -n "$wiki" ] || echo "env.sh: no built-in training corpus in $MAMBAIFY_CACHE/data, so distill and distill-draft will fail here (no network): run bash benchmarks/h200/prep.sh on the CPU machine and carry .gpu/cache/data" >&2

# run_logged LOG LIMIT_S TAIL COMMAND...: run COMMAND with a time limit, its output in LOG, then
# say how it ended and show LOG's last TAIL lines (progress bars left out). SIGINT first at the
# limit: Python then prints where it was, which a plain kill would not tell.
run_logged() {
  local log=$1 limit=$2 lines=$3; shift 3
  local start=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" > "$log" 2>&1
  echo "$(basename "$log" .log): exit $? after $(( $(date +%s) - start )) s"
  tr '\r' '\n' < "$log" | grep -v "it/s\]\|s/it\]\|^\s*$" | tail -"$lines"
}
