#!/usr/bin/env python3
"""Turns compare.sh's JSON lines into BENCHMARKS.md: medians per target, the machine, the
command, and the issue's targets checked (ratios within the same run)."""
import json
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone

results_path, rounds, seconds, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [json.loads(l) for l in open(results_path) if l.strip()]
TARGETS = ["direct", "haproxy", "nginx", "imapgate"]


def med(backend, scenario, target, key, workers=None, sessions=None, tls="plain"):
    """Median over rounds; `tls` is the client's side to the proxy: plain, implicit, starttls."""
    vals = [
        r[key]
        for r in rows
        if r["backend"] == backend and r["scenario"] == scenario and r["target"] == target
        and (workers is None or r.get("workers") == workers)
        and (sessions is None or r.get("sessions") == sessions)
        and r.get("tls", "plain") == tls
        and key in r
    ]
    return statistics.median(vals) if vals else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception:
        return "not installed"


def table(backend):
    idle_sizes = sorted({r["sessions"] for r in rows if r["backend"] == backend and r["scenario"] == "idle"
                         and r.get("tls", "plain") == "plain"})
    head = ["target", "logins/s (50 workers)", "CPU-s per 1k logins", "NOOP p50 / p99 µs (c=1)",
            "NOOP p50 / p99 µs (c=50)", "FETCH MB/s", "CPU-s per GB"]
    head += [f"KiB per idle session ({n}; from cold)" for n in idle_sizes]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in TARGETS:
        cpu = lambda key, sc: (None if t == "direct" else med(backend, sc, t, key))
        cells = [
            t,
            fmt(med(backend, "login", t, "logins_per_s")),
            fmt(cpu("cpu_s_per_1k_logins", "login"), 3),
            f'{fmt(med(backend, "noop", t, "p50_us", workers=1))} / {fmt(med(backend, "noop", t, "p99_us", workers=1))}',
            f'{fmt(med(backend, "noop", t, "p50_us", workers=50))} / {fmt(med(backend, "noop", t, "p99_us", workers=50))}',
            fmt(med(backend, "fetch", t, "mb_per_s")),
            fmt(cpu("cpu_s_per_gb", "fetch"), 3),
        ]
        for n in idle_sizes:
            if t == "direct":
                cells.append("–")
            else:
                warm = med(backend, "idle", t, "kib_per_session", sessions=n)
                cold = med(backend, "idle", t, "kib_per_session_cold", sessions=n)
                cells.append(f"{fmt(warm, 2)} ({fmt(cold, 2)})")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def checks(backend):
    g = lambda sc, t, k, **kw: med(backend, sc, t, k, **kw)
    lines = []

    def check(name, ok, detail):
        mark = "met" if ok else "**not met**"
        lines.append(f"| {name} | {detail} | {mark} |")

    ig_login, ha_login, ng_login = g("login", "imapgate", "logins_per_s"), g("login", "haproxy", "logins_per_s"), g("login", "nginx", "logins_per_s")
    if None not in (ig_login, ha_login, ng_login):
        check("login rate ≥ HAProxy's", ig_login >= ha_login, f"{ig_login:,.0f} vs {ha_login:,.0f} ({ig_login / ha_login:.2f}×)")
        check("login rate ≥ 1.5× nginx's", ig_login >= 1.5 * ng_login, f"{ig_login:,.0f} vs {ng_login:,.0f} ({ig_login / ng_login:.2f}×)")
    ig_c, ha_c = g("login", "imapgate", "cpu_s_per_1k_logins"), g("login", "haproxy", "cpu_s_per_1k_logins")
    if None not in (ig_c, ha_c):
        check("CPU per 1,000 logins ≤ HAProxy's", ig_c <= ha_c, f"{ig_c:.3f} vs {ha_c:.3f} s")
    ig_f, ha_f = g("fetch", "imapgate", "mb_per_s"), g("fetch", "haproxy", "mb_per_s")
    if None not in (ig_f, ha_f):
        check("FETCH throughput ≥ HAProxy's", ig_f >= ha_f, f"{ig_f:,.0f} vs {ha_f:,.0f} MB/s ({ig_f / ha_f:.2f}×)")
    ig_g, ha_g = g("fetch", "imapgate", "cpu_s_per_gb"), g("fetch", "haproxy", "cpu_s_per_gb")
    if None not in (ig_g, ha_g) and ha_g > 0:
        check("CPU-s per GB ≤ 0.7× HAProxy's", ig_g <= 0.7 * ha_g, f"{ig_g:.3f} vs {ha_g:.3f} s ({ig_g / ha_g:.2f}×)")
    for w in (1, 50):
        for k in ("p50_us", "p99_us"):
            ig = g("noop", "imapgate", k, workers=w)
            best = min(v for v in (g("noop", "haproxy", k, workers=w), g("noop", "nginx", k, workers=w)) if v is not None)
            if ig is not None:
                check(f"NOOP {k[:3]} ≤ best proxy's (c={w})", ig <= best, f"{ig:,.0f} vs {best:,.0f} µs")
    for r in rows:
        if r["backend"] == backend and r["scenario"] == "idle" and r["target"] == "imapgate" \
                and r.get("tls", "plain") == "plain":
            check(f"≤ 2 KiB RSS per idle session ({r['sessions']})", r["kib_per_session"] <= 2.0,
                  f"{r['kib_per_session']:.2f} KiB, {r['held']:.0f} held, {r['dropped']} dropped")
    return "\n".join(["| target | measured (imapgate vs anchor) | |", "|---|---|---|"] + lines)


