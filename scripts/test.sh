#!/usr/bin/env bash
# Runs every test: formatting and lints, Rust unit and integration tests
# (real PostgreSQL and SQLite, a real OTLP receiver), the end-to-end suite
# with the real socket.io-client against the built gateway, the cluster
# suite (several pods, Redis faults, nginx, drain), the observability suite
# (promtool, a real Prometheus), the Helm chart suite (the real Helm
# engine, Kubernetes schemas) and the k6 load smoke (two release pods behind
# nginx; its thresholds fail the run on a single lost event).
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

echo "== cluster (several pods, Redis faults, nginx affinity, drain)"
tests/cluster/run.sh

echo "== observability (promtool, real Prometheus)"
tests/observability/run.sh

echo "== Helm chart and Dockerfile"
tests/helm/run.sh

echo "== load smoke (k6: classroom fan-out and handshake storm, two pods behind nginx)"
k6/run.sh --smoke
