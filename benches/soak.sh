#!/usr/bin/env bash
# Soak: a mixed load through the release imapgate against a private Dovecot for a while, its
# resources sampled all along; fails on a growth trend after the warm-up (issue 15 item 5).
#
#   benches/soak.sh [--minutes 2] [--interval 10] [--warmup SECONDS] [--out DIR]
#                   [--imapgate PATH] [--load PATH] [--scale N]
#
# `imapgate-load soak` runs the mix (logins, IDLE, SELECT/APPEND/FETCH/EXPUNGE, abrupt
# disconnects, wrong passwords); every --interval seconds benches/soak_monitor.py samples
# imapgate's RSS, open fds and CPU (/proc) and its sessions and connections (/metrics) into
# DIR/soak.csv, then plots DIR/soak.png and checks (benches/soak_monitor.py check):
#   - after the warm-up (default: 30 s or a tenth of the run, the longer), the median RSS, fds
#     and sessions of the second half are within tolerance of the first half's;
#   - the load tool saw nothing unexpected (at most 0.5% of its operations: a timeout on a
#     loaded machine), and every kind of client ran;
#   - once the load has stopped, sessions and connections go back to 0 and the fds to what
#     they were before the load.
# Exit 0 when all hold, 1 otherwise. --imapgate / --load: binaries to use instead of building
# target/release's (e.g. a variant). --scale: multiplies the workers of every kind.
# Needs dovecot-imapd and python3 with matplotlib. Ports: 127.0.0.1, picked by the OS.
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=2 INTERVAL=10 WARMUP="" OUT=target/soak IG_BIN="" LOAD="" SCALE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES=$2; shift ;;
    --interval) INTERVAL=$2; shift ;;
    --warmup) WARMUP=$2; shift ;;
    --out) OUT=$2; shift ;;
    --imapgate) IG_BIN=$2; shift ;;
    --load) LOAD=$2; shift ;;
    --scale) SCALE=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
SECONDS_TOTAL=$(python3 -c "print(round($MINUTES * 60))")
[ -n "$WARMUP" ] || WARMUP=$(python3 -c "print(max(30, round($SECONDS_TOTAL / 10)))")
if [ -z "$IG_BIN" ] || [ -z "$LOAD" ]; then
  cargo build --release --quiet --bins
  BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
  IG_BIN=${IG_BIN:-$BIN/imapgate} LOAD=${LOAD:-$BIN/imapgate-load}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/soak.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

# --- a private Dovecot, as benches/compare.sh starts one; users soak0 … soak{USERS-1} --------
W() { echo $(( $1 * SCALE )); }
LOGIN_W=$(W 4) IDLE_W=$(W 20) MAIL_W=$(W 4) ABRUPT_W=$(W 2) WRONG_W=$(W 2)
USERS=$(( MAIL_W > LOGIN_W ? MAIL_W : LOGIN_W )); USERS=$(( USERS > WRONG_W ? USERS : WRONG_W ))
DV_PORT=$(free_port)
d=$WORK/dv
mkdir -p "$d/mail"
sed -e "s|@DIR@|$d|g" -e "s|@PORT@|$DV_PORT|g" tests/it/support/dovecot.conf > "$d/dovecot.conf"
for i in $(seq 0 $(( USERS - 1 ))); do
  echo "soak$i:{PLAIN}secret::::::" >> "$d/passwd"
  mkdir -p "$d/mail/soak$i/Maildir/"{cur,new,tmp}
done
chown -R mail:mail "$d/mail"
/usr/sbin/dovecot -F -c "$d/dovecot.conf" &
PIDS+=("$!")
wait_port "$DV_PORT"

# --- imapgate, with its admin port for /metrics -----------------------------------------------
IG_PORT=$(free_port) ADMIN_PORT=$(free_port)
# The failed-login penalty shortened (0.2 s doubling to 2 s, not 2 s to 15 s), so the wrong
# passwords keep coming at a rate that shows in a few minutes; splicing on (off by default), so
# the long run covers the splice path and its pipe pool too; everything else as shipped.
cat > "$WORK/imapgate.yaml" <<EOF
listeners: [{ name: imap, bind: "127.0.0.1:$IG_PORT" }]
backends: [{ name: dovecot, address: "127.0.0.1:$DV_PORT", splice: true }]
admin: { bind: "127.0.0.1:$ADMIN_PORT" }
limits: { max_connections: 100000, per_ip: 100000, login_penalty: { base: 200ms, max: 2s } }
EOF
IMAPGATE_LOG=warn "$IG_BIN" run --threads 2 --config "$WORK/imapgate.yaml" 2>"$OUT/imapgate.log" &
IG_PID=$!; PIDS+=("$IG_PID")
wait_port "$IG_PORT"; wait_port "$ADMIN_PORT"

echo "== soak: ${MINUTES} min (${SECONDS_TOTAL} s), sampled every ${INTERVAL} s, warm-up ${WARMUP} s; imapgate pid $IG_PID; $("$IG_BIN" --version)"
python3 benches/soak_monitor.py sample --pid "$IG_PID" --metrics "http://127.0.0.1:$ADMIN_PORT/metrics" \
  --interval "$INTERVAL" --csv "$OUT/soak.csv" --stdout "$OUT/load.json" --stderr "$OUT/load.log" -- \
  "$LOAD" soak --target "127.0.0.1:$IG_PORT" --seconds "$SECONDS_TOTAL" --user soak --users "$USERS" \
  --password secret --login-workers "$LOGIN_W" --idle-workers "$IDLE_W" --mail-workers "$MAIL_W" \
  --abrupt-workers "$ABRUPT_W" --wrong-workers "$WRONG_W" --pace-ms 100 ||
  { echo "the load tool failed:"; cat "$OUT/load.log"; exit 1; }
cat "$OUT/load.log"

python3 benches/soak_monitor.py check --csv "$OUT/soak.csv" --warmup "$WARMUP" --seconds "$SECONDS_TOTAL" --load "$OUT/load.json" \
  --png "$OUT/soak.png" --title "imapgate soak, ${MINUTES} min, $("$IG_BIN" --version | cut -d' ' -f2-)"
