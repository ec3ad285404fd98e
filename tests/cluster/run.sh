#!/usr/bin/env bash
# The cluster suite: several `cellgate serve` pods on loopback sharing one
# PostgreSQL database and Redis, driven by the real socket.io-client.
#
#   multi-pod.test.mjs     three pods on the shared Redis: cross-pod delivery,
#                          presence, a 20-way claim race, duplicates across pods,
#                          session entries, kill -9
#   redis-outage.test.mjs  a private redis-server killed and restarted, and one
#                          pod cut off alone, while students post
#   sticky-nginx.test.mjs  Debian's nginx with the README's cookie affinity,
#                          200 dashboards polling first; websocket-only without
#   drain.test.mjs         SIGTERM to a pod holding 100 dashboards behind nginx
#
#   tests/cluster/run.sh                      # every test
#   tests/cluster/run.sh tests/cluster/drain.test.mjs
#
# Self-contained: installs nginx (Debian) when missing, the Node packages of
# this suite and of tests/e2e (whose helpers it imports), builds the gateway.
# Needs PostgreSQL and Redis (scripts/services.sh starts them) and redis-server
# on PATH for the private Redis of the outage test. The shared Redis on
# 127.0.0.1:6379 is only ever read and written, never stopped or flushed.
set -euo pipefail
cd "$(dirname "$0")/../.."

scripts/services.sh

if ! command -v nginx >/dev/null; then
  echo "== installing nginx (Debian)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
fi
# Where the package starts a system nginx, it does not matter: the tests run
# their own on free ports, in the foreground.

echo "== building the gateway"
cargo build --locked --bin cellgate
(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
(cd tests/cluster && npm ci --no-audit --no-fund --loglevel=error)

echo "== cluster tests (several pods, Redis faults, nginx, drain)"
if [ "$#" -eq 0 ]; then set -- tests/cluster/*.test.mjs; fi
node --test "$@"
