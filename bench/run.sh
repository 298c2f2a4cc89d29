#!/usr/bin/env bash
# One benchmark run, peers and sbcflash side by side (the run behind BENCHMARKS.md):
#   1. the 4 GiB NixOS-like image (1286 MiB mapped) from make-image.sh,
#   2. a dense image (SIZE_MIB=1400 DATA_MIB=1100: mapped ~ size), where only the pipeline counts.
# Usage: sudo SBCFLASH=path/to/release/sbcflash bench/run.sh OUTDIR
#   (builds the images into OUTDIR and OUTDIR/dense if they are missing)
# Env: REPS (3), TARGETS ("disk"), passed on to write-peers.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$(mkdir -p "${1:?usage: bench/run.sh OUTDIR}" && cd "$1" && pwd)"
export REPS="${REPS:-3}" TARGETS="${TARGETS-disk}" STALE_CHECK="${STALE_CHECK:-0}"
[ -e "$OUT/image.img" ] || bash "$HERE/make-image.sh" "$OUT"
[ -e "$OUT/dense/image.img" ] || SIZE_MIB=1400 DATA_MIB=1100 bash "$HERE/make-image.sh" "$OUT/dense"
CASES="dd-raw bmaptool-raw bmaptool-zst simg2img sbcflash-raw-nobmap sbcflash-raw-bmap sbcflash-zst sbcflash-simg sbcflash-verify" \
    bash "$HERE/write-peers.sh" "$OUT"
CASES="dd-raw bmaptool-raw bmaptool-zst sbcflash-raw-nobmap sbcflash-zst sbcflash-verify" \
    bash "$HERE/write-peers.sh" "$OUT/dense"
echo "== sparse image"; cat "$OUT/results/summary.md"
echo "== dense image"; cat "$OUT/dense/results/summary.md"
