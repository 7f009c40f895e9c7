#!/usr/bin/env bash
# On the CPU machine (with network), before the first H200 call of a session: everything the
# offline GPU machine needs in the ignored .gpu/ folder, beside the tree that travels:
#   .gpu/whl, .gpu/model   wheels and the default teacher in two parts (../shared/gpu/prep.sh)
#   .gpu/cache/data        the built-in training corpus (Wikipedia lead summaries, about 5 MB),
#                          which distill and distill-draft would otherwise download there and fail
# Carry .gpu/whl, .gpu/cache/data and .gpu/model/smollm2.gguf.part00 in the first call and
# .gpu/model/smollm2.gguf.part01 in the next (benchmarks/README.md). Carry .gpu/cache/data, not
# .gpu/cache: a carried folder replaces the machine's, and there .gpu/cache also holds the
# teacher's safetensors copy that a warm machine keeps between calls.
# Usage (from the repo root, with mambaify importable): bash benchmarks/h200/prep.sh
set -euo pipefail
bash ../shared/gpu/prep.sh
MAMBAIFY_CACHE="$PWD/.gpu/cache" python3 -c "
from mambaify.distill.data import data_cache_dir, load_wiki_offline
records = load_wiki_offline()
print(f'{len(records)} built-in corpus records in {data_cache_dir()}')"
du -sh .gpu/whl .gpu/model .gpu/cache/data
