#!/usr/bin/env bash
# Installs the cargo subcommands the test suite uses, from crates.io, pinned and --locked so a
# fresh machine gets exactly what was tested. Skips what is already there at that version.
# Measured on this project's 2-core machines (cargo install -j 1): cargo-deb ~90 s,
# cargo-fuzz ~60 s, cargo-deny ~240 s. Nothing is cached between CI runs.
set -euo pipefail
tools=(
  "cargo-deb 3.8.0"
  "cargo-fuzz 0.13.2"
  "cargo-deny 0.20.2"
)
for t in "${tools[@]}"; do
  set -- $t
  name=$1 version=$2
  if "$name" --version 2>/dev/null | grep -qF "$version"; then
    continue
  fi
  echo "installing $name $version (compiles from source: minutes)" >&2
  cargo install --locked --quiet "$name@$version"
done
