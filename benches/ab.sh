#!/usr/bin/env bash
# Two imapgate binaries side by side (e.g. before and after a change) in front of the load
# tool's fake backend: FETCH throughput and CPU per GB, NOOP latency, login rate, alternating
# A and B within each round, ROUNDS rounds, medians and the B/A ratio.
#
#   benches/ab.sh OLD_IMAPGATE NEW_IMAPGATE [--rounds 5] [--seconds 5] [--lookup]
#
# --lookup: both route from the load tool's auth_http service with the cache off (a lookup per
# login, every login a user never seen), and only the login scenario runs.
#
# The load tool is this tree's release build. Loopback ports the OS picks.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 OLD_IMAPGATE NEW_IMAPGATE [--rounds N] [--seconds S] [--lookup]" >&2; exit 64; }
A=$(realpath "$1") B=$(realpath "$2"); shift 2
ROUNDS=5 SECONDS_PER=5 LOOKUP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --seconds) SECONDS_PER=$2; shift ;;
    --lookup) LOOKUP=1 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
cargo build --release --quiet --bin imapgate-load
LOAD=$PWD/target/release/imapgate-load
WORK=$(mktemp -d /tmp/ab.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

BACKEND_PORT=$(free_port)
"$LOAD" serve --listen "127.0.0.1:$BACKEND_PORT" --body-size 1000000 2>/dev/null &
PIDS+=("$!")
ROUTING=""
if [ "$LOOKUP" = 1 ]; then
  AUTH_PORT=$(free_port)
  "$LOAD" auth-http --listen "127.0.0.1:$AUTH_PORT" --backend "127.0.0.1:$BACKEND_PORT" 2>/dev/null &
  PIDS+=("$!")
  wait_port "$AUTH_PORT"
  ROUTING="routing: { lookup: { http: { url: \"http://127.0.0.1:$AUTH_PORT/auth\" }, cache: { ttl: 0s, stale_max_age: 0s } } }"
fi
for side in A B; do
  port=$(free_port)
  cat > "$WORK/$side.yaml" <<EOF
listeners: [{ name: imap, bind: "127.0.0.1:$port" }]
backends: [{ name: b, address: "127.0.0.1:$BACKEND_PORT" }]
limits: { max_connections: 1000000, per_ip: 1000000 }
$ROUTING
EOF
  IMAPGATE_LOG=warn "${!side}" run --config "$WORK/$side.yaml" 2>"$WORK/$side.log" &
  PIDS+=("$!")
  eval "PORT_$side=$port PID_$side=$!"
  wait_port "$port"
done

for round in $(seq "$ROUNDS"); do
  for side in A B; do
    p="PORT_$side" pid="PID_$side"
    common=(--target "127.0.0.1:${!p}" --pid "${!pid}" --label "$side" --seconds "$SECONDS_PER")
    if [ "$LOOKUP" = 1 ]; then
      "$LOAD" login "${common[@]}" --workers 50 --users 100000000 >> "$WORK/results.jsonl"
      continue
    fi
    "$LOAD" fetch "${common[@]}" --workers 1 >> "$WORK/results.jsonl"
    "$LOAD" noop "${common[@]}" --workers 1 >> "$WORK/results.jsonl"
    "$LOAD" login "${common[@]}" --workers 50 >> "$WORK/results.jsonl"
  done
done

python3 - "$WORK/results.jsonl" "$A" "$B" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(scenario, side, key):
    return statistics.median(r[key] for r in rows if r["scenario"] == scenario and r["target"] == side)
print(f"A = {sys.argv[2]}\nB = {sys.argv[3]}\n")
print("| measure | A | B | B / A |")
print("|---|---|---|---|")
for scenario, key, name in [("fetch", "mb_per_s", "FETCH MB/s"), ("fetch", "cpu_s_per_gb", "CPU-s per GB"),
                            ("noop", "p50_us", "NOOP p50 µs (c=1)"), ("noop", "p99_us", "NOOP p99 µs (c=1)"),
                            ("login", "logins_per_s", "logins/s (50 workers)"), ("login", "cpu_s_per_1k_logins", "CPU-s per 1k logins")]:
    if not any(r["scenario"] == scenario for r in rows):
        continue
    a, b = med(scenario, "A", key), med(scenario, "B", key)
    print(f"| {name} | {a:,.3f} | {b:,.3f} | {b / a if a else float('nan'):.3f} |")
PY
