#!/usr/bin/env bash
# Routing from LDAP and PostgreSQL: login rate, latency and CPU per 1,000 logins with the
# directory cache warm (ttl 5m) and off (ttl 0s: one lookup per login), through imapgate in
# front of the load tool's fake backend. 1,000 users in turn (user0 … user999), each with an
# entry naming the fake backend. In one run, alternating, ROUNDS rounds, medians; prints a
# Markdown table (for BENCHMARKS.md) and the raw JSON lines' path.
#
#   benches/directory.sh [--rounds 3] [--seconds 5]
#
# Needs: slapd + ldap-utils, postgresql (initdb, postgres, psql). Loopback ports the OS picks.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3 SECONDS_PER=5 USERS=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --seconds) SECONDS_PER=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done

cargo build --release --quiet
BIN=$PWD/target/release
LOAD=$BIN/imapgate-load
WORK=$(mktemp -d /tmp/dir.XXXXXX)
chmod 755 "$WORK"
RESULTS=$WORK/results.jsonl
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # The postmaster runs under setpriv in a subshell: stop it by its data directory.
  pkill -f -- "-D $WORK/pg/data" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 400); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

BACKEND_PORT=$(free_port)
"$LOAD" serve --listen "127.0.0.1:$BACKEND_PORT" --body-size 1000 2>/dev/null &
PIDS+=("$!")

# --- OpenLDAP: the same tree as tests/it/support/slapd.rs -----------------------------------
LDAP_PORT=$(free_port)
mkdir -p "$WORK/ldap/data"
cat > "$WORK/ldap/slapd.conf" <<EOF
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/misc.schema
pidfile $WORK/ldap/slapd.pid
argsfile $WORK/ldap/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 104857600
suffix "dc=example,dc=net"
rootdn "cn=admin,dc=example,dc=net"
rootpw admin-secret
directory $WORK/ldap/data
index uid eq
access to attrs=userPassword by anonymous auth by * none
access to * by dn.exact="cn=imapgate,dc=example,dc=net" read by anonymous auth by * none
EOF
{
  printf 'dn: dc=example,dc=net\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n'
  printf 'dn: ou=people,dc=example,dc=net\nobjectClass: organizationalUnit\nou: people\n\n'
  printf 'dn: cn=imapgate,dc=example,dc=net\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: imapgate\nuserPassword: bind-secret\n\n'
  for i in $(seq 0 $((USERS - 1))); do
    printf 'dn: uid=user%d,ou=people,dc=example,dc=net\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nuid: user%d\ncn: user%d\nsn: user%d\nmailHost: 127.0.0.1:%d\n\n' \
      "$i" "$i" "$i" "$i" "$BACKEND_PORT"
  done
} > "$WORK/ldap/data.ldif"
/usr/sbin/slapadd -q -f "$WORK/ldap/slapd.conf" -l "$WORK/ldap/data.ldif"
/usr/sbin/slapd -d 0 -f "$WORK/ldap/slapd.conf" -h "ldap://127.0.0.1:$LDAP_PORT/" 2>"$WORK/ldap/slapd.log" &
SLAPD_PID=$!; PIDS+=("$SLAPD_PID")
printf 'bind-secret\n' > "$WORK/ldap/password"

