#!/usr/bin/env bash
# Makes sure the services the tests need answer: PostgreSQL on 127.0.0.1:5432
# and Redis on 127.0.0.1:6379. Starts them (Debian packages) when they do not.
set -euo pipefail

wait_for() { # name, check command...
  local name=$1; shift
  for _ in $(seq 1 30); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "error: $name does not answer after 30 s" >&2
  return 1
}

if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  wait_for PostgreSQL pg_isready -h 127.0.0.1 -p 5432 -q
fi
psql postgres://postgres@127.0.0.1:5432/test -qtAc 'select 1' >/dev/null \
  || { echo "error: PostgreSQL answers but database 'test' is not usable" >&2; exit 1; }

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_for Redis redis-cli -h 127.0.0.1 -p 6379 ping
fi
echo "services: PostgreSQL and Redis answer"
