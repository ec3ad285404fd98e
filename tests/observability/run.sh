#!/usr/bin/env bash
# The observability suite: alert rules checked and unit-tested by promtool,
# then two gateway pods scraped by a real Prometheus (every dashboard and
# alert expression evaluated). The OTLP and log tests are Rust tests
# (tests/telemetry.rs) and run with the rest under cargo nextest.
# Self-contained: installs Prometheus (Debian) and the Node packages, builds
# the gateway with --locked. Needs PostgreSQL and Redis (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

scripts/services.sh

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "== installing prometheus (Debian)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# The Debian package starts a service where systemd runs; the tests start
# their own Prometheus on a free port, so a packaged one does not matter.

echo "== promtool check rules / test rules"
promtool check rules prometheus/cellgate-alerts.yml
promtool test rules prometheus/tests/*.yml

echo "== building the gateway"
cargo build --locked --bin cellgate
(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)

echo "== two pods, real Prometheus, every dashboard and alert expression"
# (The harness runs target/debug/cellgate; a CELLGATE_BIN variable would reach
# the gateway, which refuses unknown CELLGATE_* settings.)
node --test tests/observability/
