#!/usr/bin/env bash
# `write --delta` against a full `sbcflash write` of the same image on the same device, side by
# side in one run (issue 19), plus the unverified write against `dd oflag=direct` with
# per-thread CPU (where the time goes).
#
# Usage: sudo SBCFLASH=target/release/sbcflash bench/delta.sh IMGDIR [REPS]
#   IMGDIR: output of bench/make-image.sh (image.img + image.img.bmap); the changed images
#   IMGDIR/delta5.img (5 % of the mapped bytes changed: 16 spans of 4 MiB inside mapped
#   ranges, seeded) and IMGDIR/deltaall.img (every mapped MiB changed in its first 16 bytes)
#   are made once, with their bmaps (bmaptool create).
# Cases, interleaved per repetition, each on a fresh disk-backed loop device
# (--direct-io=on), the timed command followed by `sync $DEV`:
#   full5    sbcflash write --bmap (read-back verify on) of delta5.img onto a device that
#            holds image.img
#   delta5   the same with --delta
#   fullall  sbcflash write of deltaall.img onto a device that holds image.img
#   deltaall the same with --delta
#   dd       dd bs=4M oflag=direct of the mapped ranges of image.img only (the same share of
#            bytes sbcflash sends), then sync
#   noverify sbcflash write --no-verify --bmap image.img; per-thread CPU from /proc
#   ddread   dd bs=4M iflag=direct of the mapped ranges of a device holding image.img: the
#            least any --delta must do (read every mapped byte of the target), for the floor
#            of the delta/full ratio on this device
# CASES="full5 delta5 ..." runs only those cases.
# CARD=READ:WRITE (MB/s, e.g. CARD=90:30) runs every timed command in a cgroup v1 blkio group
# that throttles the loop device to those rates: an SD card's read/write asymmetry on the same
# loop device (the untimed preparation is not throttled).
# Every timed write is checked afterwards: the device is compared with the image it should
# hold (mapped ranges, O_DIRECT). Prints one line per run and writes IMGDIR/delta-runs.tsv.
set -euo pipefail
D=$(cd "${1:?usage: delta.sh IMGDIR [REPS]}" && pwd); REPS=${2:-3}
SBC=${SBCFLASH:-$(dirname "$0")/../target/release/sbcflash}
IMG=$D/image.img; SZ=$(stat -c %s "$IMG"); BF=$D/.delta-target.img
T=$(mktemp -d); DEV=""; CG=""
if [ -n "${CARD:-}" ]; then
  CG=/sys/fs/cgroup/blkio/sbcflash-bench-$$; mkdir "$CG"
  RBPS=$(( ${CARD%%:*} * 1000000 )); WBPS=$(( ${CARD##*:} * 1000000 ))
fi
cleanup() { [ -n "$DEV" ] && losetup -d "$DEV" 2>/dev/null; rm -f "$BF"; rm -rf "$T"; [ -n "$CG" ] && rmdir "$CG" 2>/dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM
[ "$(id -u)" = 0 ] || { echo "needs root (losetup)" >&2; exit 1; }

# Changed images, made once.
mk() {   # mk NAME MODE
  [ -e "$D/$1.img.bmap" ] && return
  cp --sparse=always "$IMG" "$D/$1.img"
  python3 - "$IMG.bmap" "$D/$1.img" "$2" <<'EOF'
import random, re, sys
bmap, out, mode = sys.argv[1:]
text = open(bmap).read()
bs = int(re.search(r"<BlockSize>\s*(\d+)", text).group(1))
ranges = []
for m in re.finditer(r"<Range[^>]*>\s*(\d+)(?:-(\d+))?\s*</Range>", text):
    a = int(m.group(1)); b = int(m.group(2) or a)
    ranges.append((a * bs, (b + 1) * bs))
rnd = random.Random(19)
mib = 1 << 20
with open(out, "r+b") as f:
    if mode == "5":
        mapped = sum(b - a for a, b in ranges)
        want = mapped * 5 // 100
        big = [r for r in ranges if r[1] - r[0] >= 4 * mib]
        done = 0
        while done < want:
            a, b = rnd.choice(big)
            n = min(4 * mib, want - done)
            off = rnd.randrange(a, b - n + 1) // 4096 * 4096
            f.seek(off); f.write(rnd.randbytes(n)); done += n
        print(f"changed {done} of {mapped} mapped bytes")
    else:
        n = 0
        for a, b in ranges:
            for off in range(a, b, mib):
                f.seek(off); f.write(rnd.randbytes(min(16, b - off))); n += 1
        print(f"changed the first 16 bytes of {n} mapped MiB")
EOF
  bmaptool create -o "$D/$1.img.bmap" "$D/$1.img"
}
mk delta5 5
mk deltaall all

fresh() {   # fresh [IMAGE]: a new loop device, holding IMAGE (untimed) if given
  [ -n "$DEV" ] && losetup -d "$DEV"; rm -f "$BF"; truncate -s "$SZ" "$BF"
  DEV=$(losetup --direct-io=on -f --show "$BF")
  [ -n "${1:-}" ] && "$SBC" -q write --yes --no-verify --bmap "$1.bmap" "$1" "$DEV" > /dev/null
  sync
  if [ -n "$CG" ]; then
    local mm; mm=$(lsblk -dno MAJ:MIN "$DEV" | tr -d ' ')
    echo "$mm $RBPS" > "$CG/blkio.throttle.read_bps_device"
    echo "$mm $WBPS" > "$CG/blkio.throttle.write_bps_device"
  fi
}
# The timed command, in the throttling cgroup when CARD is set.
in_card() { if [ -n "$CG" ]; then echo "echo \$\$ > $CG/cgroup.procs; $1"; else echo "$1"; fi; }
# The device holds IMAGE on its mapped ranges (O_DIRECT reads, via sbcflash verify).
check() { blockdev --flushbufs "$DEV"; "$SBC" -q verify --bmap "$1.bmap" "$1" "$DEV" > /dev/null 2>&1 && echo ok || echo MISMATCH; }

# The image's mapped ranges (4 KiB blocks: first, count), for the dd cases.
python3 - "$IMG.bmap" <<'EOF' > "$T/ranges"
import re, sys
t = open(sys.argv[1]).read()
for m in re.finditer(r"<Range[^>]*>\s*(\d+)(?:-(\d+))?\s*</Range>", t):
    a = int(m.group(1)); b = int(m.group(2) or a); print(a, b - a + 1)
EOF
# dd of the mapped ranges only: one dd per bmap range (skip/seek in 4 KiB blocks).
dd_mapped() {
  echo "while read a n; do dd if='$IMG' of=\$DEV bs=4M iflag=skip_bytes,count_bytes oflag=seek_bytes,direct skip=\$((a * 4096)) seek=\$((a * 4096)) count=\$((n * 4096)) conv=notrunc status=none; done < '$T/ranges'"
}
# O_DIRECT reads of the mapped ranges.
dd_read() {
  echo "while read a n; do dd if=\$DEV of=/dev/null bs=4M iflag=skip_bytes,count_bytes,direct skip=\$((a * 4096)) count=\$((n * 4096)) status=none; done < '$T/ranges'"
}

# Per-thread CPU of a running sbcflash: each thread's last sample of /proc/PID/task/TID/stat
# (user + system ticks, 100 per second), by thread name.
threads_cpu() {   # threads_cpu PID -> "name=ticks ..."
  local pid=$1 t line name
  declare -A tick=() tname=()
  while kill -0 "$pid" 2>/dev/null; do
    for t in /proc/"$pid"/task/*; do
      { read -r line < "$t/stat"; } 2>/dev/null || continue
      name=$(cat "$t/comm" 2>/dev/null) || continue
      set -- ${line##*) }
      tick[${t##*/}]=$(( ${12} + ${13} )); tname[${t##*/}]=$name
    done
    sleep 0.02
  done
  for t in "${!tick[@]}"; do printf '%s=%s ' "${tname[$t]}" "${tick[$t]}"; done
}

TSV=$D/delta-runs.tsv
printf 'rep\tcase\twall_s\tuser_s\tsys_s\tcheck\tload\tthreads_ticks\n' > "$TSV"
cat "$IMG" "$D/delta5.img" "$D/deltaall.img" > /dev/null 2>&1 || true
for rep in $(seq "$REPS"); do
  for c in ${CASES:-full5 delta5 fullall deltaall dd ddread noverify}; do
    case $c in
      full5)    fresh "$IMG"; img=$D/delta5.img;   cmd="'$SBC' -q write --yes --bmap '$img.bmap' '$img' \$DEV";;
      delta5)   fresh "$IMG"; img=$D/delta5.img;   cmd="'$SBC' -q write --yes --delta --bmap '$img.bmap' '$img' \$DEV";;
      fullall)  fresh "$IMG"; img=$D/deltaall.img; cmd="'$SBC' -q write --yes --bmap '$img.bmap' '$img' \$DEV";;
      deltaall) fresh "$IMG"; img=$D/deltaall.img; cmd="'$SBC' -q write --yes --delta --bmap '$img.bmap' '$img' \$DEV";;
      dd)       fresh;        img=$IMG;            cmd=$(dd_mapped);;
      ddread)   fresh "$IMG"; img=$IMG;            cmd=$(dd_read);;
      noverify) fresh;        img=$IMG;            cmd="'$SBC' -q write --yes --no-verify --bmap '$img.bmap' '$img' \$DEV";;
    esac
    export DEV
    cmd=$(in_card "$cmd")
    load=$(cut -d' ' -f1 /proc/loadavg)
    s=$(date +%s.%N)
    if [ "$c" = noverify ]; then
      /usr/bin/time -f "%U %S" -o "$T/time" bash -c "$cmd" > "$T/out" 2>&1 &
      sleep 0.02; pid=$(pgrep -n -f "^$SBC -q write --yes --no-verify" || true)
      thr=$( [ -n "$pid" ] && threads_cpu "$pid" || echo -)
      wait; sync "$DEV"
    else
      /usr/bin/time -f "%U %S" -o "$T/time" bash -c "$cmd && sync \$DEV" > "$T/out" 2>&1 || { echo "FAIL $c"; cat "$T/out"; }
      thr=-
    fi
    e=$(date +%s.%N)
    wall=$(echo "$e - $s" | bc)
    v=$(check "$img")
    read -r u sy < "$T/time" || true
    printf '%s\t%s\t%.2f\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$c" "$wall" "$u" "$sy" "$v" "$load" "$thr" >> "$TSV"
    printf '%-9s rep %s  %6.2f s  usr %s sys %s  %s  load %s %s\n' "$c" "$rep" "$wall" "$u" "$sy" "$v" "$load" "$thr"
  done
done
# Medians per case, and the ratios of issue 19.
med() { awk -F'\t' -v c="$1" 'NR > 1 && $2 == c { print $3 }' "$TSV" | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print 0 }'; }
for c in full5 delta5 fullall deltaall dd ddread noverify; do printf '%-9s median %s s\n' "$c" "$(med $c)"; done
awk -v f5="$(med full5)" -v d5="$(med delta5)" -v fa="$(med fullall)" -v da="$(med deltaall)" \
    -v dd="$(med dd)" -v nv="$(med noverify)" -v dr="$(med ddread)" 'BEGIN {
  if (f5 > 0) printf "delta 5 %% / full write: %.2f (bar <= 0.35)\n", d5 / f5
  if (f5 > 0) printf "floor on this device (dd O_DIRECT read of the mapped ranges / full write): %.2f\n", dr / f5
  if (fa > 0) printf "delta all changed / full write: %.2f (bar <= 1.1)\n", da / fa
  if (dd > 0) printf "write --no-verify / dd oflag=direct of the mapped ranges: %.2f (bar <= 1.2)\n", nv / dd
}'
