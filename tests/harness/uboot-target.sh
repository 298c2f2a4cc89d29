#!/usr/bin/env bash
# Runs a real U-Boot (Debian's u-boot-qemu) in QEMU as a stand-in SBC whose
# serial console is a pty (or a unix socket), for testing sbcflash.
#
#   uboot-target.sh start [--disk IMG] [options]   -> prints the tty path, returns
#   uboot-target.sh cont [--settle S]  resume a target started with --paused; waits
#                             S seconds first (default 1.2): QEMU's pty backend only
#                             starts reading host input ~1 s after the pty is opened
#   uboot-target.sh wait-for REGEX [--timeout S]   grep -E the serial log
#   uboot-target.sh status    "running PID" / "stopped" (exit 0 / 1)
#   uboot-target.sh stop      (same as: uboot-target.sh --stop)
#
# Options (all subcommands): --state DIR   default: ./run next to this script
# Options of start:
#   --arch aarch64|riscv64   default aarch64 (virt, cortex-a57, qemu_arm64 U-Boot);
#                            riscv64 = virt + OpenSBI fw_dynamic + qemu-riscv64_smode U-Boot
#   --disk IMG               raw image attached as virtio-blk-pci ("virtio 0" in U-Boot)
#   --snapshot               writes to the disk go to a temp overlay, IMG unchanged
#   --serial pty|unix        pty (default): STATE/tty -> /dev/pts/N;
#                            unix: STATE/serial.sock (QEMU is the listening side)
#   --paused                 start with CPUs stopped (-S): open the tty, then `cont`,
#                            so that not one byte of the boot log is lost
#   --ssh-port N             virtio-net on QEMU user net (restrict=on, so no traffic
#                            leaves QEMU) with hostfwd 127.0.0.1:N -> guest :22;
#                            N=0: QEMU picks a free port (race-free for parallel
#                            tests), written to STATE/ssh-port
#   --net                    virtio-net on user net (restrict=on) without a forward
#   --mem MB                 default 1024      --smp N   default 1
#   --cpu NAME               aarch64 only, default cortex-a57
#   --no-reboot              QEMU exits instead of rebooting (e.g. on kernel panic)
#   --env-flash FILE         aarch64 only: persistent U-Boot environment (pflash unit 1,
#                            created as 64 MiB if missing), so `saveenv` survives, e.g.
#                            `setenv bootdelay 0; saveenv` to mimic boards without delay
#   --noise "SPEC"           console noise for the image's /init (fw_cfg opt/sbcflash/noise;
#                            e.g. "rate=5 login-burst=60 ip-burst=1 baud=1500000", see
#                            make-boot-image.sh); no commas
#
# STATE holds: qemu.pid, tty (symlink), pty (path as text), qmp.sock,
# serial.log (every byte the guest wrote, even while nobody reads the pty),
# qemu.out (QEMU's own messages), qemu.cmdline. Processes are stopped by the PID in qemu.pid only.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="$HERE/run"
ARCH=aarch64
DISK=""
SNAPSHOT=0
SERIAL=pty
PAUSED=0
SSH_PORT=""
NET=0
MEM=1024
SMP=1
CPU=cortex-a57
NOREBOOT=0
ENVFLASH=""
NOISE=""
TIMEOUT=60
SETTLE=1.2
CMD=""
REGEX=""

die() { echo "uboot-target: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        start|cont|stop|status|wait-for) CMD="$1"; shift
            if [ "$CMD" = wait-for ]; then [ $# -gt 0 ] || die "wait-for needs a regex"; REGEX="$1"; shift; fi ;;
        --stop) CMD=stop; shift ;;
        --state) STATE="$2"; shift 2 ;;
        --arch) ARCH="$2"; shift 2 ;;
        --disk) DISK="$2"; shift 2 ;;
        --snapshot) SNAPSHOT=1; shift ;;
        --serial) SERIAL="$2"; shift 2 ;;
        --paused) PAUSED=1; shift ;;
        --ssh-port) SSH_PORT="$2"; NET=1; shift 2 ;;
        --net) NET=1; shift ;;
        --mem) MEM="$2"; shift 2 ;;
        --smp) SMP="$2"; shift 2 ;;
        --cpu) CPU="$2"; shift 2 ;;
        --no-reboot) NOREBOOT=1; shift ;;
        --env-flash) ENVFLASH="$2"; shift 2 ;;
        --noise) NOISE="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        --settle) SETTLE="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
[ -n "$CMD" ] || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
[ -d "$STATE" ] && STATE="$(cd "$STATE" && pwd)"