# --- PostgreSQL: as tests/it/support/postgres.rs, as nobody when root -------------------------
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PG_BIN/initdb" ] || PG_BIN=/usr/local/bin
PG_PORT=$(free_port)
PG=$WORK/pg
mkdir -p "$PG"
PG_USER=$( [ "$(id -u)" = 0 ] && echo nobody || id -un )
as_pg() { if [ "$(id -u)" = 0 ]; then setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown nobody:nogroup "$PG"
as_pg "$PG_BIN/initdb" -D "$PG/data" -U postgres -E UTF8 --no-sync --locale=C --auth-local=trust --auth-host=trust >/dev/null
as_pg "$PG_BIN/postgres" -D "$PG/data" -p "$PG_PORT" -k "$PG" -c listen_addresses=127.0.0.1 -c fsync=off \
  -c shared_buffers=16MB -c max_connections=50 2>"$WORK/postgres.log" &
PIDS+=("$!")
for _ in $(seq 200); do "$PG_BIN/psql" -X -q -h "$PG" -p "$PG_PORT" -U postgres -d postgres -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.05; done
psql_do() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG" -p "$PG_PORT" -U postgres -d "$1" -c "$2" >/dev/null; }
psql_do postgres "CREATE DATABASE mail"
psql_do mail "CREATE TABLE mailbox (username text PRIMARY KEY, host text NOT NULL, port int)"
psql_do mail "INSERT INTO mailbox SELECT 'user' || i, '127.0.0.1', $BACKEND_PORT FROM generate_series(0, $((USERS - 1))) AS i"

# --- imapgate, one per source and cache setting -------------------------------------------------
start_imapgate() {  # name, lookup yaml
  local port admin; port=$(free_port) admin=$(free_port)
  cat > "$WORK/imapgate-$1.yaml" <<EOF
listeners: [{ name: imap, bind: "127.0.0.1:$port" }]
admin: { bind: "127.0.0.1:$admin" }
backends: [{ name: b, address: "127.0.0.1:$BACKEND_PORT" }]
limits: { max_connections: 1000000, per_ip: 1000000 }
routing: { lookup: $2 }
EOF
  IMAPGATE_LOG=warn "$BIN/imapgate" run --config "$WORK/imapgate-$1.yaml" 2>"$WORK/imapgate-$1.log" &
  PIDS+=("$!")
  eval "PORT_$1=$port PID_$1=$! ADMIN_$1=$admin"
}
LDAP="ldap: { url: \"ldap://127.0.0.1:$LDAP_PORT\", bind_dn: \"cn=imapgate,dc=example,dc=net\", bind_password_file: \"$WORK/ldap/password\", base: \"ou=people,dc=example,dc=net\", filter: \"(uid=%u)\", host_attribute: mailHost }"
SQL="sql: { url: \"postgresql://postgres@127.0.0.1:$PG_PORT/mail\", query: \"SELECT host, port FROM mailbox WHERE username = \$1\" }"
start_imapgate ldap_warm "{ $LDAP, cache: { ttl: 5m } }"
start_imapgate ldap_off "{ $LDAP, cache: { ttl: 0s, stale_max_age: 0s } }"
start_imapgate sql_warm "{ $SQL, cache: { ttl: 5m } }"
start_imapgate sql_off "{ $SQL, cache: { ttl: 0s, stale_max_age: 0s } }"
start_imapgate none "null"
for v in ldap_warm ldap_off sql_warm sql_off none; do p="PORT_$v"; wait_port "${!p}"; done
wait_port "$LDAP_PORT"

# The directory server's CPU is reported next to imapgate's: a lookup costs both. PostgreSQL
# forks a backend per connection: the postmaster and its backends (the processes of the user
# it runs as) are counted together.
for round in $(seq "$ROUNDS"); do
  for v in none ldap_warm ldap_off sql_warm sql_off; do
    p="PORT_$v" pid="PID_$v"
    case $v in
      ldap*) dir_pids=$SLAPD_PID ;;
      sql*) dir_pids="" ;;
      *) dir_pids="" ;;
    esac
    "$LOAD" login --target "127.0.0.1:${!p}" --pid "${!pid}" --label "$v" --workers 50 \
      --seconds "$SECONDS_PER" --user user --users "$USERS" >/dev/null  # warm-up: caches, pools, Postgres backends
    if [ "${v%%_*}" = sql ]; then dir_pids=$(pgrep -d, -u "$PG_USER" -f "postgres" || true); fi
    before=$(python3 - "$dir_pids" <<'PY'
import sys
t=0
for p in filter(None, sys.argv[1].split(",")):
    try: f=open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split(); t+=int(f[11])+int(f[12])
    except OSError: pass
print(t)
PY
)
    line=$("$LOAD" login --target "127.0.0.1:${!p}" --pid "${!pid}" --label "$v" --workers 50 \
      --seconds "$SECONDS_PER" --user user --users "$USERS")
    after=$(python3 - "$dir_pids" <<'PY'
import sys
t=0
for p in filter(None, sys.argv[1].split(",")):
    try: f=open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split(); t+=int(f[11])+int(f[12])
    except OSError: pass
print(t)
PY
)
    echo "$line" | python3 -c "import json,sys; d=json.load(sys.stdin); d['round']=$round; d['directory_cpu_s']=($after-$before)/$(getconf CLK_TCK); print(json.dumps(d))" >> "$RESULTS"
    tail -1 "$RESULTS" | python3 -c "import json,sys; d=json.load(sys.stdin); print(f\"{d['target']:>10} round {d['round']}: {d['logins_per_s']:8.0f} logins/s  p50 {d['p50_us']} µs  p99 {d['p99_us']} µs  imapgate CPU {d['cpu_s_per_1k_logins']:.3f} s/1k  directory CPU {d['directory_cpu_s']/max(d['logins'],1)*1000:.3f} s/1k\")"
  done
done

# Every login asked the directory (the user was found) or the cache: not the fallback.
for v in ldap_warm ldap_off sql_warm sql_off; do
  a="ADMIN_$v"
  found=$(curl -s "127.0.0.1:${!a}/metrics" | awk '/^imapgate_directory_lookups_total\{.*result="ok"/ {s += $2} END {print s + 0}')
  other=$(curl -s "127.0.0.1:${!a}/metrics" | awk '/^imapgate_directory_lookups_total\{/ && !/result="ok"/ {s += $2} END {print s + 0}')
  echo "$v: $found lookups found the user, $other did not" >&2
  [ "$found" -gt 0 ] && [ "$other" = 0 ] || { echo "$v: the directory did not answer every lookup" >&2; exit 1; }
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["target"], []).append(r)
names = {"none": "no directory (hash)", "ldap_warm": "LDAP, cache warm", "ldap_off": "LDAP, cache off",
         "sql_warm": "PostgreSQL, cache warm", "sql_off": "PostgreSQL, cache off"}
print("| routing | logins/s | p50 µs | p99 µs | imapgate CPU s / 1k logins | directory server CPU s / 1k logins |")
print("|---|---|---|---|---|---|")
for key in ["none", "ldap_warm", "ldap_off", "sql_warm", "sql_off"]:
    rs = by.get(key, [])
    if not rs:
        continue
    med = lambda f: statistics.median(f(r) for r in rs)
    print(f"| {names[key]} | {med(lambda r: r['logins_per_s']):,.0f} | {med(lambda r: r['p50_us']):,.0f} | "
          f"{med(lambda r: r['p99_us']):,.0f} | {med(lambda r: r['cpu_s_per_1k_logins']):.3f} | "
          f"{med(lambda r: r['directory_cpu_s'] / max(r['logins'], 1) * 1000):.3f} |")
PY
echo "raw results: $RESULTS"
