#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 15 s each; FUZZ_SECONDS overrides), seeded
# from the small committed corpora in fuzz/corpus/<target>/. New inputs libFuzzer finds go to a
# scratch directory, not into the repository. A crash fails the run and leaves the input in
# fuzz/artifacts/<target>/: turn it into a regression test named after what it was.
#   scripts/fuzz.sh [TARGET...]
# The stable toolchain is enough: RUSTC_BOOTSTRAP=1 lets cargo-fuzz use -Z flags. Built with
# -O (speed) and -a (debug assertions: integer overflow panics, as it would in a debug build).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-15}"
export RUSTC_BOOTSTRAP=1
# The fuzz crate builds the library with coverage instrumentation: its own target directory.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
cargo fuzz build -O -a
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "$scratch/$t" "artifacts/$t"
  echo "fuzz: $t for ${seconds}s ($(ls "corpus/$t" | wc -l) seeds)" >&2
  if ! cargo fuzz run -O -a "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=1048576 \
      -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
    tail -n 40 "$scratch/$t.log" >&2
    failed+=("$t")
  else
    grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$scratch/$t.log" | tail -n 1 >&2 || true
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: every target ran ${seconds}s without a crash (${#targets[@]} targets)"
