#!/usr/bin/env python3
"""A scripted board on a pty, for the USB lab guest (tests/usb_lab/usb-disks.sh).

The same console protocol as tests/console.rs's `scripted_board` (U-Boot autoboot countdown,
echo, Ctrl-C, `echo SYNC-n; CMD; echo RC-n-$?` framing, `reset` into a NixOS boot and a root
shell answering `ip -4 -j addr show`), but U-Boot's `ums 0 mmc 0` makes a real USB
mass-storage gadget (configfs, dummy_hcd) backed by the board's "eMMC" file, enumerated by the
guest's usb-storage as /dev/sdX; Ctrl-C unplugs it, as U-Boot ending the gadget does.

    uboot_board.py LINK EMMC LOG
LINK: a symlink made to the pty's device (sbcflash --port LINK); LOG: commands seen, one a line.
"""
import os
import re
import subprocess
import sys
import tty

link, emmc, log = sys.argv[1:4]
lib = os.environ["USB_LAB_LIB"]


def gadget(cmd):
    subprocess.run(["bash", "-c", f'source "{lib}"; {cmd}'], check=True,
                   stdout=subprocess.DEVNULL)


master, slave = os.openpty()
tty.setraw(slave)  # no echo of what the board prints before sbcflash opens the port
os.symlink(os.ttyname(slave), link)
events = open(log, "w", buffering=1)


def out(s):
    os.write(master, s.encode())


out("\r\nU-Boot 2024.01 (scripted board)\r\n\r\nDRAM:  4 GiB\r\nHit any key to stop autoboot:  3 ")
st = "countdown"
line = ""
framed = re.compile(r'^echo SY""NC-(\d+)(?:; (.*); echo RC""-\d+-\$\?)?$')
made = False
while True:
    try:
        data = os.read(master, 512)
    except OSError:
        break
    if not data:
        break
    for b in data:
        if st == "countdown":
            st = "uboot"
            out("\x08\x08\x08 0 \r\n=> ")
        elif st == "gadget":
            if b == 3:
                gadget("lab_unbind ums")
                events.write("stop\n")
                out("\r\nCTRL+C - Operation aborted\r\n=> ")
                st = "uboot"
        else:
            shell = st == "shell"
            prompt = "[root@nixos:~]# " if shell else "=> "
            if b == 3:
                line = ""
                out("^C\r\n" if shell else "<INTERRUPT>\r\n")
                out(prompt)
                continue
            if b != 13:
                line += chr(b)
                out(chr(b))
                continue
            out("\r\n")
            cmd, line = line.strip(), ""
            if st == "login":
                out("\r\n[root@nixos:~]# ")
                st = "shell"
                continue
            m = framed.match(cmd)
            n, inner = (m.group(1), m.group(2)) if m else (None, cmd)
            if n is not None:
                out(f"SYNC-{n}\r\n")
            if inner is None:
                out(prompt)
                continue
            if not shell and inner == "":
                status = 0
            elif not shell and inner.startswith("ums "):
                out("UMS: LUN 0, dev mmc 0, hwpart 0, sector 0x0, count 0x1d5a000\r\n")
                events.write(f"start {inner}\n")
                # U-Boot's ums: the board's storage appears on the host's USB.
                gadget("lab_bind ums" if made else
                       f'lab_ums ums 0x2207 0x350b "{emmc}" UMS0001 1')
                made = True
                st = "gadget"
                continue
            elif not shell and inner == "reset":
                out("resetting ...\r\n\r\nU-Boot 2024.01 (scripted board)\r\n\r\nDRAM:  4 GiB\r\nHit any key to stop autoboot:  0 \r\n")
                out("Retrieving file: /boot/extlinux/extlinux.conf\r\nStarting kernel ...\r\n\r\n")
                out("[    0.000000] Linux version 6.6.0 (nixbld@localhost) (gcc 13.2.0) #1-NixOS SMP\r\n")
                out("<<< NixOS Stage 1 >>>\r\n\r\n<<< NixOS Stage 2 >>>\r\n\r\n")
                out("<<< Welcome to NixOS 24.05 (aarch64) - ttyS0 >>>\r\n\r\nnixos login: ")
                st = "login"
                continue
            elif not shell:
                out(f"Unknown command '{inner}' - try 'help'\r\n")
                status = 1
            elif inner == "dmesg -n 1":
                status = 0
            elif inner == "ip -4 -j addr show":
                out('[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},{"ifindex":2,"ifname":"end0","addr_info":[{"family":"inet","local":"10.0.2.15","prefixlen":24,"scope":"global"}]}]')
                out("\r\n")
                status = 0
            else:
                out(f"-bash: {inner}: command not found\r\n")
                status = 127
            if n is not None and inner != cmd:
                out(f"RC-{n}-{status}\r\n")
            out(prompt)
