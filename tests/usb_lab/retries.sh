#!/usr/bin/env bash
# Runs in the USB lab guest (tests/usb_lab.rs): `write --rewrites` (issue 19's `--retries`;
# that name is the download's) against a real kernel fault.
# A device-mapper device over a loop device whose sectors 8..9 MiB are a dm-flakey segment
# that silently drops every write (`drop_writes`, always "down"); the backing file starts as
# 0xA5 garbage, so dropped writes read back wrong. Without retries the write fails at once;
# with retries the range is written again and fails again while the fault lasts; when the
# fault ends during the read-back (the table is reloaded as all-linear, as a card that
# recovers), the rewrite lands and the write succeeds and counts the retried range.
# Prints `ok NAME` / `FAIL NAME`, then a count.
#   retries.sh WORKDIR SBCFLASH
set -uo pipefail
W=$1 SBC=$2
source "$USB_LAB_LIB"
source "$(dirname "$0")/checks.sh"
export HOME=/tmp XDG_CONFIG_HOME=/tmp/xdg-config XDG_CACHE_HOME=/tmp/xdg-cache XDG_DATA_HOME=/tmp/xdg-data
IMG="$W/img.raw"; SIZE=$(stat -c %s "$IMG"); SECTORS=$((SIZE / 512))
lab_init > /dev/null 2>&1
lab_modprobe loop dm-flakey > /dev/null 2>&1
{ tr '\0' '\245' < /dev/zero || true; } | head -c "$SIZE" > /tmp/backing.img
L=$(losetup -f --show /tmp/backing.img)
FA=16384 FN=2048   # the faulty segment: sectors of 8 MiB .. 9 MiB
faulty_table() {
  printf '0 %d linear %s 0\n%d %d flakey %s %d 0 3600 1 drop_writes\n%d %d linear %s %d\n' \
    $FA "$L" $FA $FN "$L" $FA $((FA + FN)) $((SECTORS - FA - FN)) "$L" $((FA + FN))
}
faulty_table | dmsetup create flaky && dmsetup mknodes flaky
DEV=/dev/mapper/flaky
[ -b "$DEV" ] && ok "dm-flakey device over $L: $(dmsetup table flaky | sed -n 2p)" || no "no $DEV"

t "--rewrites 0: the dropped range fails the write at once" 6 'verification FAILED: range at offset [0-9]+' \
  "$SBC" write "$IMG" "$DEV" --yes --force --rewrites 0
grep -q 'writing them again' /tmp/t.out && no "--rewrites 0 rewrote a range" || ok "--rewrites 0 rewrote nothing"

t "--rewrites 2 while the fault lasts: two rewrites, then FAIL" 6 'attempt 2 of 2' \
  "$SBC" write "$IMG" "$DEV" --yes --force --rewrites 2
grep -q 'attempt 3' /tmp/t.out && no "more than 2 rewrites" || ok "exactly --rewrites rewrites"
grep -Eq 'verification FAILED: range at offset [0-9]+' /tmp/t.out && ok "the failure names the range" || no "the failure does not name the range"

# The fault ends once the read-back has started: the table is swapped (suspend, load, resume)
# to all-linear, as a card that recovered; the range is rewritten and reads back right.
"$SBC" --json write "$IMG" "$DEV" --yes --force --rewrites 3 > /tmp/heal.json 2> /tmp/heal.err &
pid=$!
until grep -q '"event":"start".*"phase":"verify"\|"phase":"verify".*"event":"start"' /tmp/heal.json 2>/dev/null \
      || ! kill -0 $pid 2>/dev/null; do sleep 0.01; done
dmsetup suspend flaky
printf '0 %d linear %s 0\n' "$SECTORS" "$L" | dmsetup load flaky
dmsetup resume flaky
wait $pid; rc=$?
[ "$rc" = 0 ] && ok "the fault ended: the write succeeds after a rewrite" || { no "healed write exit $rc"; sed 's/^/    | /' /tmp/heal.json /tmp/heal.err | tail -30; }
grep -q '"retried_ranges":[1-9]' /tmp/heal.json && ok "the result counts the retried range: $(grep -o '"retried_ranges":[0-9]*' /tmp/heal.json)" \
  || { no "retried_ranges not counted"; tail -3 /tmp/heal.json | sed 's/^/    | /'; }
grep -q 'read back wrong' /tmp/heal.json && ok "the rewrite was announced as a warning" || no "no warning about the rewrite"
blockdev --flushbufs "$DEV"
dd if="$DEV" of=/tmp/back.img bs=1M iflag=direct status=none
cmp -n "$SIZE" "$IMG" /tmp/back.img > /dev/null && ok "the device holds the image" || no "device != image"

# --delta reads back what it wrote: a changed range inside the faulty segment is compared,
# found different, written (and dropped), and the read-back fails.
cp "$IMG" /tmp/img2.raw
dd if=/dev/urandom of=/tmp/img2.raw bs=4096 seek=$((8 * 256 + 3)) count=4 conv=notrunc status=none
dmsetup suspend flaky; faulty_table | dmsetup load flaky; dmsetup resume flaky
t "--delta: a changed unit that is dropped fails the read-back" 6 'verification FAILED: range at offset' \
  "$SBC" write /tmp/img2.raw "$DEV" --yes --force --delta --rewrites 0

dmsetup remove flaky; losetup -d "$L"
echo "$pass passed, $fail failed"
