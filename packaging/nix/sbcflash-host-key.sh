#!/bin/sh
# Moves a host key that the sbcflash station put on the FAT partition into sshd's place, once:
#   sbcflash-host-key.sh FAT_DIR KEY_PATH SSH_DIR
# FAT_DIR: where the FAT partition is mounted; KEY_PATH: the station's `[identity] host_key`
# (relative to FAT_DIR); SSH_DIR: /etc/ssh. The key (and its .pub) leave the FAT partition, which
# anyone with the card can read. An existing key in SSH_DIR is never replaced. Exit 0 when there
# is nothing to do.
set -eu
fat="$1"
src="$fat/$2"
dir="$3"
dst="$dir/ssh_host_ed25519_key"
[ -f "$src" ] || exit 0
if [ -e "$dst" ]; then
    echo "sbcflash-host-key: $dst exists; leaving it, removing the station's copy" >&2
else
    mkdir -p "$dir"
    umask 077
    tmp="$dst.sbcflash.$$"
    cp "$src" "$tmp"
    chmod 600 "$tmp"
    # The public half from the private one: a .pub that does not match is never installed.
    ssh-keygen -y -f "$tmp" > "$tmp.pub"
    chmod 644 "$tmp.pub"
    mv "$tmp.pub" "$dst.pub"
    mv "$tmp" "$dst"
    echo "sbcflash-host-key: installed $dst ($(ssh-keygen -l -f "$dst.pub" | cut -d' ' -f2))"
fi
rm -f "$src" "$src.pub"
sync
