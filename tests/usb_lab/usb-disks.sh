#!/usr/bin/env bash
# Runs in the USB lab guest (tests/usb_lab.rs): USB card readers for real. Mass-storage gadgets
# (f_mass_storage, removable LUN) enumerated by usb-storage as /dev/sdX with a USB ID_PATH:
# `write --eject` ejects a card reader's medium (the reader stays) and powers a plain USB disk
# off; then the station with four card-reader slots matched by ID_PATH: cards plugged in
# (lab_bind), one pulled mid-write (lab_unbind) → that unit FAIL, the others PASS and ejected;
# then `bootstrap --flash-via ums` with a scripted U-Boot (uboot_board.py) whose `ums 0 mmc 0`
# plugs in a real mass-storage gadget.
# Prints `ok NAME` / `FAIL NAME`, then a count.
#   station.sh WORKDIR SBCFLASH
set -uo pipefail
W=$1 SBC=$2
source "$USB_LAB_LIB"
source "$(dirname "$0")/checks.sh"
export HOME=/tmp XDG_CONFIG_HOME=/tmp/xdg-config XDG_CACHE_HOME=/tmp/xdg-cache XDG_DATA_HOME=/tmp/xdg-data
G=/sys/kernel/config/usb_gadget
IMG="$W/img.raw"; SIZE=$(stat -c %s "$IMG")
lun() { cat "$G/$1/functions/mass_storage.0/lun.0/file"; }
lab_init
lab_udevd > /dev/null 2>&1

# ---- write --eject to a card reader (removable LUN): the medium goes, the reader stays
truncate -s 64M /tmp/rm.card
lab_ums rm 0x0bda 0x0129 /tmp/rm.card RM0001 1
disk=$(lab_disk rm)
udevadm info -q property -n "$disk" | grep '^ID_PATH=' | sed 's/^/    /'
t "write --eject to a card reader: the medium is ejected" 0 'medium was flushed and ejected: remove the card now' \
  "$SBC" write "$IMG" "$disk" --yes --eject
[ -z "$(lun rm)" ] && ok "the gadget released its LUN file (START STOP UNIT LoEj honoured)" || no "LUN file still '$(lun rm)'"
sz=$(blockdev --getsize64 "$disk" 2>&1)
{ [ "$sz" = 0 ] || [[ "$sz" == *'No medium found'* ]]; } && [ -e "/sys/block/${disk#/dev/}" ] && ok "$disk is still there (the reader stays) and reports no medium ($sz)" || no "after eject: $disk size '$sz'"
cmp -n "$SIZE" /tmp/rm.card "$IMG" > /dev/null && ok "the ejected card holds the image" || no "ejected card != image"
lab_unbind rm

# ---- write --eject to a plain USB disk (LUN not removable): powered off, as before
truncate -s 64M /tmp/hd.card
lab_ums hd 0x0bda 0x0130 /tmp/hd.card HD0001 0
disk=$(lab_disk hd)
t "write --eject to a plain USB disk: powered off" 0 'was flushed and powered off \(USB device' \
  "$SBC" write "$IMG" "$disk" --yes --force --eject
lab_settle
[ ! -e "/sys/block/${disk#/dev/}" ] && ok "the plain USB disk left the kernel (power-off)" || no "$disk still present after power-off"
[ -n "$(lun hd)" ] && ok "power-off did not eject a medium" || no "hd LUN file emptied"
cmp -n "$SIZE" /tmp/hd.card "$IMG" > /dev/null && ok "the powered-off disk holds the image" || no "powered-off disk != image"
lab_unbind hd

