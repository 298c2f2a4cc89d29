#!/usr/bin/env bash
# Runs in the USB lab guest (tests/usb_lab.rs): sbcflash itself, through libusb/rusb and the
# kernel's USB stack, against its device models (examples/usb_lab_device.rs over FunctionFS)
# and a mass-storage gadget. Prints `ok NAME` / `FAIL NAME`, then a count.
#   sbcflash.sh WORKDIR DEVICE_PROGRAM SBCFLASH
set -uo pipefail
W=$1 DEV=$2 SBC=$3
source "$USB_LAB_LIB"
source "$(dirname "$0")/checks.sh"
lab_init

# ---- every model on the bus at once: `sbcflash usb --json` (no udevd running yet)
cp "$W/rk.emmc" /tmp/rk.emmc; cp "$W/fb.mmc" /tmp/fb.mmc; cp "$W/fel.dram" /tmp/fel.dram
serve rk 0x2207 0x350b RK0001 rockusb /tmp/rk.emmc
serve fb 0x2345 0x7654 FB0001 fastboot /tmp/fb.mmc --max-download 4194304
serve fel 0x1f3a 0xefe8 FEL0001 fel /tmp/fel.dram
"$SBC" --json usb > /tmp/usb.json 2>&1
if python3 - /tmp/usb.json <<'PY'
import json, sys
devs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][0]["devices"]
got = sorted((d["vid"], d["pid"], d["protocol"], d["mode"], d["soc"]) for d in devs)
want = sorted([("2207", "350b", "rockusb", "maskrom", "RK3588"),
               ("2345", "7654", "fastboot", "fastboot", "TH1520"),
               ("1f3a", "efe8", "fel", "fel", None)])
assert got == want, got
assert len({d["port_path"] for d in devs}) == 3
PY
then ok "sbcflash usb --json lists the three models with mode and SoC"; else no "sbcflash usb --json"; cat /tmp/usb.json; fi

# ---- Rockchip: maskrom → loader download → re-enumeration followed without udevd → rockusb
# write of a 24 MiB image with holes, read back, reset
t "write --via maskrom (no udevd: re-enumeration still followed)" 0 \
  'wrote 25165824 bytes \(0 skipped\) of a 25165824-byte image; read back and verified' \
  "$SBC" write --via maskrom --loader "$W/loader.bin" --storage emmc "$W/img.raw"
grep -E 'wrote' /tmp/t.out | sed 's/^/    /'
sleep 1
stop rk
same "rockusb eMMC == image (holes written as zeroes), rest untouched" /tmp/rk.emmc "$W/rk.expected"

# ---- fastboot: sparse pieces under max-download-size
t "write --via fastboot --partition mmc: holes not sent, counted as skipped" 0 'wrote 16777216 bytes \(8388608 skipped\) of a 25165824-byte image' \
  "$SBC" write --via fastboot --partition mmc "$W/img.raw"
grep -E 'wrote' /tmp/t.out | sed 's/^/    /'
sleep 1
stop fb
same "fastboot partition == image, rest untouched" /tmp/fb.mmc "$W/fb.expected"

# ---- FEL
t "fel version" 0 'D1' "$SBC" fel version
t "fel write 0x40100000" 0 '' "$SBC" fel write 0x40100000 "$W/fel.bin"
t "fel read 0x40100000 -o" 0 '' "$SBC" fel read 0x40100000 "$(stat -c %s "$W/fel.bin")" -o /tmp/fel.read
same "fel read == fel write" /tmp/fel.read "$W/fel.bin"
t "fel exec 0x40100000" 0 '' "$SBC" fel exec 0x40100000
stop fel
grep -q 'executed: \[1074790400\]' /tmp/fel.log && ok "model ran exec at 0x40100000" || no "model did not record exec"
same "FEL DRAM == garbage + file at 1 MiB" /tmp/fel.dram "$W/fel.expected"

# ---- unplug mid-write: the board leaves the bus after 8 MiB of rockusb data
cp "$W/rk.emmc" /tmp/rk2.emmc
lab_unbind rk 2>/dev/null
serve rk 0x2207 0x350b RK0001 rockusb /tmp/rk2.emmc --fault unplug@o8388608
t "unplug mid-write: exit 5, says where and that the board disconnected" 5 'WRITE_LBA failed at offset [0-9]+ .*device disconnected' \
  "$SBC" write --via maskrom --loader "$W/loader.bin" --storage emmc "$W/img.raw"