PIDFILE="$STATE/qemu.pid"
QMP="$STATE/qmp.sock"

# PID of our QEMU, or empty. The PID is only trusted if that process is a QEMU
# whose command line names this state dir's QMP socket (guards against reuse).
our_pid() {
    local pid
    [ -f "$PIDFILE" ] || return 0
    pid="$(tr -dc '0-9' < "$PIDFILE")"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
    local cmdline
    cmdline="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" || return 0
    case "$cmdline" in *"unix:$QMP,"*) echo "$pid" ;; esac
}

qmp_raw() { # $1 = one QMP command as JSON; prints QEMU's replies
    local msg
    msg="{\"execute\":\"qmp_capabilities\"}
$1"
    if command -v socat >/dev/null; then
        printf '%s\n' "$msg" | socat -t 2 - "UNIX-CONNECT:$QMP"
    else
        python3 - "$QMP" "$msg" <<'EOF'
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(2); s.recv(65536)
for line in sys.argv[2].splitlines():
    s.sendall(line.encode() + b"\n"); time.sleep(0.2)
    try: sys.stdout.write(s.recv(65536).decode())
    except OSError: pass
EOF
    fi
}
qmp() { qmp_raw "{\"execute\":\"$1\"}" >/dev/null; }

case "$CMD" in
status)
    pid="$(our_pid)"
    if [ -n "$pid" ]; then echo "running $pid"; exit 0; else echo stopped; exit 1; fi
    ;;
cont)
    [ -n "$(our_pid)" ] || die "not running (state $STATE)"
    # QEMU polls a pty once per second to notice that someone opened it; until
    # then it writes guest output but does NOT read host input. Resuming too
    # early means the first key presses (autoboot interrupt!) are ignored.
    sleep "$SETTLE"
    qmp cont
    exit 0
    ;;
wait-for)
    end=$(( $(date +%s) + TIMEOUT ))
    while :; do
        if [ -f "$STATE/serial.log" ] && tr -d '\r' < "$STATE/serial.log" | grep -Ea -- "$REGEX" >/dev/null; then exit 0; fi
        [ "$(date +%s)" -lt "$end" ] || { echo "uboot-target: timeout waiting for /$REGEX/" >&2; exit 1; }
        [ -n "$(our_pid)" ] || { echo "uboot-target: QEMU exited while waiting for /$REGEX/" >&2; exit 1; }
        sleep 0.2
    done
    ;;
stop)
    pid="$(our_pid)"
    if [ -z "$pid" ]; then rm -f "$PIDFILE"; echo "uboot-target: not running"; exit 0; fi
    qmp quit 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; sleep 1; fi
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$PIDFILE" "$QMP" "$STATE/tty" "$STATE/pty" "$STATE/serial.sock"
    echo "uboot-target: stopped $pid"
    exit 0
    ;;
start) ;;
esac

# ------------------------------------------------------------------ start
[ -z "$(our_pid)" ] || die "already running (pid $(our_pid), state $STATE); stop it first"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
PIDFILE="$STATE/qemu.pid"
QMP="$STATE/qmp.sock"
rm -f "$PIDFILE" "$QMP" "$STATE/tty" "$STATE/pty" "$STATE/serial.sock" "$STATE/serial.log" "$STATE/qemu.out" "$STATE/ssh-port"

case "$ARCH" in
aarch64)
    UBOOT="${UBOOT_BIN:-/usr/lib/u-boot/qemu_arm64/u-boot.bin}"
    [ -f "$UBOOT" ] || die "missing $UBOOT (apt-get install u-boot-qemu)"
    Q=(qemu-system-aarch64 -M virt -cpu "$CPU" -bios "$UBOOT") ;;
riscv64)
    UBOOT="${UBOOT_BIN:-/usr/lib/u-boot/qemu-riscv64_smode/u-boot.bin}"
    SBI="${OPENSBI_BIN:-/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin}"
    [ -f "$UBOOT" ] || die "missing $UBOOT (apt-get install u-boot-qemu)"
    [ -f "$SBI" ] || die "missing $SBI (apt-get install opensbi)"
    Q=(qemu-system-riscv64 -M virt -bios "$SBI" -kernel "$UBOOT") ;;
*) die "--arch must be aarch64 or riscv64" ;;
esac
command -v "${Q[0]}" >/dev/null || die "${Q[0]} not found (see install-deps.sh)"

Q+=(-name sbcflash-uboot-target -m "$MEM" -smp "$SMP" -display none -monitor none
    -qmp "unix:$QMP,server=on,wait=off" -pidfile "$PIDFILE" -daemonize)
