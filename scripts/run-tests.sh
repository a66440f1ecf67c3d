#!/usr/bin/env bash
# Runs the whole test suite (unit, store conformance on PostgreSQL and SQLite, service and
# end-to-end tests). Uses cargo-nextest when installed, cargo test otherwise.
set -euo pipefail
# The end-to-end tests start the real binaries: build them first.
cargo build -p clienteled -p clientele
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-fail-fast "$@"
else
  exec cargo test --workspace --no-fail-fast "$@"
fi
