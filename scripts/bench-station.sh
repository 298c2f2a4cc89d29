#!/usr/bin/env bash
# Station benchmark: the same image flashed by `sbcflash station` to 1 slot, then to 4 slots in
# parallel, on loop devices backed by files in /dev/shm (tmpfs: RAM, so what is measured is the
# station, not a card). Reports aggregate throughput (image bytes of all units / wall time from
# the first job's start to the last job's end, write + read-back + identity files + ledger) and
# the station's peak RSS.
#
#   sudo scripts/bench-station.sh            # REPS=3 IMG_MIB=1024 DATA_MIB=384 SLOTS="1 4"
#   sudo IMG_FORMAT=zst scripts/bench-station.sh   # the image as .img.zst (zstd -3)
#
# With IMG_FORMAT=zst the station decodes the image once at start into its cache (a fresh
# cache per run, SBCFLASH_CACHE_DIR): "process s" includes that decode, "wall s" does not.
#
# Needs root (loop devices), systemd-udevd (started here if none answers, stopped by its PID),
# sfdisk, mkfs.vfat, mtools, GNU time, jq, and a release build (SBCFLASH=path to override).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SBCFLASH:-${CARGO_TARGET_DIR:-target}/release/sbcflash}
REPS=${REPS:-3}
IMG_MIB=${IMG_MIB:-1024}
DATA_MIB=${DATA_MIB:-384}
SLOTS=${SLOTS:-"1 4"}
IMG_FORMAT=${IMG_FORMAT:-raw}
[ -x "$BIN" ] || { echo "build first: cargo build --release (or SBCFLASH=...)" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "needs root (loop devices)" >&2; exit 2; }

work=$(mktemp -d /tmp/sbcflash-bench-station.XXXXXX)
shm=$(mktemp -d /dev/shm/sbcflash-bench-station.XXXXXX)
loops=()
udevd_pid=""
cleanup() {
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  if [ -n "$udevd_pid" ]; then kill "$udevd_pid" 2>/dev/null || true; wait "$udevd_pid" 2>/dev/null || true; fi
  rm -rf "$shm" "$work"
}
trap cleanup EXIT

if ! udevadm control --ping --timeout=2 >/dev/null 2>&1; then
  /lib/systemd/systemd-udevd >/dev/null 2>&1 &
  udevd_pid=$!
  for _ in $(seq 50); do udevadm control --ping --timeout=2 >/dev/null 2>&1 && break; sleep 0.1; done
fi

# The image: MBR, FAT "FIRMWARE" at 8 MiB (64 MiB) with a file, DATA_MIB of random data after
# it, the rest holes (a fixed-size image with free space, like NixOS sd images before resize).
img=$work/bench.img
truncate -s "${IMG_MIB}M" "$img"
printf 'label: dos\nstart=8MiB, size=64MiB, type=c\nstart=72MiB, type=83\n' | sfdisk -q "$img"
truncate -s 64M "$work/fw.img"
mkfs.vfat -n FIRMWARE "$work/fw.img" >/dev/null
head -c 4000000 /dev/urandom > "$work/start.elf"
MTOOLS_SKIP_CHECK=1 mcopy -i "$work/fw.img" "$work/start.elf" ::start.elf
dd if="$work/fw.img" of="$img" bs=1M seek=8 conv=notrunc,sparse status=none
head -c "$((DATA_MIB * 1024 * 1024))" /dev/urandom | dd of="$img" bs=1M seek=80 conv=notrunc status=none iflag=fullblock
rm -f "$work/fw.img" "$work/start.elf"
case "$IMG_FORMAT" in
  raw) ;;
  zst) zstd -q -3 -f "$img" -o "$img.zst"; rm -f "$img"; img=$img.zst ;;
  *) echo "IMG_FORMAT must be raw or zst" >&2; exit 2 ;;
esac
cat "$img" > /dev/null   # warm in the page cache, as after a download

