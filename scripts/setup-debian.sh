#!/usr/bin/env bash
# Installs the Debian packages sbcflash needs to build and to run its whole test suite.
# Run as root (or it re-runs itself with sudo). Safe to run again.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then exec sudo -E bash "$0" "$@"; fi
export DEBIAN_FRONTEND=noninteractive
# Build: libudev and libusb headers for the udev/rusb crates; a C compiler for the bundled
# C code (sqlite, zstd, lzma, bzip2, ring, blake3's assembly).
BUILD_PKGS="pkg-config libudev-dev libusb-1.0-0-dev build-essential"
# Tests: real tools that make and check real inputs, and real peers.
TEST_PKGS="lintian bmap-tools android-sdk-libsparse-utils zstd xz-utils bzip2 gzip e2fsprogs dosfstools mtools fdisk udev nix-bin socat expect cpio kmod openssh-client openssh-server util-linux bsdutils lrzsz zip unzip"
# SSH host keys (tests/console.rs): a man-in-the-middle dropbear, dropbearkey/dropbearconvert
TEST_PKGS="$TEST_PKGS dropbear-bin"
# check-card's fault devices in the USB lab guest (dm-linear, dm-error, dm-flakey tables).
TEST_PKGS="$TEST_PKGS dmsetup"
# Signed images (tests/trust.rs): real minisign and gpg signatures.
TEST_PKGS="$TEST_PKGS minisign gnupg"
# A line's central ledger (tests/station_pg.rs): a real PostgreSQL server.
TEST_PKGS="$TEST_PKGS postgresql"
# `read` maps btrfs by its extent tree: mkfs.btrfs and `btrfs check` in tests.
TEST_PKGS="$TEST_PKGS btrfs-progs"
missing=""
for p in $BUILD_PKGS $TEST_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing
fi
# QEMU + U-Boot test target (bookworm-backports QEMU; see tests/harness/README.md).
if [ -x "$(dirname "$0")/../tests/harness/install-deps.sh" ]; then
  bash "$(dirname "$0")/../tests/harness/install-deps.sh"
fi
# USB lab: QEMU guest with a real USB stack (dummy_hcd, configfs gadgets, FunctionFS), its
# kernel in /var/tmp/usb-lab, and the real host tools it cross-checks against (fastboot,
# rkdeveloptool, sunxi-fel); see tests/harness/usb-lab/README.md. Idempotent.
bash "$(dirname "$0")/../tests/harness/usb-lab/install-deps.sh"
