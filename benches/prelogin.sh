#!/usr/bin/env bash
# Pre-login parsing cost (issue 15 item 2): is imapgate's CPU per octet flat in the command's
# size, and below the sender's? `imapgate-load prelogin` sends pre-login commands of the attack's
# shape (`a SEARCH` + ` TEXT {0+}\r\n` × n + `\r\n`, one segment per line) of 8, 16, 32 and
# 64 KiB to the release imapgate (line_max 65536), alternating the sizes, ROUNDS rounds, each
# size the same octets per round; prints the medians and fails (exit 1) unless
#   - imapgate's CPU per KiB at every size is at most 2× that at 8 KiB, and
#   - imapgate's CPU is below the sender's at every size.
#
#   benches/prelogin.sh [--rounds 3] [--mib 8] [--pause-us 0] [--imapgate PATH] [--load PATH] [--out FILE]
#
# --mib: octets sent per size and round. --pause-us: a pause after each line, so lines arrive
# one at a time (a slow or remote client; then use a smaller --mib, e.g. 0.5). --imapgate / --load: binaries to use instead of
# building target/release's (e.g. an older imapgate, to compare). --out: the raw JSON lines.
# Everything listens on 127.0.0.1 ports the OS picks; no backend is needed (nothing logs in).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3 MIB=8 PAUSE_US=0 IG_BIN="" LOAD="" OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --mib) MIB=$2; shift ;;
    --pause-us) PAUSE_US=$2; shift ;;
    --imapgate) IG_BIN=$2; shift ;;
    --load) LOAD=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
if [ -z "$IG_BIN" ] || [ -z "$LOAD" ]; then
  cargo build --release --quiet --bins
  BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
  IG_BIN=${IG_BIN:-$BIN/imapgate} LOAD=${LOAD:-$BIN/imapgate-load}
fi
WORK=$(mktemp -d /tmp/prelogin.XXXXXX)
RESULTS=${OUT:-$WORK/results.jsonl}
: > "$RESULTS"
IG_PID=""
cleanup() { [ -n "$IG_PID" ] && kill "$IG_PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

PORT=$(free_port)
# One worker thread: the commands come on one connection anyway. Nothing logs in, so the
# backend is never dialled (nor health-checked: TCP mode at a closed port costs nothing).
# bad_commands and the pre-login timeout high, so connections last; line_max as in the issue.
cat > "$WORK/imapgate.yaml" <<EOF
listeners: [{ name: imap, bind: "127.0.0.1:$PORT" }]
backends: [{ name: b, address: "127.0.0.1:9" }]
health: { mode: tcp, interval: 1h }
limits: { line_max: 65536, literal_max: 8192, bad_commands: 1000000 }
timeouts: { prelogin: 1h }
EOF
IMAPGATE_LOG=warn "$IG_BIN" run --threads 1 --config "$WORK/imapgate.yaml" 2>"$WORK/imapgate.log" &
IG_PID=$!
wait_port "$PORT"

SIZES="8192 16384 32768 65536"
for round in $(seq "$ROUNDS"); do
  for size in $SIZES; do
    commands=$(python3 -c "print(max(1, int($MIB * 1048576 // $size)))")
    "$LOAD" prelogin --target "127.0.0.1:$PORT" --pid "$IG_PID" --label imapgate \
      --size "$size" --commands "$commands" --pause-us "$PAUSE_US" 2>/dev/null |
      sed "s/^{/{\"round\":$round,/" >> "$RESULTS"
  done
done

python3 - "$RESULTS" "$ROUNDS" "$("$IG_BIN" --version)" "$PAUSE_US" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds, version, pause = sys.argv[2], sys.argv[3], int(sys.argv[4])
sizes = sorted({r["size"] for r in rows})
med = lambda xs: statistics.median(xs)
table, failures = [], []
for s in sizes:
    rs = [r for r in rows if r["size"] == s]
    bad = [r for r in rs if r["reconnects"] or r["answered"] != r["commands"]]
    if bad:
        failures.append(f"{s}: commands not all answered on one connection: {bad[0]}")
    table.append(dict(size=s, octets=rs[0]["command_octets"], lines=rs[0]["lines_per_command"],
                      commands=rs[0]["commands"], answers=rs[0]["answers"],
                      ig=med([r["target_us_per_kib"] for r in rs]),
                      snd=med([r["sender_us_per_kib"] for r in rs]),
                      ratio=med([r["target_to_sender"] for r in rs])))
base = table[0]["ig"]
paced = f", a {pause} µs pause after each line" if pause else ""
print(f"{version}; {rounds} rounds, medians{paced}; CPU per KiB sent (µs)")
print()
print("| command size | octets (lines) | commands per round | imapgate µs/KiB | sender µs/KiB | imapgate ÷ sender | imapgate vs 8 KiB |")
print("|---|---|---|---|---|---|---|")
for t in table:
    rel = t["ig"] / base if base else float("inf")
    print(f"| {t['size'] // 1024} KiB | {t['octets']:,} ({t['lines']:,}) | {t['commands']:,} | {t['ig']:.1f} | {t['snd']:.1f} | {t['ratio']:.2f} | {rel:.2f}× |")
    if rel > 2.0:
        failures.append(f"{t['size']}: imapgate's CPU per KiB is {rel:.2f}× that at 8 KiB (at most 2×)")
    if t["ratio"] >= 1.0:
        failures.append(f"{t['size']}: imapgate's CPU is {t['ratio']:.2f}× the sender's (must be below)")
print()
print("answers:", ", ".join(f"{t['size']}: {t['answers']}" for t in table))
if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print("OK: flat within 2×, imapgate below the sender at every size")
PY
