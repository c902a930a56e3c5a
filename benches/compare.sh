#!/usr/bin/env bash
# Side-by-side comparison: direct, HAProxy (TCP mode), nginx's mail proxy and imapgate, against
# the fake backend (and, with --dovecot, against a real Dovecot), in one run, alternating
# targets, ROUNDS rounds, medians. Writes BENCHMARKS.md (or $OUT).
#
#   benches/compare.sh [--rounds 3] [--seconds 5] [--dovecot] [--quick]
#
# Against the fake backend it also runs the TLS scenarios: TLS terminated at the proxy, implicit
# (HAProxy, nginx, imapgate) and STARTTLS (nginx, imapgate), an ECDSA P-256 certificate.
#
# Needs: haproxy, nginx + libnginx-mod-mail (apt-get install -y haproxy nginx libnginx-mod-mail),
# and for --dovecot, dovecot-imapd. Everything listens on 127.0.0.1 ports the OS picks.
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS="$*"
ROUNDS=3 SECONDS_PER=5 DOVECOT=0 QUICK=0 OUT=${OUT:-BENCHMARKS.md}
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --seconds) SECONDS_PER=$2; shift ;;
    --dovecot) DOVECOT=1 ;;
    --quick) QUICK=1 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
IDLE_SIZES="2000 9900"
[ "$QUICK" = 1 ] && IDLE_SIZES="500"

cargo build --release --quiet
BIN=$PWD/target/release
LOAD=$BIN/imapgate-load
WORK=$(mktemp -d /tmp/cmp.XXXXXX)
chmod 755 "$WORK"
RESULTS=$WORK/results.jsonl
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

# --- the backend: the fake one, or Dovecot -------------------------------------------------
start_backend() {
  BACKEND_PORT=$(free_port)
  if [ "$1" = fake ]; then
    "$LOAD" serve --listen "127.0.0.1:$BACKEND_PORT" --body-size 1000000 2>/dev/null &
    BACKEND_PIDS=$!
  else
    local d=$WORK/dv
    mkdir -p "$d/mail/load/Maildir/"{cur,new,tmp}
    sed -e "s|@DIR@|$d|g" -e "s|@PORT@|$BACKEND_PORT|g" tests/it/support/dovecot.conf > "$d/dovecot.conf"
    echo 'load:{PLAIN}secret::::::' > "$d/passwd"
    python3 - "$d/mail/load/Maildir/cur/1.bench:2,S" <<'PY'
import sys
body = b"From: load@example.net\r\nSubject: load test\r\n\r\n"
while len(body) < 1000000:
    body += b"line of the load test message body ..................................\r\n"
open(sys.argv[1], "wb").write(body[:1000000])
PY
    chown -R mail:mail "$d/mail"
    /usr/sbin/dovecot -F -c "$d/dovecot.conf" &
    BACKEND_PIDS=$!
  fi
  PIDS+=("$BACKEND_PIDS")
  wait_port "$BACKEND_PORT"
  # The same fake backend speaking implicit TLS, for the proxies' TLS-to-backend path.
  if [ "$1" = fake ]; then
    BACKEND_TLS_PORT=$(free_port)
    "$LOAD" serve --listen "127.0.0.1:$BACKEND_TLS_PORT" --body-size 1000000 \
      --tls-cert "$WORK/certs/leaf.pem" --tls-key "$WORK/certs/leaf.key" 2>/dev/null &
    PIDS+=("$!")
    wait_port "$BACKEND_TLS_PORT"
  fi
}

# --- a CA and a certificate for localhost, for the TLS scenarios ------------------------------
make_certs() {
  local c=$WORK/certs
  mkdir -p "$c"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$c/ca.key" -out "$c/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$c/leaf.key" -out "$c/leaf.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$c/ext"
  openssl x509 -req -in "$c/leaf.csr" -CA "$c/ca.pem" -CAkey "$c/ca.key" -CAcreateserial -days 2 \
    -extfile "$c/ext" -out "$c/leaf.pem" 2>/dev/null
  cat "$c/leaf.pem" "$c/leaf.key" > "$c/haproxy.pem"
}
make_certs