sed "s/^/    /" /tmp/t.out | tail -4
grep -q "wrote 25165824" /tmp/t.out && no "unplugged write reported as written" || ok "unplugged write not reported as written"
stop rk

# ---- the 4094-byte loader entry rkdeveloptool fails on (real-tools.sh): sbcflash sends the
# 1-byte pend transfer and counts it right
cp "$W/rk.emmc" /tmp/rk3.emmc
serve rk 0x2207 0x350b RK0001 rockusb /tmp/rk3.emmc
t "write --via maskrom with a 4094-byte loader entry" 0 'read back and verified' \
  "$SBC" write --via maskrom --loader "$W/loader4094.bin" --storage emmc "$W/small.img"
sleep 1
stop rk
grep -q 'downloads: \[(1137, 4094, true), (1138, ' /tmp/rk.log && ok "ROM model: 0x471 got 4094 bytes, good CRC; then 0x472" || { no "ROM model downloads"; tail -3 /tmp/rk.log; }

# ---- a stalled bulk endpoint: fastboot's 5th bulk transfer (the download command) halts
cp "$W/fb.mmc" /tmp/fb2.mmc
lab_unbind fb 2>/dev/null
serve fb 0x2345 0x7654 FB0001 fastboot /tmp/fb2.mmc --max-download 4194304 --fault stall@t4
t "stalled endpoint: exit 5 naming the stall" 5 'stalled' \
  "$SBC" write --via fastboot --partition mmc "$W/img.raw"

# ---- a short read: the FEL ROM sends half of the 32-byte VERSION reply (5th bulk transfer)
cp "$W/fel.dram" /tmp/fel2.dram
serve fel 0x1f3a 0xefe8 FEL0001 fel /tmp/fel2.dram --fault short@t4
t "short read: exit 5 naming it" 5 'short FEL read: device sent 16 of 32 bytes' "$SBC" fel version
stop fel
# ---- NAK forever: the FEL ROM never sends its first AWUS ack (3rd bulk transfer)
serve fel 0x1f3a 0xefe8 FEL0001 fel /tmp/fel2.dram --fault nak@t2
t "NAK forever: exit 7 after the transfer timeout" 7 'timed out' "$SBC" fel version
stop fel

# ---- mass storage: a USB disk gadget (usb-storage on the host side), seen through a real udevd
# The shipped udev rules go into the guest's udevd before it starts; their `sbcflash` group is
# added to a private copy of /etc/group (the guest sees the host's /etc read-only).
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cp /etc/group /tmp/group; echo "sbcflash:x:4242:" >> /tmp/group; mount --bind /tmp/group /etc/group
mkdir -p /run/udev/rules.d; cp "$REPO/udev-rules/70-sbcflash.rules" /run/udev/rules.d/
lab_udevd > /dev/null 2>&1
truncate -s 64M /tmp/card.img
lab_ums card 0x0bda 0x0129 /tmp/card.img CARD0001
disk=$(lab_disk card)
"$SBC" --json list > /tmp/list.json 2>&1
if python3 - /tmp/list.json "$disk" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
disks = [d for e in ev if e.get("event") == "list" for d in e["disks"]]
d = [d for d in disks if d["path"] == sys.argv[2]]
assert d and d[0]["bus"] == "usb" and d[0]["removable"] is True, disks
PY
then ok "list shows the USB disk gadget as removable on the usb bus"; else no "list: USB disk"; cat /tmp/list.json; fi
t "write IMAGE to the USB disk" 0 'read back' "$SBC" write "$W/img.raw" "$disk" --yes
sync
if cmp -n 25165824 /tmp/card.img "$W/img.raw" >/dev/null; then ok "USB disk backing file == image"; else no "USB disk backing file differs"; fi
t "verify IMAGE against the USB disk" 0 '' "$SBC" verify "$W/img.raw" "$disk"
lab_unbind card

