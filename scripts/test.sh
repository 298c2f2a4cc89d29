#!/usr/bin/env bash
# The whole test suite, as CI runs it: format, lints, then every test (root-needing tests
# run when this runs as root; under CI=true they must run and fail rather than skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-debian.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# cargo-deb, cargo-fuzz, cargo-deny from crates.io (pinned; compiled on a fresh machine).
bash scripts/install-cargo-tools.sh
# Licences, banned crates (no OpenSSL), sources. `advisories` is left out: it needs a download
# of the RustSec database, which this project's machines cannot make.
cargo deny check bans licenses sources
# Every parser of untrusted input under libFuzzer for a bounded time (FUZZ_SECONDS, default 15).
bash scripts/fuzz.sh
# The USB lab's device program (tests/usb_lab.rs serves the usb::sim models with it); nextest
# does not build examples.
cargo build --example usb_lab_device
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --profile ci "$@"
else
  cargo test "$@"
fi
