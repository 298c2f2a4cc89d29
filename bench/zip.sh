#!/usr/bin/env bash
# `.zip` images: `sbcflash write image.zip DEV` against `unzip -p image.zip | dd of=DEV bs=4M
# oflag=direct`, side by side in one run (repetitions interleaved, so load from other jobs hits
# every case alike), with sbcflash on the same image as `.zst` and raw for reference.
#
# Usage: sudo bench/zip.sh [IMGDIR]      (IMGDIR: output of make-image.sh, default bench/out)
# Env:   REPS=3  SBCFLASH=path (default target/release/sbcflash)  ZIPLEVEL=6
# Makes IMGDIR/image.zip (`zip -j -$ZIPLEVEL`: one deflate member, image.img) if it is missing.
#
# Method (as write-peers.sh): every run writes to a fresh loop device (--direct-io=on) over a
# freshly truncated, all-hole backing file of the image's size; inputs are pre-read into the
# page cache; the timed command is the tool followed by `sync $DEV`; afterwards (untimed) the
# device is read back with O_DIRECT and compared byte for byte with image.img. sbcflash runs
# with `-q --yes --no-verify` (dd does not read back either) and no bmap (the zip has none).
# Results: one line per run on stdout and in $IMGDIR/results/zip-runs.tsv, then medians.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
D="$(cd "${1:-$HERE/out}" && pwd)"
REPS="${REPS:-3}"
SBCFLASH="${SBCFLASH:-$HERE/../target/release/sbcflash}"
ZIPLEVEL="${ZIPLEVEL:-6}"
IMG=$D/image.img
export LC_ALL=C

[ "$(id -u)" = 0 ] || { echo "needs root (losetup)" >&2; exit 1; }
for t in zip unzip dd losetup cmp /usr/bin/time bc; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
[ -x "$SBCFLASH" ] || { echo "no sbcflash binary at $SBCFLASH (cargo build --release)" >&2; exit 1; }
for f in "$IMG" "$IMG.zst"; do
    [ -e "$f" ] || { echo "missing $f - run make-image.sh first" >&2; exit 1; }
done
if [ ! -e "$D/image.zip" ]; then
    echo "making $D/image.zip (zip -$ZIPLEVEL)" >&2
    (cd "$D" && zip -q -j "-$ZIPLEVEL" image.zip.tmp image.img && mv image.zip.tmp image.zip)
fi
SZ=$(stat -c %s "$IMG")
BF=$D/.zip-bench-target.img
T=$(mktemp -d)
DEV=""
cleanup() { [ -n "$DEV" ] && losetup -d "$DEV" 2>/dev/null; rm -f "$BF"; rm -rf "$T"; }
trap cleanup EXIT
mkdir -p "$D/results"
TSV=$D/results/zip-runs.tsv
printf 'case\trep\twall_s\tuser_s\tsys_s\tpeak_rss_kib\tload1\n' > "$TSV"

cat "$D/image.zip" "$IMG.zst" > /dev/null
dd if="$IMG" of=/dev/null bs=4M status=none

CASES="sbcflash-zip unzip-dd sbcflash-zst sbcflash-raw"
for rep in $(seq "$REPS"); do
    for c in $CASES; do
        [ -n "$DEV" ] && losetup -d "$DEV"
        rm -f "$BF"; truncate -s "$SZ" "$BF"
        DEV=$(losetup --direct-io=on -f --show "$BF")
        sync
        case $c in
            sbcflash-zip) cmd="'$SBCFLASH' -q write --yes --no-verify '$D/image.zip' $DEV";;
            unzip-dd) cmd="unzip -p '$D/image.zip' | dd of=$DEV bs=4M oflag=direct status=none";;
            sbcflash-zst) cmd="'$SBCFLASH' -q write --yes --no-verify --no-bmap '$IMG.zst' $DEV";;
            sbcflash-raw) cmd="'$SBCFLASH' -q write --yes --no-verify --no-bmap '$IMG' $DEV";;
        esac
        s=$(date +%s.%N)
        /usr/bin/time -f "%U %S %M" -o "$T/time" bash -o pipefail -c "$cmd && sync $DEV" \
            > "$T/out" 2>&1 || { echo "FAIL $c"; cat "$T/out"; exit 1; }
        e=$(date +%s.%N)
        blockdev --flushbufs "$DEV"
        dd if="$DEV" iflag=direct bs=4M status=none | cmp -n "$SZ" - "$IMG" \
            || { echo "MISMATCH $c: $DEV differs from image.img" >&2; exit 1; }
        read -r u sy m < "$T/time"
        w=$(echo "$e - $s" | bc)
        load=$(cut -d' ' -f1 /proc/loadavg)
        printf '%s\t%s\t%.2f\t%s\t%s\t%s\t%s\n' "$c" "$rep" "$w" "$u" "$sy" "$m" "$load" | tee -a "$TSV"
    done
done
echo "medians of $REPS (wall s, CPU s = user + sys, peak RSS MiB), every run compared byte for byte:"
for c in $CASES; do
    awk -F'\t' -v c="$c" '$1 == c { print $3, $4 + $5, $6 / 1024 }' "$TSV" | sort -n |
        awk -v c="$c" '{ w[NR] = $1; cpu[NR] = $2; r[NR] = $3 }
            END { m = int((NR + 1) / 2); printf "%-14s %6.2f  cpu %6.2f  rss %6.1f\n", c, w[m], cpu[m], r[m] }'
done