def tls_table():
    def m(t, resume, key):
        vals = [r[key] for r in rows if r["scenario"] == "tls" and r["target"] == t
                and r.get("resumption") == resume and key in r]
        return statistics.median(vals) if vals else None

    out = ["| target | full handshakes/s | CPU-s per 1k full | with resumption: handshakes/s | resumed | CPU-s per 1k |",
           "|---|---|---|---|---|---|"]
    for t in ("haproxy", "nginx", "imapgate"):
        n, r = m(t, True, "handshakes"), m(t, True, "resumed")
        share = f"{100 * r / n:.0f}%" if n and r is not None else "–"
        out.append(f"| {t} | {fmt(m(t, False, 'handshakes_per_s'))} | {fmt(m(t, False, 'cpu_s_per_1k_handshakes'), 3)} "
                   f"| {fmt(m(t, True, 'handshakes_per_s'))} | {share} | {fmt(m(t, True, 'cpu_s_per_1k_handshakes'), 3)} |")
    return "\n".join(out)


def tls_terminated():
    """The TLS table (fake backend): idle memory and FETCH with TLS terminated at the proxy,
    implicit and STARTTLS, and the issue's targets for it."""
    sizes = sorted({r["sessions"] for r in rows if r["scenario"] == "idle" and r.get("tls") in ("implicit", "starttls")})
    head = ["target"]
    for mode in ("implicit", "starttls"):
        head += [f"KiB per idle session, {mode} ({n})" for n in sizes]
    head += ["FETCH MB/s, implicit", "CPU-s per GB, implicit", "FETCH MB/s, STARTTLS", "CPU-s per GB, STARTTLS",
             "FETCH MB/s, TLS to the backend", "CPU-s per GB, TLS to the backend"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in ("haproxy", "nginx", "imapgate"):
        cells = [t]
        for mode in ("implicit", "starttls"):
            cells += [fmt(med("fake", "idle", t, "kib_per_session", sessions=n, tls=mode), 2) for n in sizes]
        for mode in ("implicit", "starttls"):
            cells += [fmt(med("fake", "fetch", t, "mb_per_s", tls=mode)), fmt(med("fake", "fetch", t, "cpu_s_per_gb", tls=mode), 3)]
        cells += [fmt(med("fake-tls", "fetch", t, "mb_per_s")), fmt(med("fake-tls", "fetch", t, "cpu_s_per_gb"), 3)]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("| target | measured (imapgate vs anchor) | |")
    out.append("|---|---|---|")

    def check(name, ok, detail):
        out.append(f"| {name} | {detail} | {'met' if ok else '**not met**'} |")

    for mode in ("implicit", "starttls"):
        for n in sizes:
            ig = med("fake", "idle", "imapgate", "kib_per_session", sessions=n, tls=mode)
            ha = med("fake", "idle", "haproxy", "kib_per_session", sessions=n, tls="implicit")
            if ig is not None:
                anchor = f" (HAProxy implicit {ha:.2f}, {ig / ha:.2f}×)" if ha else ""
                check(f"≤ 8 KiB RSS per idle TLS session, {mode} ({n})", ig <= 8.0, f"{ig:.2f} KiB{anchor}")
    ig_f, ha_f = med("fake", "fetch", "imapgate", "mb_per_s", tls="implicit"), med("fake", "fetch", "haproxy", "mb_per_s", tls="implicit")
    ig_g, ha_g = med("fake", "fetch", "imapgate", "cpu_s_per_gb", tls="implicit"), med("fake", "fetch", "haproxy", "cpu_s_per_gb", tls="implicit")
    if None not in (ig_f, ha_f, ig_g, ha_g) and ha_f and ha_g:
        check("TLS FETCH ≥ HAProxy's MB/s", ig_f >= ha_f, f"{ig_f:,.0f} vs {ha_f:,.0f} MB/s ({ig_f / ha_f:.2f}×)")
        check("TLS FETCH CPU per GB ≤ HAProxy's", ig_g <= ha_g, f"{ig_g:.3f} vs {ha_g:.3f} s ({ig_g / ha_g:.2f}×)")
    ig_f, ha_f = med("fake-tls", "fetch", "imapgate", "mb_per_s"), med("fake-tls", "fetch", "haproxy", "mb_per_s")
    ig_g, ha_g = med("fake-tls", "fetch", "imapgate", "cpu_s_per_gb"), med("fake-tls", "fetch", "haproxy", "cpu_s_per_gb")
    if None not in (ig_f, ha_f, ig_g, ha_g) and ha_f and ha_g:
        check("FETCH with TLS to the backend ≥ HAProxy's MB/s", ig_f >= ha_f, f"{ig_f:,.0f} vs {ha_f:,.0f} MB/s ({ig_f / ha_f:.2f}×)")
        check("FETCH with TLS to the backend: CPU per GB ≤ HAProxy's", ig_g <= ha_g, f"{ig_g:.3f} vs {ha_g:.3f} s ({ig_g / ha_g:.2f}×)")

    def hs(t, resume, key):
        vals = [r[key] for r in rows if r["scenario"] == "tls" and r["target"] == t and r.get("resumption") == resume and key in r]
        return statistics.median(vals) if vals else None

    ig_h, ha_h = hs("imapgate", False, "handshakes_per_s"), hs("haproxy", False, "handshakes_per_s")
    ig_hc, ha_hc = hs("imapgate", False, "cpu_s_per_1k_handshakes"), hs("haproxy", False, "cpu_s_per_1k_handshakes")
    if None not in (ig_h, ha_h, ig_hc, ha_hc) and ha_h and ha_hc:
        check("full handshakes: rate above HAProxy's at lower CPU (the lead kept)", ig_h > ha_h and ig_hc < ha_hc,
              f"{ig_h / ha_h:.2f}× the rate at {ig_hc / ha_hc:.2f}× the CPU per handshake")
    return "\n".join(out)


def nproc():
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except Exception:
        return "?"


backends = [b for b in ("fake", "dovecot") if any(r["backend"] == b for r in rows)]
print("# Benchmarks\n")
print("Made by `benches/compare.sh " + args + "` (see the README); every figure is the median of "
      f"{rounds} rounds of {seconds} s per scenario, the targets alternating within each round, "
      "all in one run on one machine. CPU seconds are the proxy's own (all its processes), from "
      "/proc/PID/stat. imapgate runs with `IMAPGATE_LOG=warn` (no per-session log lines), as "
      "HAProxy and nginx log nothing per connection in these configs; its observer and metrics "
      "are on.\n")
print(f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
print(f"- machine: {nproc()} cores, {platform.machine()}, kernel {platform.release()}")
print(f"- {version(['haproxy', '-v'])}")
print(f"- {version(['nginx', '-v'])}")
print(f"- dovecot {version(['dovecot', '--version'])}")
print(f"- imapgate {version(['target/release/imapgate', '--version'])}")
print()
for b in backends:
    title = "fake backend (`imapgate-load serve`, 1 MB message)" if b == "fake" else "real Dovecot backend (1 MB message)"
    print(f"## Against the {title}\n")
    print(table(b))
    print()
    print(f"### Targets ({b})\n")
    print(checks(b))
    print()
if any(r.get("tls") in ("implicit", "starttls") for r in rows):
    print("## TLS terminated at the proxy (fake backend behind; ECDSA P-256 certificate)\n")
    print("The client speaks TLS to the proxy, the proxy plain IMAP to the backend: implicit TLS "
          "(HAProxy `bind ... ssl crt`, nginx `listen ... ssl`, imapgate `tls: implicit`) and STARTTLS "
          "(nginx `starttls only`, imapgate `tls: starttls`; HAProxy cannot do IMAP's STARTTLS). Idle: "
          "as below, each session LOGIN + IDLE over TLS (the proxy's RSS growth per session after a "
          "warm-up wave). FETCH: one session, `FETCH 1 BODY[]` of the 1 MB message in a loop; TLS to the "
          "backend: a plain client, the proxy speaking implicit TLS to the fake backend (`imapgate-load serve "
          "--tls-cert`; HAProxy `server ... ssl verify required`, imapgate `tls: implicit`; nginx's mail proxy "
          "cannot).\n")
    print(tls_terminated())
    print()
if any(r["scenario"] == "tls" for r in rows):
    print("## Implicit TLS handshakes (fake backend behind; ECDSA P-256 certificate)\n")
    print("Each of 50 workers: TCP connect, TLS handshake, greeting, close. The proxy terminates TLS "
          "(HAProxy `bind ... ssl crt`, nginx `listen ... ssl` with `ssl_session_cache shared:MAIL:10m`, "
          "imapgate `tls: implicit`).\n")
    print(tls_table())
    print()
if any(r.get("target", "").startswith("dir-") for r in rows):
    print("## Routing from a directory (nginx's `auth_http` protocol, fake backend)\n")
    print("The same auth service (`imapgate-load auth-http`) for both. nginx asks it at every login, "
          "on a new connection; imapgate keeps its connections to it alive, and caches routes. "
          "Warm: logins cycle through 1,000 users (the cache holds them all after the first round); "
          "no cache: `ttl: 0s` and every login a user never seen, so every login is a request. "
          "CPU is the proxy's own (the auth service's is not counted for either).\n")
    out = ["| target | logins/s (50 workers) | CPU-s per 1k logins | login p50 / p99 µs |", "|---|---|---|---|"]
    names = {"dir-nginx": "nginx (auth_http per login)", "dir-warm": "imapgate, cache warm", "dir-nocache": "imapgate, no cache"}
    for t, name in names.items():
        out.append(f'| {name} | {fmt(med("fake", "login", t, "logins_per_s"))} | {fmt(med("fake", "login", t, "cpu_s_per_1k_logins"), 3)} | '
                   f'{fmt(med("fake", "login", t, "p50_us"))} / {fmt(med("fake", "login", t, "p99_us"))} |')
    print("\n".join(out))
    print()
    ng, warm, nocache = (med("fake", "login", t, "logins_per_s") for t in names)
    ng_cpu, nocache_cpu = (med("fake", "login", t, "cpu_s_per_1k_logins") for t in ("dir-nginx", "dir-nocache"))
    if ng and warm and nocache:
        print("| target | measured | |\n|---|---|---|")
        print(f"| warm cache ≥ 1.5× nginx's login rate | {fmt(warm)} vs {fmt(ng)} ({warm / ng:.2f}×) | {'met' if warm >= 1.5 * ng else '**not met**'} |")
        print(f"| no cache ≥ nginx's login rate | {fmt(nocache)} vs {fmt(ng)} ({nocache / ng:.2f}×) | {'met' if nocache >= ng else '**not met**'} |")
        if ng_cpu and nocache_cpu:
            print(f"| no cache: CPU per login < nginx's | {nocache_cpu:.3f} vs {ng_cpu:.3f} s per 1k | {'met' if nocache_cpu < ng_cpu else '**not met**'} |")
        print()
print("Scenarios (`imapgate-load`): login = connect, greeting, LOGIN, LOGOUT, close, 50 workers; "
      "noop = one session per worker, NOOP round trips; fetch = one session, `FETCH 1 BODY[]` of a "
      "1 MB message in a loop; idle = N sessions logged in and in IDLE, from 8 source addresses, "
      "held 3 s, in proxies started afresh for each size and kind of client side (plain, implicit TLS, "
      "STARTTLS); KiB per session = the proxy's RSS growth ÷ N after a warm-up (one wave of 200 sessions "
      "opened and closed, so one-time pools and the high-water mark of 200 logins in flight are in "
      "the baseline); in brackets the growth from the cold process.")