# --- the proxies ----------------------------------------------------------------------------
# Every proxy process (and the auth service), to restart them between idle measurements.
PROXY_PIDS=()
stop_proxies() {
  for p in "${PROXY_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PROXY_PIDS[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done
  PROXY_PIDS=()
}
start_proxies() {
  IG_PORT=$(free_port) HA_PORT=$(free_port) NG_PORT=$(free_port) AUTH_PORT=$(free_port)
  IG_TLS_PORT=$(free_port) HA_TLS_PORT=$(free_port) NG_TLS_PORT=$(free_port)
  IG_STLS_PORT=$(free_port) NG_STLS_PORT=$(free_port)
  cat > "$WORK/imapgate.yaml" <<EOF
listeners:
  - { name: imap, bind: "127.0.0.1:$IG_PORT" }
  - { name: imaps, bind: "127.0.0.1:$IG_TLS_PORT", tls: implicit }
  - { name: imap-starttls, bind: "127.0.0.1:$IG_STLS_PORT", tls: starttls }
tls: { cert: "$WORK/certs/leaf.pem", key: "$WORK/certs/leaf.key" }
backends: [{ name: b, address: "127.0.0.1:$BACKEND_PORT" }]
limits: { max_connections: 1000000, per_ip: 1000000 }
EOF
  # Per-session info logs off, as HAProxy and nginx log nothing per connection here either.
  IMAPGATE_LOG=warn "$BIN/imapgate" run --config "$WORK/imapgate.yaml" 2>"$WORK/imapgate.log" &
  IG_PIDS=$!; PIDS+=("$IG_PIDS"); PROXY_PIDS+=("$IG_PIDS")

  cat > "$WORK/haproxy.cfg" <<EOF
global
  maxconn 9990
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend imap
  bind 127.0.0.1:$HA_PORT
  default_backend b
frontend imaps
  bind 127.0.0.1:$HA_TLS_PORT ssl crt $WORK/certs/haproxy.pem
  default_backend b
backend b
  server b1 127.0.0.1:$BACKEND_PORT
EOF
  if [ -n "${BACKEND_TLS_PORT:-}" ]; then
    HA_BTLS_PORT=$(free_port)
    cat >> "$WORK/haproxy.cfg" <<EOF
frontend imap_to_tls
  bind 127.0.0.1:$HA_BTLS_PORT
  default_backend b_tls
backend b_tls
  server b2 127.0.0.1:$BACKEND_TLS_PORT ssl verify required ca-file $WORK/certs/ca.pem verifyhost localhost
EOF
  fi
  haproxy -f "$WORK/haproxy.cfg" -db >/dev/null 2>&1 &
  HA_PIDS=$!; PIDS+=("$HA_PIDS"); PROXY_PIDS+=("$HA_PIDS")

  "$LOAD" auth-http --listen "127.0.0.1:$AUTH_PORT" --backend "127.0.0.1:$BACKEND_PORT" 2>/dev/null &
  PIDS+=("$!"); PROXY_PIDS+=("$!")
  mkdir -p "$WORK/nginx"
  cat > "$WORK/nginx/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
worker_processes auto;
daemon off;
user root;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log error;
worker_rlimit_nofile 20000;
events { worker_connections 19000; }
mail {
  server_name localhost;
  auth_http 127.0.0.1:$AUTH_PORT/auth;
  imap_capabilities IMAP4rev1 LITERAL+ SASL-IR IDLE;
  ssl_certificate $WORK/certs/leaf.pem;
  ssl_certificate_key $WORK/certs/leaf.key;
  ssl_session_cache shared:MAIL:10m;
  server { listen 127.0.0.1:$NG_PORT; protocol imap; }
  server { listen 127.0.0.1:$NG_TLS_PORT ssl; protocol imap; }
  server { listen 127.0.0.1:$NG_STLS_PORT; protocol imap; starttls only; }
}
EOF
  nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
  NG_MASTER=$!; PIDS+=("$NG_MASTER"); PROXY_PIDS+=("$NG_MASTER")

  # imapgate routing from the same auth_http service as nginx: with its cache, and without.
  IGW_PORT=$(free_port) IGN_PORT=$(free_port)
  for variant in warm:IGW_PORT:5m nocache:IGN_PORT:0s; do
    IFS=: read -r name var ttl <<<"$variant"
    cat > "$WORK/imapgate-$name.yaml" <<EOF
listeners: [{ name: imap, bind: "127.0.0.1:${!var}" }]
backends: [{ name: b, address: "127.0.0.1:$BACKEND_PORT" }]
limits: { max_connections: 1000000, per_ip: 1000000 }
routing: { lookup: { http: { url: "http://127.0.0.1:$AUTH_PORT/auth" }, cache: { ttl: $ttl, stale_max_age: 0s } } }
EOF
    IMAPGATE_LOG=warn "$BIN/imapgate" run --config "$WORK/imapgate-$name.yaml" 2>"$WORK/imapgate-$name.log" &
    PIDS+=("$!"); PROXY_PIDS+=("$!"); eval "IG_${name^^}_PIDS=$!"
  done
  wait_port "$IG_PORT"; wait_port "$HA_PORT"; wait_port "$NG_PORT"; wait_port "$IG_TLS_PORT"; wait_port "$HA_TLS_PORT"
  wait_port "$NG_TLS_PORT"; wait_port "$IG_STLS_PORT"; wait_port "$NG_STLS_PORT"
  wait_port "$IGW_PORT"; wait_port "$IGN_PORT"
  if [ -n "${BACKEND_TLS_PORT:-}" ]; then
    IG_BTLS_PORT=$(free_port)
    cat > "$WORK/imapgate-btls.yaml" <<EOF
listeners: [{ name: imap, bind: "127.0.0.1:$IG_BTLS_PORT" }]
backends: [{ name: b, address: "127.0.0.1:$BACKEND_TLS_PORT", tls: implicit, ca: "$WORK/certs/ca.pem", server_name: localhost }]
limits: { max_connections: 1000000, per_ip: 1000000 }
EOF
    IMAPGATE_LOG=warn "$BIN/imapgate" run --config "$WORK/imapgate-btls.yaml" 2>"$WORK/imapgate-btls.log" &
    IG_BTLS_PIDS=$!; PIDS+=("$!"); PROXY_PIDS+=("$!")
    wait_port "$HA_BTLS_PORT"; wait_port "$IG_BTLS_PORT"
  fi
  NG_PIDS=$(pgrep -d, -P "$NG_MASTER" || true); NG_PIDS="$NG_MASTER${NG_PIDS:+,$NG_PIDS}"
}

