# Sourced by sbcflash.sh at its end (same guest boot, udevd and the shipped rules running):
# Raspberry Pi usbboot through a real USB stack. The model (usb::sim::usbboot, served by the
# device program) is plugged in through USB/IP (usbip-vudc → vhci_hcd), not dummy_hcd: rpiboot
# tells the boot ROM from its second stage by the device descriptor's iSerialNumber index (0 or
# 3: ROM), and configfs only ever presents 0 or 3, so the program's relay sets the model's
# index. vudc also gives the bulk OUT endpoint number 1, the one rpiboot hardcodes. The second
# stage then becomes a mass-storage gadget on the same vhci port (the CM4's eMMC).
lab_modprobe usbip-core vhci-hcd && modprobe -d "$USB_LAB_KROOT" usbip-vudc num=2
# The boot files as usbboot's mass-storage-gadget64 ships them: bootfiles.bin (tar) holding
# 2711/bootcode4.bin and 2711/config.txt, loose files beside it.
mkdir -p /tmp/rpi/2711
head -c 52000 /dev/urandom > /tmp/rpi/2711/bootcode4.bin
printf 'boot_ramdisk=1\n' > /tmp/rpi/2711/config.txt
(cd /tmp/rpi && tar -cf bootfiles.bin 2711 && mkdir -p /tmp/rpi-loose && mv 2711 /tmp/rpi-loose/)
head -c 3145728 /dev/urandom > /tmp/rpi/boot.img
G=/sys/kernel/config/usb_gadget
# cm4 NAME EMMC [device program options]: a CM4 in usbboot on vhci port 3 (hub port 4) whose
# second stage turns into the mass-storage gadget NAME-msd backed by EMMC
cm4() {
  local n=$1 emmc=$2 g i; shift 2
  [ -d "$G/$n-msd" ] || {
    g=$(_lab_gadget "$n-msd" 0x0525 0xa4a5 "${n^^}EMMC" "CM4 eMMC")
    mkdir -p "$g/functions/mass_storage.0"; echo 0 > "$g/functions/mass_storage.0/lun.0/removable"
    ln -s "$g/functions/mass_storage.0" "$g/configs/c.1/"; }
  echo "$emmc" > "$G/$n-msd/functions/mass_storage.0/lun.0/file"
  [ -d "$G/$n" ] || lab_ffs "$n" 0x0a5c 0x2711 "${n^^}ROM" || return 1
  "$DEV" usbboot "/dev/ffs-$n" "$n" "$emmc" --usbip usbip-vudc.0:3 --then-ums "$n-msd" \
    --files config.txt,boot.img,missing.bin,../../etc/passwd "$@" > "/tmp/$n.log" 2>&1 &
  echo $! > "/tmp/$n.pid"
  for i in $(seq 200); do lsusb -d 0a5c:2711 >/dev/null 2>&1 && break; sleep 0.05; done
  lab_settle
}
unplug_cm4() { echo 3 > /sys/devices/platform/vhci_hcd.0/detach 2>/dev/null; echo "" > "$G/$1/UDC" 2>/dev/null; echo "" > "$G/$1-msd/UDC" 2>/dev/null; lab_settle; }

truncate -s 64M /tmp/cm4.emmc
cm4 cm4 /tmp/cm4.emmc
lsusb -v -d 0a5c:2711 2>/dev/null | grep -E 'iSerial|bEndpointAddress' | sed 's/^/    /'
"$SBC" --json usb > /tmp/usb-rpi.json 2>&1
if python3 - /tmp/usb-rpi.json <<'PY'
import json, sys
devs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][0]["devices"]
d = [d for d in devs if (d["vid"], d["pid"]) == ("0a5c", "2711")]
assert len(d) == 1 and d[0]["protocol"] == "usbboot" and d[0]["mode"].lower() == "rom" \
    and d[0]["soc"] == "BCM2711" and d[0]["port_path"].endswith("-4"), devs
PY
then ok "usb --json: the CM4 in usbboot (ROM, BCM2711) on the vhci port"; else no "usb --json (rpi)"; cat /tmp/usb-rpi.json; fi
node=$(lsusb -d 0a5c:2711 | awk '{printf "/dev/bus/usb/%s/%s", $2, substr($4, 1, 3)}')
perm=$(stat -c '%G %a' "$node" 2>&1)
[ "$perm" = "sbcflash 660" ] && ok "udev rule: 0a5c:2711 ($node) is group sbcflash, mode 660" || no "udev rule: 0a5c:2711 $node is '$perm'"
t "write --via usbboot: bootcode4.bin from bootfiles.bin, the file server, then the eMMC disk on the same port" 0 \
  'read back' \
  "$SBC" write --via usbboot --usbboot-dir /tmp/rpi "$W/small.img" --yes
