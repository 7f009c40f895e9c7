#!/usr/bin/env bash
# On the H200, at the end of a call: pack folders under $OUT into one $OUT/NAME.tgz each, because a
# call brings back at most 8 files (and none more than 2 folders down). Unpack here with
# `tar xzf FILES_AT/NAME.tgz -C DEST`. An archive that already exists is never overwritten (a folder
# named like keep_autotune.sh's archive once cost a call its results): the folder is then packed
# as NAME-2.tgz, NAME-3.tgz, ...
# Usage: bash benchmarks/h200/pack.sh NAME...   (each NAME a folder under $OUT)
for name in "$@"; do
  [ -d "$OUT/$name" ] || continue
  archive="$OUT/$name.tgz"; n=1
  while [ -e "$archive" ]; do n=$(( n + 1 )); archive="$OUT/$name-$n.tgz"; done
  tar czf "$archive" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name"
  echo "packed $(basename "$archive") ($(du -h "$archive" | cut -f1))"
done
