#!/usr/bin/env bash
# Runs in the USB lab guest (tests/usb_lab.rs): sbcflash's device models (examples/
# usb_lab_device.rs over FunctionFS) answer the real host tools people flash boards with.
# Every tool command must succeed and each model's backing file must end byte-identical to what
# the tools sent (W/*.expected, made on the host). Prints `ok NAME` / `FAIL NAME`, then a count.
#   real-tools.sh WORKDIR DEVICE_PROGRAM
set -uo pipefail
W=$1 DEV=$2
source "$USB_LAB_LIB"
source "$(dirname "$0")/checks.sh"
# t NAME EXPECT CMD...: run CMD; ok when it exits 0 and its output matches the regex EXPECT
t() {
  local name=$1 want=$2 out rc; shift 2
  out=$(timeout 60 "$@" 2>&1); rc=$?
  if [ $rc = 0 ] && { [ -z "$want" ] || grep -Eq -- "$want" <<<"$out"; }; then ok "$name"; else
    no "$name (exit $rc)"; sed 's/^/    | /' <<<"$out" | tail -15; dmesg | tail -8 | sed 's/^/    dmesg| /'; fi
}
# serve, stop and same come from checks.sh; `stop NAME` makes the model write its storage
# back to the backing file and exit.
wait_usb() { local i; for i in $(seq 100); do lsusb -d "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
lab_init

# ---- Rockchip: rkdeveloptool against the RK3588 maskrom → loader model
cp "$W/rk.emmc" /tmp/rk.emmc
serve rk 0x2207 0x350b RK0001 rockusb /tmp/rk.emmc
t "rkdeveloptool ld lists the maskrom" 'Vid=0x2207,Pid=0x350b.*Maskrom' rkdeveloptool ld
t "rkdeveloptool db LOADER (0x471/0x472 control download)" 'Downloading bootloader succeeded' rkdeveloptool db "$W/loader.bin"
sleep 1; wait_usb 2207:350b
t "rkdeveloptool rci after re-enumeration (loader answers bulk commands)" 'Chip Info: *38 38 35 33' rkdeveloptool rci
t "rkdeveloptool rfi" 'Flash Size: *32 MB' rkdeveloptool rfi
t "rkdeveloptool ul LOADER (IDB at sector 64)" 'Upgrading loader succeeded' rkdeveloptool ul "$W/loader.bin"
t "rkdeveloptool rl 64 (IDB read back)" 'Read LBA to file \(100%\)' rkdeveloptool rl 64 "$(cat "$W/idb.sectors")" /tmp/idb.read
if ! cmp -s /tmp/idb.read <(dd if="$W/rk.emmc" bs=512 skip=64 count="$(cat "$W/idb.sectors")" status=none); then
  ok "ul changed sectors 64.. (the IDB)"; else no "ul left sectors 64.. unchanged"; fi
t "rkdeveloptool wl 0 IMAGE" 'Write LBA from file \(100%\)' rkdeveloptool wl 0 "$W/rk.img"
t "rkdeveloptool rl 0 (image read back)" 'Read LBA to file \(100%\)' rkdeveloptool rl 0 "$(( $(stat -c %s "$W/rk.img") / 512 ))" /tmp/rk.read
same "rl returns the image byte for byte" /tmp/rk.read "$W/rk.img"
t "rkdeveloptool rd" 'Reset Device OK' rkdeveloptool rd
sleep 1
if lsusb -d 2207:350b >/dev/null 2>&1; then no "board left the bus after rd"; else ok "board left the bus after rd"; fi
stop rk
same "rockusb backing file == garbage + image" /tmp/rk.emmc "$W/rk.expected"

# rkdeveloptool's own bug, kept out of the model: a 4094-byte entry plus its CRC is one full
# 4096-byte transfer, then a 1-byte "pend" transfer; RKComm.cpp (RKU_DeviceRequest) checks that
# libusb_control_transfer returned 0, but it returns the byte count, 1. The ROM model got the
# whole area with a good CRC (its summary), the tool reports failure anyway.
cp "$W/rk.emmc" /tmp/rk94.emmc
serve rk 0x2207 0x350b RK0001 rockusb /tmp/rk94.emmc
out=$(timeout 60 rkdeveloptool db "$W/loader4094.bin" 2>&1); rc=$?
if [ $rc != 0 ] && grep -q 'Downloading bootloader failed' <<<"$out"; then
  ok "rkdeveloptool db fails on a 4094-byte entry (its pend-packet check)"; else
  no "rkdeveloptool db on a 4094-byte entry: exit $rc: $out"; fi
stop rk
grep -q 'downloads: \[(1137, 4094, true)\]' /tmp/rk.log && ok "the ROM model received the 4094-byte area with a good CRC" || { no "ROM model 4094 area"; tail -3 /tmp/rk.log; }

# ---- fastboot: Android's fastboot against the U-Boot fastboot model (max-download-size 4 MiB)
cp "$W/fb.mmc" /tmp/fb.mmc
serve fb 0x2345 0x7654 FB0001 fastboot /tmp/fb.mmc --max-download 4194304
t "fastboot devices" 'FB0001[[:space:]]+fastboot' fastboot devices
t "fastboot getvar max-download-size" 'max-download-size: 0x00400000' fastboot -s FB0001 getvar max-download-size
t "fastboot flash mmc RAW (under max-download-size)" 'Finished' fastboot -s FB0001 flash mmc "$W/fb.raw"
t "fastboot erase mmc" 'Finished' fastboot -s FB0001 erase mmc
t "fastboot flash mmc SPARSE (img2simg, above max-download-size: split)" 'Sending sparse .mmc. 2/' fastboot -s FB0001 flash mmc "$W/fb.sparse"
t "fastboot reboot" 'Finished' fastboot -s FB0001 reboot
sleep 1
if lsusb -d 2345:7654 >/dev/null 2>&1; then no "fastboot device left the bus after reboot"; else ok "fastboot device left the bus after reboot"; fi
stop fb
same "fastboot backing file == simg2img of the sparse image" /tmp/fb.mmc "$W/fb.expected"

# ---- Allwinner FEL: sunxi-fel against the D1 boot ROM model (DRAM at 0x40000000)
cp "$W/fel.dram" /tmp/fel.dram
serve fel 0x1f3a 0xefe8 FEL0001 fel /tmp/fel.dram
t "sunxi-fel version (SoC ID 0x1859: D1/T113/R528)" 'AWUSBFEX soc=00001859\(R528\)' sunxi-fel version
t "sunxi-fel write 0x40100000 FILE" '' sunxi-fel write 0x40100000 "$W/fel.bin"
t "sunxi-fel read 0x40100000 LEN" '' sunxi-fel read 0x40100000 "$(stat -c %s "$W/fel.bin")" /tmp/fel.read
same "sunxi-fel read returns what write sent" /tmp/fel.read "$W/fel.bin"
t "sunxi-fel exe 0x40100000" '' sunxi-fel exe 0x40100000
stop fel
grep -q 'executed: \[1074790400\]' /tmp/fel.log && ok "model ran exe at 0x40100000" || { no "model did not record exe"; tail -5 /tmp/fel.log; }
same "FEL backing (DRAM) == garbage + file at 1 MiB" /tmp/fel.dram "$W/fel.expected"

echo "$pass passed, $fail failed"
[ $fail = 0 ]