grep -E 'bootcode4|served|storage is now|asked for' /tmp/t.out | sed 's/^/    | /'
stop cm4
cmp -n 1048576 /tmp/cm4.emmc "$W/small.img" >/dev/null && ok "usbboot: the CM4's eMMC (mass-storage stage) == image" || no "usbboot: eMMC != image"
same "usbboot: the ROM got bootcode4.bin (2711/ in bootfiles.bin) byte for byte" /tmp/cm4.emmc.files/SECOND_STAGE /tmp/rpi-loose/2711/bootcode4.bin
same "usbboot: config.txt came from bootfiles.bin's 2711/" /tmp/cm4.emmc.files/config.txt /tmp/rpi-loose/2711/config.txt
same "usbboot: boot.img (3 MiB, 16 KiB bulk pieces) from the top level" /tmp/cm4.emmc.files/boot.img /tmp/rpi/boot.img
grep -q 'sizes: \[("config.txt", 15), ("boot.img", 3145728), ("missing.bin", 0), ("../../etc/passwd", 0)\]' /tmp/cm4.log \
  && grep -q 'stage: MassStorage' /tmp/cm4.log \
  && ok "usbboot: GetFileSize answers (0 for missing and for a path outside the directory), then mass storage" \
  || { no "usbboot model summary"; tail -5 /tmp/cm4.log; }
unplug_cm4 cm4

# ---- fail@: the boot ROM rejects the second stage (its 4-byte status is -1)
truncate -s 0 /tmp/cm4b.emmc; truncate -s 64M /tmp/cm4b.emmc
cm4 cm4 /tmp/cm4b.emmc --fault fail@t0
t "usbboot fail@: the ROM's non-zero status is exit 5 naming it" 5 'rejected the second stage \(return code -1\)' \
  "$SBC" write --via usbboot --usbboot-dir /tmp/rpi "$W/small.img" --yes
stop cm4
unplug_cm4 cm4

# ---- the station: a CM4 on a `kind = "usb"` slot (its vhci port), usbboot, then the disk that
# appears on the same port written as the unit (the disk is a non-removable LUN, as a board's
# eMMC may well be: the station must still take it)
mkdir -p /tmp/st-rpi
cat > /tmp/st-rpi/station.toml <<EOT
ledger = "/tmp/st-rpi/ledger.sqlite"
image = "$W/small.img"
[identity]
serial = "CM4-{seq:03}"
[usb]
usbboot-dir = "/tmp/rpi"
[[slot]]
name = "cm4"
kind = "usb"
match = { DEVPATH = "/devices/platform/vhci_hcd.0/usb*/*-4" }
EOT
HOME=/tmp "$SBC" --json station --config /tmp/st-rpi/station.toml --exit-after 1 > /tmp/st-rpi/out.json 2> /tmp/st-rpi/err &
st=$!
for i in $(seq 300); do grep -q 'station ready' /tmp/st-rpi/out.json && break; sleep 0.1; done
truncate -s 64M /tmp/cm4c.emmc
# this board answers file requests with short replies and boots on without a Done message
# (rpiboot takes both: it ignores the reply length and ends the file server when the device goes)
cm4 cm4 /tmp/cm4c.emmc --files config.txt,boot.img,@short,@boot
wait "$st"; rc=$?
[ "$rc" = 0 ] && ok "station: the CM4 slot PASS (exit 0)" || { no "station (CM4) exit $rc"; tail -n 20 /tmp/st-rpi/out.json /tmp/st-rpi/err; }
stop cm4
grep -q 'stage: MassStorage .*files: \[("boot.img", Some(3145728)), ("config.txt", Some(15))\]' /tmp/cm4.log \
  && ok "station: short file requests, no Done: both files served, then mass storage" || { no "station: CM4 model summary"; tail -3 /tmp/cm4.log; }
cmp -n 1048576 /tmp/cm4c.emmc "$W/small.img" >/dev/null && ok "station: the CM4's eMMC == image" || no "station: CM4 eMMC != image"
HOME=/tmp "$SBC" station report --format json --config /tmp/st-rpi/station.toml > /tmp/st-rpi/report.json 2>&1
python3 - /tmp/st-rpi/report.json <<'PY' && ok "station report: one CM4 row, pass, serial CM4-001" || { no "station report (CM4)"; cat /tmp/st-rpi/report.json; }
import json, sys
rows = json.load(open(sys.argv[1]))
assert len(rows) == 1 and rows[0]["result"] == "pass" and rows[0]["unit_serial"] == "CM4-001", rows
PY
unplug_cm4 cm4

# ---- udev rules: every Raspberry Pi boot ROM id gets the rule (plain gadgets with those ids)
for pid in 2763 2764 2712; do
  truncate -s 1M "/tmp/id$pid.img"; lab_ums "id$pid" 0x0a5c "0x$pid" "/tmp/id$pid.img" "ID$pid" > /dev/null
  udevadm settle --timeout=10
  node=$(lsusb -d "0a5c:$pid" | awk '{printf "/dev/bus/usb/%s/%s", $2, substr($4, 1, 3)}')
  perm=$(stat -c '%G %a' "$node" 2>&1)
  [ "$perm" = "sbcflash 660" ] && ok "udev rule: 0a5c:$pid ($node) is group sbcflash, mode 660" || no "udev rule: 0a5c:$pid $node is '$perm'"
  lab_unbind "id$pid"
done
