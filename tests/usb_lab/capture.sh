#!/usr/bin/env bash
# Runs in the USB lab guest (tests/usb_lab.rs): `sbcflash read --via maskrom` through libusb
# and the kernel's USB stack, against the rockusb model (examples/usb_lab_device.rs over
# FunctionFS) whose eMMC holds a real FAT + ext4 image, and `read --via usbboot` against the
# Raspberry Pi CM4 model holding the same. Each capture must equal the host's capture of the
# image file (blake3, bmap, bytes) and leave the eMMC untouched.
#   capture.sh WORKDIR DEVICE_PROGRAM SBCFLASH
set -uo pipefail
W=$1 DEV=$2 SBC=$3
source "$USB_LAB_LIB"
source "$(dirname "$0")/checks.sh"
T_TIMEOUT=300
lab_init

cp "$W/rk.emmc" /tmp/rk.emmc
serve rk 0x2207 0x350b RK0001 rockusb /tmp/rk.emmc
t "read --via maskrom: loader download, re-enumeration, capture over READ_LBA" 0 \
  '"event":"result"' \
  "$SBC" --json read --via maskrom --loader "$W/loader.bin" --storage emmc /tmp/board
if python3 - /tmp/t.out <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
res = [l for l in lines if l["event"] == "result"][0]
assert res["ok"] and res["job"] == "usb", res
assert res["report"]["source"].startswith("2207:350b at "), res
assert {l["job"] for l in lines} == {"usb"}, {l["job"] for l in lines}
assert "loader" in {l.get("phase") for l in lines}, lines
PY
then ok "read --via --json: one job (usb) from the loader download to the result, the board as source"; else no "read --via --json"; sed 's/^/    | /' /tmp/t.out | tail -20; fi
sleep 1
stop rk
same "the board's eMMC is unchanged (a capture only reads)" /tmp/rk.emmc "$W/rk.emmc"
same "the bmap equals the image file's capture" /tmp/board.img.bmap "$W/file.img.bmap"
if [ "$(cut -d' ' -f1 /tmp/board.img.blake3)" = "$(cut -d' ' -f1 "$W/file.img.blake3")" ]; then
  ok "the blake3 equals the image file's capture"; else no "blake3 differs"; fi
# (no /dev/fd in the guest: no process substitution)
zstd -dcq /tmp/board.img.zst > /tmp/board.img && zstd -dcq "$W/file.img.zst" > /tmp/file.img
same "the captured image equals the image file's capture, byte for byte" /tmp/board.img /tmp/file.img
# ---- Raspberry Pi CM4 in usbboot: rpiboot's second stage turns it into a mass-storage disk on
# the same port, which is then captured. The model is plugged in through USB/IP as in
# usbboot.sh (which says why); cm4() is that file's, cut to what this run needs.
lab_modprobe usbip-core vhci-hcd && modprobe -d "$USB_LAB_KROOT" usbip-vudc num=2
mkdir -p /tmp/rpi/2711
head -c 52000 /dev/urandom > /tmp/rpi/2711/bootcode4.bin
printf 'boot_ramdisk=1\n' > /tmp/rpi/2711/config.txt
(cd /tmp/rpi && tar -cf bootfiles.bin 2711 && rm -r 2711)
head -c 65536 /dev/urandom > /tmp/rpi/boot.img
G=/sys/kernel/config/usb_gadget
cm4() {
  local n=$1 emmc=$2 g i
  g=$(_lab_gadget "$n-msd" 0x0525 0xa4a5 "${n^^}EMMC" "CM4 eMMC")
  mkdir -p "$g/functions/mass_storage.0"; echo 0 > "$g/functions/mass_storage.0/lun.0/removable"
  ln -s "$g/functions/mass_storage.0" "$g/configs/c.1/"
  echo "$emmc" > "$G/$n-msd/functions/mass_storage.0/lun.0/file"
  lab_ffs "$n" 0x0a5c 0x2711 "${n^^}ROM" || return 1
  "$DEV" usbboot "/dev/ffs-$n" "$n" "$emmc" --usbip usbip-vudc.0:3 --then-ums "$n-msd" \
    --files config.txt,boot.img > "/tmp/$n.log" 2>&1 &
  echo $! > "/tmp/$n.pid"
  for i in $(seq 200); do lsusb -d 0a5c:2711 >/dev/null 2>&1 && break; sleep 0.05; done
  lab_settle
}
cp "$W/rk.emmc" /tmp/cm4.emmc
cm4 cm4 /tmp/cm4.emmc
t "read --via usbboot: rpiboot, then the CM4's eMMC disk on the same port is captured" 0 \
  'captured into /tmp/cm4.img.zst' \
  "$SBC" read --via usbboot --usbboot-dir /tmp/rpi /tmp/cm4
grep -E 'captured|storage is now' /tmp/t.out | sed 's/^/    /'
stop cm4
same "usbboot: the CM4's eMMC is unchanged" /tmp/cm4.emmc "$W/rk.emmc"
same "usbboot: the bmap equals the image file's capture" /tmp/cm4.img.bmap "$W/file.img.bmap"
zstd -dcq /tmp/cm4.img.zst > /tmp/cm4.img
same "usbboot: the captured image equals the image file's capture" /tmp/cm4.img /tmp/file.img

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