# ---- the station: four USB card readers on four ports, slots matched by their real ID_PATH.
# Gadgets bind to the first free dummy UDC in order, so plugging D, B, A, C puts them on
# ports 0, 1, 2, 3: slot names and port numbers differ on purpose.
declare -A PORT=([D]=0 [B]=1 [A]=2 [C]=3)
mkdir -p /tmp/st
cat > /tmp/st/station.toml <<EOF
ledger = "/tmp/st/ledger.sqlite"
image = "$IMG"
[identity]
serial = "LAB-{seq:03}"
EOF
for s in A B C D; do
  printf '[[slot]]\nname = "%s"\nmatch = { ID_PATH = "platform-dummy_hcd.%s-usb-0:1:1.0-scsi-0:0:0:0" }\n' \
    "$s" "${PORT[$s]}" >> /tmp/st/station.toml
  truncate -s 64M "/tmp/st/$s.card"
  # a card reader with a card in it, not yet plugged in
  g=$(_lab_gadget "rd$s" 0x0bda 0x0129 "READER$s" "Card Reader")
  mkdir -p "$g/functions/mass_storage.0"
  echo 1 > "$g/functions/mass_storage.0/lun.0/removable"
  echo "/tmp/st/$s.card" > "$g/functions/mass_storage.0/lun.0/file"
  ln -s "$g/functions/mass_storage.0" "$g/configs/c.1/"
done
"$SBC" --json station --config /tmp/st/station.toml --exit-after 4 > /tmp/st/out.json 2> /tmp/st/err &
st=$!
for i in $(seq 300); do grep -q 'station ready' /tmp/st/out.json && break; sleep 0.1; done
for s in D B A C; do lab_bind "rd$s"; done
# pull C's card once it is being written
for i in $(seq 600); do
  grep -q '"event":"start".*"job":"C".*"phase":"write"\|"event":"start".*"phase":"write".*"job":"C"' /tmp/st/out.json && break
  sleep 0.05
done
lab_unbind rdC
wait "$st"; rc=$?
[ "$rc" = 5 ] && ok "station: exit 5 (a unit failed)" || { no "station exit $rc, want 5"; tail -30 /tmp/st/out.json /tmp/st/err; }
for s in A B D; do
  [ -z "$(lun "rd$s")" ] && ok "slot $s: card ejected after PASS (reader still plugged)" || no "slot $s: card not ejected"
  cmp -n "$SIZE" "/tmp/st/$s.card" "$IMG" > /dev/null && ok "slot $s: card == image" || no "slot $s: card != image"
  [ -n "$(cat "$G/rd$s/UDC")" ] && ok "slot $s: reader still on the bus" || no "slot $s: reader unplugged"
done
[ -n "$(lun rdC)" ] && ok "slot C: pulled card not ejected" || no "slot C: pulled card ejected"
[ "$(od -An -tx1 -j510 -N2 /tmp/st/C.card | tr -d ' ')" != 55aa ] && ok "slot C: the pulled card has no partition table" \
  || no "slot C: the pulled card got a partition table"
grep -q '"job":"A".*card ejected; pull it\|card ejected; pull it.*"job":"A"\|A: /dev/sd[a-z]*: card ejected' /tmp/st/out.json \
  && ok "station says the card was ejected" || { no "no eject message"; grep -i eject /tmp/st/out.json | head; }
"$SBC" station report --format json --config /tmp/st/station.toml > /tmp/st/report.json 2>&1
if python3 - /tmp/st/report.json "$SIZE" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
port = {"D": 0, "B": 1, "A": 2, "C": 3}
assert len(rows) == 4, rows
for r in rows:
    s = r["slot"]
    assert r["id_path"] == f"platform-dummy_hcd.{port[s]}-usb-0:1:1.0-scsi-0:0:0:0", r
    assert r["id_serial"] and f"READER{s}" in r["id_serial"], r
    assert r["devnode"].startswith("/dev/sd"), r
    if s == "C":
        assert r["result"] == "fail", r
        why = r["failure_reason"]
        # the card was pulled: said so, not the write error it caused (ENOSPC once the kernel
        # zeroed the disk's capacity, EIO) when that error beats udev's remove event
        assert why.startswith("removed mid-write ("), why
        assert "No space left" not in why and "os error" not in why, why
        assert r["devnode"] in why, why
        print("    C:", why)
    else:
        assert r["result"] == "pass" and r["failure_reason"] is None, r
        assert r["bytes_written"] + r["bytes_skipped"] == int(sys.argv[2]), r