results=$work/runs.tsv
printf 'slots\trep\twall_s\tagg_mib_s\tpeak_rss_mib\tprocess_s\n' > "$results"
for n in $SLOTS; do
  for rep in $(seq "$REPS"); do
    cfg=$work/station-$n.toml
    rm -f "$work/ledger.sqlite"*
    {
      echo "ledger = \"$work/ledger.sqlite\""
      echo "image = \"$img\""
      echo '[identity]'
      echo 'serial = "BENCH-{seq:05}"'
      echo '[[identity.file]]'
      echo 'path = "sbcflash/identity.json"'
      echo "template = '{\"serial\": \"{serial}\"}'"
    } > "$cfg"
    loops=()
    for s in $(seq "$n"); do
      b=$shm/slot$s.card
      rm -f "$b"; truncate -s "$((IMG_MIB + 64))M" "$b"
      printf '[[slot]]\nname = "s%s"\nmatch = { "attr:loop/backing_file" = "%s" }\n' "$s" "$b" >> "$cfg"
      loops+=("$(losetup --find --show --direct-io=on "$b" 2>/dev/null || losetup --find --show "$b")")
    done
    udevadm settle --timeout=30
    rm -rf "$work/cache"
    SBCFLASH_CACHE_DIR=$work/cache /usr/bin/time -f '%e %M' -o "$work/time.txt" \
      "$BIN" --json station --config "$cfg" --flash-present --exit-after "$n" > "$work/events.jsonl"
    passes=$(jq -r 'select(.event=="message" and (.text|startswith("PASS"))) | .job' "$work/events.jsonl" | wc -l)
    [ "$passes" -eq "$n" ] || { echo "run $n/$rep: only $passes of $n passed" >&2; cat "$work/events.jsonl" >&2; exit 1; }
    wall=$(jq -rs '
      [ .[] | select(.event=="start" and .phase=="write") | .ts ] as $s
      | [ .[] | select(.event=="message" and (.text|startswith("PASS"))) | .ts ] as $e
      | def t: sub("\\.[0-9]+";"") | sub("\\+00:00$";"Z") | fromdateiso8601;
        def frac: (capture("\\.(?<f>[0-9]+)") | ("0." + .f) | tonumber) // 0;
      (($e | map((.|t) + (.|frac)) | max) - ($s | map((.|t) + (.|frac)) | min))' "$work/events.jsonl")
    read -r proc_s rss_kib < <(tail -1 "$work/time.txt")
    agg=$(awk -v n="$n" -v m="$IMG_MIB" -v w="$wall" 'BEGIN{printf "%.0f", n*m/w}')
    printf '%s\t%s\t%.2f\t%s\t%.1f\t%s\n' "$n" "$rep" "$wall" "$agg" "$(awk -v k="$rss_kib" 'BEGIN{print k/1024}')" "$proc_s" >> "$results"
    for l in "${loops[@]}"; do losetup -d "$l"; done
    loops=()
    rm -f "$shm"/slot*.card
  done
done
cat "$results"
echo
echo "image: $IMG_FORMAT"
echo "| slots | runs | wall s, median (min-max) | aggregate MiB/s of image (median) | peak RSS MiB (max) | process s (median) |"
echo "|---|---|---|---|---|---|"
med() { sort -n | awk '{v[NR]=$1} END {printf "%s %s %s\n", v[int((NR+1)/2)], v[1], v[NR]}'; }
for n in $SLOTS; do
  read -r wm wlo whi < <(awk -F'\t' -v n="$n" 'NR>1 && $1==n {print $3}' "$results" | med)
  read -r am _ _ < <(awk -F'\t' -v n="$n" 'NR>1 && $1==n {print $4}' "$results" | med)
  read -r _ _ rmax < <(awk -F'\t' -v n="$n" 'NR>1 && $1==n {print $5}' "$results" | med)
  read -r pm _ _ < <(awk -F'\t' -v n="$n" 'NR>1 && $1==n {print $6}' "$results" | med)
  printf '| %s | %s | %s (%s-%s) | %s | %s | %s |\n' "$n" "$REPS" "$wm" "$wlo" "$whi" "$am" "$rmax" "$pm"
done
