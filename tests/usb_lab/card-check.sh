#!/usr/bin/env bash
# Runs in the USB lab guest (tests/usb_lab.rs): `check-card` against the kernel's own fault
# devices. A good card behind a real USB mass-storage gadget passes and keeps its data;
# scsi_debug with virtual_gb (a disk that claims 1 GiB and wraps at 64 MiB, exactly what a fake
# card does) and with a medium error; device-mapper: dm-linear mapping the upper half onto the
# lower half (fake capacity), dm-error (a failing range), dm-flakey drop_writes (writes lost).
# Prints `ok NAME` / `FAIL NAME`, then a count.
#   card-check.sh WORKDIR SBCFLASH
set -uo pipefail
W=$1 SBC=$2
source "$USB_LAB_LIB"
source "$(dirname "$0")/checks.sh"
T_TIMEOUT=240
export HOME=/tmp XDG_CONFIG_HOME=/tmp/xdg-config XDG_CACHE_HOME=/tmp/xdg-cache XDG_DATA_HOME=/tmp/xdg-data
MIB=1048576
lab_init
lab_udevd > /dev/null 2>&1

# ---- a good card in a USB card reader (removable LUN): passes without --force, data kept
head -c $((64*MIB)) /dev/urandom > /tmp/good.card
before=$(md5sum < /tmp/good.card)
lab_ums good 0x0bda 0x0129 /tmp/good.card GOOD0001 1
disk=$(lab_disk good)
t "a good card behind a USB mass-storage gadget passes" 0 'probes up to 67108864 bytes read back as written' \
  "$SBC" check-card --yes --probes 256 "$disk"
lab_unbind good
[ "$(md5sum < /tmp/good.card)" = "$before" ] && ok "the good card's data is unchanged (probed blocks written back)" || no "good card data changed"
rm -f /tmp/good.card

# ---- scsi_debug: claims 1 GiB, stores 64 MiB and wraps (a fake card)
# scsi_debug can only be unloaded once udev's probes have let go of its disk.
sdebug_unload() {
  local i
  udevadm settle 2>/dev/null
  for i in $(seq 50); do rmmod scsi_debug 2>/dev/null && return 0; sleep 0.2; done
  no "rmmod scsi_debug"
}
sdebug_disk() {
  local b
  for b in /sys/block/sd*; do
    [ "$(cat "$b/device/model" 2>/dev/null | tr -d ' ')" = scsi_debug ] && { echo "/dev/${b##*/}"; return 0; }
  done
  return 1
}
modprobe -d "$USB_LAB_KROOT" scsi_debug dev_size_mb=64 virtual_gb=1 removable=1 || no "modprobe scsi_debug"
lab_settle; sleep 1
sd=$(sdebug_disk)
t "scsi_debug virtual_gb=1 over 64 MiB: fake capacity, usable 64 MiB" 6 'fake capacity: usable 67108864 of 1073741824 claimed bytes' \
  "$SBC" check-card --yes --force "$sd"
t "--json: the report names the alias" 6 '"kind":"alias"' "$SBC" --json check-card --yes --force --probes 64 "$sd"
sdebug_unload
# A medium error on sectors 8208..8215 (the 4 KiB at byte 4202496), a probe (stride 8 KiB).
modprobe -d "$USB_LAB_KROOT" scsi_debug dev_size_mb=16 opts=2 medium_error_start=8208 medium_error_count=8 || no "modprobe scsi_debug medium error"
lab_settle; sleep 1
sd=$(sdebug_disk)
t "scsi_debug medium error: read error at byte 4198400 (exit 5)" 5 'usable 4202496 of 16777216.*reading byte 4202496' \
  "$SBC" check-card --yes --force --probes 4096 "$sd"
sdebug_unload

# ---- device-mapper over a loop device (dm devices need --force, like any non-removable disk)
lab_modprobe loop 2>/dev/null || true
lab_modprobe dm_mod dm_flakey || no "modprobe dm"
truncate -s $((64*MIB)) /tmp/dm.bin
loop=$(losetup --find --show /tmp/dm.bin)
# 64 MiB claimed, the upper 32 MiB are the lower 32 MiB again.
printf '0 65536 linear %s 0\n65536 65536 linear %s 0\n' "$loop" "$loop" | dmsetup create fake
t "dm-linear upper half onto lower half: fake capacity, usable 32 MiB" 6 'fake capacity: usable 33554432 of 67108864' \
  "$SBC" check-card --yes --force /dev/mapper/fake
dmsetup remove --retry fake
# Bytes 48..56 MiB fail every I/O.
printf '0 98304 linear %s 0\n98304 16384 error\n114688 16384 linear %s 114688\n' "$loop" "$loop" | dmsetup create bad
t "dm-error range at 48 MiB: I/O error named (exit 5)" 5 'usable 50331648 of 67108864.*(writing|reading) byte 50331648' \
  "$SBC" check-card --yes --force /dev/mapper/bad
dmsetup remove --retry bad
# The upper 16 MiB silently drop writes (always down: up 0 s, down 1 s).
printf '0 98304 linear %s 0\n98304 32768 flakey %s 98304 0 1 1 drop_writes\n' "$loop" "$loop" | dmsetup create flaky
t "dm-flakey drop_writes above 48 MiB: different data (exit 6)" 6 'card failed the check: usable 50331648 of 67108864.*reads back different data' \
  "$SBC" check-card --yes --force /dev/mapper/flaky
dmsetup remove --retry flaky
losetup -d "$loop"

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