target_port() { case $1 in direct) echo "$BACKEND_PORT";; haproxy) echo "$HA_PORT";; nginx) echo "$NG_PORT";; imapgate) echo "$IG_PORT";; esac; }
# TLS terminated at the proxy: implicit (993-style) on all three; STARTTLS on nginx and imapgate
# (HAProxy cannot do IMAP's STARTTLS).
tls_port() {  # $1: target, $2: implicit|starttls
  case $1:$2 in
    haproxy:implicit) echo "$HA_TLS_PORT";; nginx:implicit) echo "$NG_TLS_PORT";; imapgate:implicit) echo "$IG_TLS_PORT";;
    nginx:starttls) echo "$NG_STLS_PORT";; imapgate:starttls) echo "$IG_STLS_PORT";;
  esac
}
tls_targets() { if [ "$1" = implicit ]; then echo haproxy nginx imapgate; else echo nginx imapgate; fi; }
target_pids() { case $1 in direct) echo "$BACKEND_PIDS";; haproxy) echo "$HA_PIDS";; nginx) echo "$NG_PIDS";; imapgate) echo "$IG_PIDS";; esac; }

run_scenarios() {  # $1: backend kind
  local kind=$1 round t
  for round in $(seq "$ROUNDS"); do
    for t in direct haproxy nginx imapgate; do
      local common=(--target "127.0.0.1:$(target_port $t)" --pid "$(target_pids $t)" --label "$t")
      "$LOAD" login "${common[@]}" --workers 50 --seconds "$SECONDS_PER" | sed "s/^{/{\"backend\":\"$kind\",\"round\":$round,/" >> "$RESULTS"
      "$LOAD" noop "${common[@]}" --workers 1 --seconds "$SECONDS_PER" | sed "s/^{/{\"backend\":\"$kind\",\"round\":$round,/" >> "$RESULTS"
      "$LOAD" noop "${common[@]}" --workers 50 --seconds "$SECONDS_PER" | sed "s/^{/{\"backend\":\"$kind\",\"round\":$round,/" >> "$RESULTS"
      "$LOAD" fetch "${common[@]}" --workers 1 --seconds "$SECONDS_PER" | sed "s/^{/{\"backend\":\"$kind\",\"round\":$round,/" >> "$RESULTS"
    done
    # Routing from a directory: nginx asks its auth_http service at every login (a new
    # connection each time); imapgate asks the same service with its cache warm (1,000 users
    # in turn) and off (every login a user never seen: one request per login, kept alive).
    if [ "$kind" = fake ]; then
      for t in nginx:$NG_PORT:$NG_PIDS:1000000 warm:$IGW_PORT:$IG_WARM_PIDS:1000 nocache:$IGN_PORT:$IG_NOCACHE_PIDS:100000000; do
        IFS=: read -r label port pids users <<<"$t"
        "$LOAD" login --target "127.0.0.1:$port" --pid "$pids" --label "dir-$label" --workers 50 \
          --seconds "$SECONDS_PER" --users "$users" | sed "s/^{/{\"backend\":\"$kind\",\"round\":$round,/" >> "$RESULTS"
      done
    fi
    # TLS terminated at the proxy: handshakes (implicit TLS), FETCH (implicit and STARTTLS).
    if [ "$kind" = fake ]; then
      for t in haproxy nginx imapgate; do
        for resume in "" --resume; do
          "$LOAD" tls --target "127.0.0.1:$(tls_port $t implicit)" --pid "$(target_pids $t)" --label "$t" --ca "$WORK/certs/ca.pem" \
            --server-name localhost --workers 50 --seconds "$SECONDS_PER" $resume | sed "s/^{/{\"backend\":\"$kind\",\"round\":$round,/" >> "$RESULTS"
        done
      done
      # Plain client, TLS from the proxy to the backend (nginx's mail proxy cannot).
      for t in haproxy:$HA_BTLS_PORT:$HA_PIDS imapgate:$IG_BTLS_PORT:$IG_BTLS_PIDS; do
        IFS=: read -r label port pids <<<"$t"
        "$LOAD" fetch --target "127.0.0.1:$port" --pid "$pids" --label "$label" --workers 1 \
          --seconds "$SECONDS_PER" | sed "s/^{/{\"backend\":\"fake-tls\",\"round\":$round,/" >> "$RESULTS"
      done
      for mode in implicit starttls; do
        for t in $(tls_targets $mode); do
          "$LOAD" fetch --target "127.0.0.1:$(tls_port $t $mode)" --pid "$(target_pids $t)" --label "$t" --tls $mode \
            --ca "$WORK/certs/ca.pem" --server-name localhost --workers 1 --seconds "$SECONDS_PER" | sed "s/^{/{\"backend\":\"$kind\",\"round\":$round,/" >> "$RESULTS"
        done
      done
    fi
  done
  # Idle memory: each size and kind of client side in freshly started proxies, so no run
  # reuses memory an earlier one left in an allocator.
  for n in $IDLE_SIZES; do
    local modes=plain
    [ "$kind" = fake ] && modes="plain implicit starttls"
    for mode in $modes; do
      stop_proxies; start_proxies
      if [ "$mode" = plain ]; then
        for t in haproxy nginx imapgate; do
          "$LOAD" idle --target "127.0.0.1:$(target_port $t)" --pid "$(target_pids $t)" --label "$t" \
            --sessions "$n" --workers 200 --hold 3 --sources 8 | sed "s/^{/{\"backend\":\"$kind\",\"round\":1,/" >> "$RESULTS"
        done
      else
        for t in $(tls_targets $mode); do
          "$LOAD" idle --target "127.0.0.1:$(tls_port $t $mode)" --pid "$(target_pids $t)" --label "$t" --tls $mode \
            --ca "$WORK/certs/ca.pem" --server-name localhost --sessions "$n" --workers 200 --hold 3 --sources 8 \
            | sed "s/^{/{\"backend\":\"$kind\",\"round\":1,/" >> "$RESULTS"
        done
      fi
    done
  done
}

start_backend fake
start_proxies
run_scenarios fake
if [ "$DOVECOT" = 1 ]; then
  cleanup; PIDS=(); PROXY_PIDS=()
  start_backend dovecot
  start_proxies
  IDLE_SIZES="2000"
  run_scenarios dovecot
fi

# Sections other benchmarks wrote (below the marker) survive this run.
kept="$(sed -n '/^<!-- kept by compare.sh/,$p' "$OUT" 2>/dev/null || true)"
python3 benches/compare_report.py "$RESULTS" "$ROUNDS" "$SECONDS_PER" "$ARGS" > "$OUT"
if [ -n "$kept" ]; then printf '%s\n' "$kept" >> "$OUT"; fi
echo "wrote $OUT (raw results: $RESULTS)"
