#!/usr/bin/env bash
# On the H200, at the end of a call: pack folders under $OUT into one $OUT/NAME.tgz each, because a
# call brings back at most 8 files (and none more than 2 folders down). Unpack here with
# `tar xzf FILES_AT/NAME.tgz -C DEST`.
# Usage: bash benchmarks/h200/pack.sh NAME...   (each NAME a folder under $OUT)
for name in "$@"; do
  [ -d "$OUT/$name" ] || continue
  tar czf "$OUT/$name.tgz" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name"
  echo "packed $name.tgz ($(du -h "$OUT/$name.tgz" | cut -f1))"
done