case "$SERIAL" in
pty)  Q+=(-chardev "pty,id=ser0,logfile=$STATE/serial.log,logappend=off") ;;
unix) Q+=(-chardev "socket,id=ser0,path=$STATE/serial.sock,server=on,wait=off,logfile=$STATE/serial.log,logappend=off") ;;
*) die "--serial must be pty or unix" ;;
esac
Q+=(-serial chardev:ser0)
if [ -n "$DISK" ]; then
    [ -f "$DISK" ] || [ -b "$DISK" ] || die "no such disk image: $DISK"
    DISK="$(cd "$(dirname "$DISK")" && pwd)/$(basename "$DISK")"  # QEMU -daemonize does chdir /
    d="if=none,id=disk0,format=raw,file=$DISK"
    [ "$SNAPSHOT" = 1 ] && d="$d,snapshot=on"
    Q+=(-drive "$d" -device virtio-blk-pci,drive=disk0)
fi
Q+=(-device virtio-rng-pci)
if [ "$NET" = 1 ]; then
    n="user,id=net0,restrict=on"
    [ -n "$SSH_PORT" ] && n="$n,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22"
    # romfile= : no iPXE option ROM (ipxe-qemu is only a Recommends of qemu-system-*,
    # and U-Boot does not need it): "failed to find romfile efi-virtio.rom" otherwise.
    Q+=(-netdev "$n" -device virtio-net-pci,netdev=net0,romfile=)
elif [ "$ARCH" = riscv64 ]; then
    # riscv64 with `-nic none`: U-Boot never saw a byte of serial input in our runs
    # (QEMU 10.0.2; autoboot could not be stopped, Ctrl-C at the prompt went unanswered),
    # while the same run with a NIC works. Keep an isolated NIC (restrict=on) there.
    Q+=(-netdev user,id=net0,restrict=on -device virtio-net-pci,netdev=net0,romfile=)
else
    Q+=(-nic none)
fi
if [ -n "$ENVFLASH" ]; then
    [ "$ARCH" = aarch64 ] || die "--env-flash is for aarch64 only (riscv64 U-Boot keeps no env)"
    [ -f "$ENVFLASH" ] || truncate -s 64M "$ENVFLASH"
    ENVFLASH="$(cd "$(dirname "$ENVFLASH")" && pwd)/$(basename "$ENVFLASH")"
    Q+=(-drive "if=pflash,unit=1,format=raw,file=$ENVFLASH")
fi
if [ -n "$NOISE" ]; then
    case "$NOISE" in *,*) die "--noise: no commas in the spec" ;; esac
    Q+=(-fw_cfg "name=opt/sbcflash/noise,string=$NOISE")
fi
[ "$PAUSED" = 1 ] && Q+=(-S)
[ "$NOREBOOT" = 1 ] && Q+=(-no-reboot)

printf '%q ' "${Q[@]}" > "$STATE/qemu.cmdline"; echo >> "$STATE/qemu.cmdline"
# With -daemonize the parent returns once the guest is set up; the pty name is
# printed (on stdout, QEMU 10; stderr on older ones) before that ("char device redirected to /dev/pts/N (label ser0)").
if ! "${Q[@]}" > "$STATE/qemu.out" 2>&1; then
    cat "$STATE/qemu.out" >&2
    die "QEMU failed to start"
fi
if [ -n "$SSH_PORT" ]; then
    # the forwarded port as QEMU bound it (matters for --ssh-port 0)
    port="$(qmp_raw '{"execute":"human-monitor-command","arguments":{"command-line":"info usernet"}}' \
        | sed -n 's/.*HOST_FORWARD[^0-9]*[0-9]* *127\.0\.0\.1 *\([0-9]*\) .*/\1/p' | head -1)"
    [ -n "$port" ] || port="$SSH_PORT"
    echo "$port" > "$STATE/ssh-port"
fi
if [ "$SERIAL" = pty ]; then
    PTS="$(sed -n 's/.*char device redirected to \(\/dev\/pts\/[0-9]*\) (label ser0).*/\1/p' "$STATE/qemu.out" | head -1)"
    [ -n "$PTS" ] || { cat "$STATE/qemu.out" >&2; "$0" stop --state "$STATE" >/dev/null; die "no pty in QEMU's output"; }
    ln -sfn "$PTS" "$STATE/tty"
    echo "$PTS" > "$STATE/pty"
    echo "$PTS"
else
    for _ in $(seq 1 50); do [ -S "$STATE/serial.sock" ] && break; sleep 0.1; done
    echo "$STATE/serial.sock"
fi
