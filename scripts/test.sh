#!/usr/bin/env bash
# Runs every test: formatting and lints, Rust unit and integration tests
# (real PostgreSQL and SQLite), then the end-to-end suite with the real
# socket.io-client against the built gateway.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

echo "== Rust tests"
cargo build --locked
cargo nextest run --locked --no-fail-fast

echo "== end-to-end tests (socket.io-client)"
(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error && node --test)
