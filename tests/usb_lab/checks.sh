# Sourced by the USB lab's guest scripts after the lab library ($USB_LAB_LIB): the checks
# they print (`ok NAME` / `FAIL NAME`, counted for the `N passed, M failed` line the host
# test reads) and the FunctionFS device-program helpers. $DEV is the device program.
pass=0; fail=0
ok() { echo "ok   $1"; pass=$((pass+1)); }
no() { echo "FAIL $1"; fail=$((fail+1)); }
# t NAME WANT_EXIT EXPECT CMD...: CMD exits WANT_EXIT within T_TIMEOUT seconds (default 120)
# and its output matches the regex EXPECT
t() {
  local name=$1 want_rc=$2 want=$3 rc; shift 3
  timeout "${T_TIMEOUT:-120}" "$@" > /tmp/t.out 2>&1; rc=$?
  if [ "$rc" = "$want_rc" ] && { [ -z "$want" ] || grep -Eq -- "$want" /tmp/t.out; }; then ok "$name"; else
    no "$name (exit $rc, want $want_rc)"; sed 's/^/    | /' /tmp/t.out | tail -40; dmesg | tail -8 | sed 's/^/    dmesg| /'; fi
}
# serve NAME VID PID SERIAL MODEL ARGS...: the device program answering as MODEL on a new
# FunctionFS gadget, bound and enumerated
serve() {
  local name=$1 vid=$2 pid=$3 serial=$4 i; shift 4
  [ -d "/sys/kernel/config/usb_gadget/$name" ] || lab_ffs "$name" "$vid" "$pid" "$serial" || return 1
  "$DEV" "$1" "/dev/ffs-$name" "$name" "${@:2}" > "/tmp/$name.log" 2>&1 &
  echo $! > "/tmp/$name.pid"
  for i in $(seq 200); do grep -q READY "/tmp/$name.log" && break; sleep 0.05; done
  lab_bind "$name" || return 1
  # enumerated (under load the host may retry enumeration at a new address before it settles)
  for i in $(seq 100); do lsusb -d "${vid#0x}:${pid#0x}" >/dev/null 2>&1 && break; sleep 0.1; done
  sleep 0.5
}
stop() { local p; p=$(cat "/tmp/$1.pid"); kill -TERM "$p"; wait "$p"; }
same() { if cmp "$2" "$3" >/dev/null; then ok "$1"; else no "$1: $(cmp "$2" "$3" 2>&1 | head -1)"; fi; }