# ---- udev rules for real: a recovery-mode board gets the rule's group and mode, and a non-root
# user in that group lists and flashes it; without the group: exit 8 with the udev hint
cp "$W/fel.dram" /tmp/fel3.dram
serve fel 0x1f3a 0xefe8 FEL0001 fel /tmp/fel3.dram
udevadm settle --timeout=10
node=$(lsusb -d 1f3a:efe8 | awk '{printf "/dev/bus/usb/%s/%s", $2, substr($4, 1, 3)}')
perm=$(stat -c '%G %a' "$node" 2>&1)
[ "$perm" = "sbcflash 660" ] && ok "udev rule: $node is group sbcflash, mode 660" || {
  no "udev rule: $node is '$perm'"; getent group sbcflash; findmnt /etc/group; }
AS="env HOME=/tmp setpriv --reuid=65534 --regid=65534"
t "non-root user in group sbcflash: usb lists the FEL board" 0 '"protocol":"fel"' \
  $AS --groups=4242 "$SBC" --json usb
t "non-root user in group sbcflash: fel write" 0 '' \
  $AS --groups=4242 "$SBC" fel write 0x40100000 "$W/fel.bin"
t "non-root user without the group: exit 8, permission denied and the udev hint" 8 'permission denied.*udev rules' \
  $AS --clear-groups "$SBC" fel version
stop fel
cmp -s -n 1048576 -i 1048576:0 /tmp/fel3.dram "$W/fel.bin" && ok "the non-root fel write reached the board" || no "non-root fel write not in DRAM"

# ---- udev rules for rockusb (maskrom, then the loader it re-enumerates as) and fastboot: the
# rule's group and mode, and the non-root user lists both and flashes each
kill -TERM "$(cat /tmp/fb.pid)" 2>/dev/null; wait "$(cat /tmp/fb.pid)" 2>/dev/null
lab_unbind fb 2>/dev/null; lab_unbind rk 2>/dev/null
cp "$W/rk.emmc" /tmp/rk4.emmc; cp "$W/fb.mmc" /tmp/fb4.mmc
serve rk 0x2207 0x350b RK0001 rockusb /tmp/rk4.emmc
serve fb 0x2345 0x7654 FB0001 fastboot /tmp/fb4.mmc --max-download 4194304
udevadm settle --timeout=10
for id in 2207:350b 2345:7654; do
  node=$(lsusb -d "$id" | awk '{printf "/dev/bus/usb/%s/%s", $2, substr($4, 1, 3)}')
  perm=$(stat -c '%G %a' "$node" 2>&1)
  [ "$perm" = "sbcflash 660" ] && ok "udev rule: $id ($node) is group sbcflash, mode 660" || no "udev rule: $id $node is '$perm'"
done
$AS --groups=4242 "$SBC" --json usb > /tmp/usb-user.json 2>&1
if python3 - /tmp/usb-user.json <<'PY'
import json, sys
devs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][0]["devices"]
got = sorted((d["protocol"], d["mode"]) for d in devs)
assert got == [("fastboot", "fastboot"), ("rockusb", "maskrom")], got
PY
then ok "non-root user in group sbcflash: usb lists the maskrom and fastboot boards"; else no "non-root usb --json"; cat /tmp/usb-user.json; fi
t "non-root user: write --via maskrom (loader download, re-enumeration, rockusb write)" 0 'read back and verified' \
  $AS --groups=4242 "$SBC" write --via maskrom --loader "$W/loader.bin" --storage emmc "$W/small.img"
sleep 1
stop rk
cmp -s -n 1048576 /tmp/rk4.emmc "$W/small.img" && ok "the non-root rockusb write reached the eMMC" || no "non-root rockusb write not on the eMMC"
t "non-root user: write --via fastboot" 0 'wrote 16777216 bytes' \
  $AS --groups=4242 "$SBC" write --via fastboot --partition mmc "$W/img.raw"
sleep 1
stop fb
same "the non-root fastboot write: partition == image, rest untouched" /tmp/fb4.mmc "$W/fb.expected"

# ---- Raspberry Pi usbboot (over USB/IP), the CM4 on a station slot, the RPi udev rule ids
source "$(dirname "$0")/usbboot.sh"

echo "$pass passed, $fail failed"
[ $fail = 0 ]