serials = sorted(r["unit_serial"] for r in rows)
assert serials == ["LAB-001", "LAB-002", "LAB-003", "LAB-004"], serials
PY
then ok "station report --json: 3 pass, C fail, each row with its slot's ID_PATH, reader and serial"; else
  no "station report rows"; cat /tmp/st/report.json; fi

# ---- `eject = false`: the station leaves the card in (a new card in reader A)
lab_unbind rdA
truncate -s 0 /tmp/st/A.card; truncate -s 64M /tmp/st/A.card
echo /tmp/st/A.card > "$G/rdA/functions/mass_storage.0/lun.0/file"
sed -i '1i eject = false' /tmp/st/station.toml
"$SBC" --json station --config /tmp/st/station.toml --exit-after 1 > /tmp/st/out2.json 2> /tmp/st/err2 &
st=$!
for i in $(seq 300); do grep -q 'station ready' /tmp/st/out2.json && break; sleep 0.1; done
lab_bind rdA
wait "$st"; rc=$?
[ "$rc" = 0 ] && [ -n "$(lun rdA)" ] && cmp -n "$SIZE" /tmp/st/A.card "$IMG" > /dev/null \
  && ok "eject = false: slot A PASS, the card stays in" || { no "eject = false: exit $rc, LUN '$(lun rdA)'"; tail -5 /tmp/st/out2.json; }

# ---- bootstrap --flash-via ums: U-Boot's `ums 0 mmc 0` makes a real USB disk appear
HERE=$(cd "$(dirname "$0")" && pwd)
head -c 48M /dev/urandom > /tmp/emmc.bin
python3 "$HERE/uboot_board.py" /tmp/board-tty /tmp/emmc.bin /tmp/board.events > /tmp/board.log 2>&1 &
board=$!
for i in $(seq 100); do [ -e /tmp/board-tty ] && break; sleep 0.05; done
timeout 200 "$SBC" bootstrap --flash-via ums --yes --no-handoff --port /tmp/board-tty --image "$IMG" \
  --transcript /tmp/bootstrap.log --uboot-timeout 120 --boot-timeout 120 --flash-timeout 120 \
  > /tmp/bs.out 2> /tmp/bs.err; rc=$?
kill "$board"; wait "$board" 2>/dev/null
if [ "$rc" = 0 ] && [ "$(cat /tmp/bs.out)" = 10.0.2.15 ]; then ok "bootstrap --flash-via ums: exit 0, the board's address"; else
  no "bootstrap exit $rc: $(cat /tmp/bs.out)"; tail -30 /tmp/bs.err | sed 's/^/    | /'; cat /tmp/board.log; fi
grep -Eq 'ums: /dev/sd[a-z]+' /tmp/bs.err && grep -q 'read back verified' /tmp/bs.err \
  && ok "written to the gadget's USB disk (/dev/sdX), read back verified" || { no "ums disk"; grep -i 'ums\|verif' /tmp/bs.err | head; }
[ "$(cat /tmp/board.events)" = "$(printf 'start ums 0 mmc 0\nstop')" ] && ok "U-Boot got ums 0 mmc 0, then Ctrl-C" \
  || no "board events: $(cat /tmp/board.events)"
[ "$(cat "$G/ums/UDC")" = "" ] && ok "the gadget was unplugged after the write" || no "gadget still plugged"
cmp -n "$SIZE" /tmp/emmc.bin "$IMG" > /dev/null && ok "the gadget's backing file (the eMMC) == image" || no "eMMC != image"

echo "$pass passed, $fail failed"
[ $fail = 0 ]
