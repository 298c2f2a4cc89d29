#!/usr/bin/env bash
# Quick A/B of sbcflash binaries (and bmaptool) on the benchmark images, interleaved so that
# load from other jobs hits every binary alike. Not the official method: see run.sh.
# Usage: sudo bench/ab.sh REPS "BIN1 BIN2" "CASES" IMGDIR
#   CASES: zst bmap verify nobmap bmaptool-zst bmaptool-raw (same commands as write-peers.sh)
set -euo pipefail
REPS=$1; BINS=$2; CASES=$3; D=${4:?usage: ab.sh REPS BINS CASES IMGDIR}
IMG=$D/image.img; BF=$D/.ab-target.img; SZ=$(stat -c %s $IMG); T=$(mktemp -d)
DEV=""
cleanup(){ [ -n "$DEV" ] && losetup -d $DEV 2>/dev/null; rm -f $BF; rm -rf "$T"; }
trap cleanup EXIT
cat $IMG.zst $IMG.bmap >/dev/null; dd if=$IMG of=/dev/null bs=4M status=none
for rep in $(seq $REPS); do for c in $CASES; do for b in $BINS; do
  case $c in bmaptool*) [ "$b" = "$(echo $BINS|cut -d' ' -f1)" ] || continue;; esac
  [ -n "$DEV" ] && losetup -d $DEV; rm -f $BF; truncate -s $SZ $BF; DEV=$(losetup --direct-io=on -f --show $BF); sync
  case $c in
   zst) cmd="$b -q write --yes --no-verify --bmap $IMG.bmap $IMG.zst $DEV";;
   bmap) cmd="$b -q write --yes --no-verify --bmap $IMG.bmap $IMG $DEV";;
   verify) cmd="$b -q write --yes --bmap $IMG.bmap $IMG $DEV";;
   nobmap) cmd="$b -q write --yes --no-verify --no-bmap $IMG $DEV";;
   bmaptool-zst) cmd="bmaptool -q copy --bmap $IMG.bmap $IMG.zst $DEV";;
   bmaptool-raw) cmd="bmaptool -q copy --bmap $IMG.bmap $IMG $DEV";;
  esac
  s=$(date +%s.%N); /usr/bin/time -f "%U %S %M" -o "$T/time" bash -c "$cmd && sync $DEV" >"$T/out" 2>&1 || { echo FAIL $c $b; cat "$T/out"; }
  e=$(date +%s.%N)
  printf "%-14s %-40s %6.2f  usr/sys/rssKiB %s  load %s\n" $c $(basename $b) $(echo "$e - $s"|bc) "$(cat "$T/time")" "$(cut -d' ' -f1 /proc/loadavg)"
done; done; done
