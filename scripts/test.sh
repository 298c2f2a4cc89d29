#!/usr/bin/env bash
# The whole test suite, as CI runs it: format, lints, then every test (root-needing tests
# run when this runs as root; under CI=true they must run and fail rather than skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-debian.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --profile ci "$@"
else
  cargo test "$@"
fi
