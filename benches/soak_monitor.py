#!/usr/bin/env python3
"""Samples a process during a soak run, then plots the samples and checks them for growth.

  soak_monitor.py sample --pid PID --metrics URL --interval S --csv FILE [--stdout F] [--stderr F] -- LOAD COMMAND...
      One sample before the load (phase `baseline`), then starts LOAD COMMAND and samples every
      S seconds while it runs (`load`), then every second until the target's sessions and
      connections are back to 0, at most 30 s (`drain`). Exits with the load command's status.
  soak_monitor.py check --csv FILE --warmup S [--seconds S] [--load JSON] [--png FILE] [--title T]
      Plots the samples (RSS, fds, sessions and connections, CPU) and checks them; exit 1 on
      a growth trend, a drain that did not drain, or a load that went wrong.

A sample: seconds since the load started, phase, RSS (KiB, /proc/PID/status VmRSS), open fds
(/proc/PID/fd), logged-in sessions (sum of imapgate_sessions_active) and client connections
(sum of imapgate_connections_active) from /metrics, CPU seconds so far (utime + stime,
/proc/PID/stat) and the CPU share over the last interval (100 = one core).

The growth check, for RSS, fds and sessions, over the samples of the load phase after the
warm-up: (1) cut into two halves by time, the second half's median must not exceed the first
half's by more than the tolerance, and (2) the Theil-Sen slope (the median of all pairwise
slopes) times the window must not either. Tolerance: RSS 5% or 2 MiB, fds 15% or 24, sessions
15% or 12, the larger. Both are medians, so a few outliers on a busy machine decide nothing; a
steady leak moves the trend by its whole amount over the window (and the halves by half of
it). Checked with a deliberately leaking build (README): 1 KiB per login is caught by a
2-minute run, as is one descriptor per login.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

FIELDS = ["t_s", "phase", "rss_kib", "fds", "sessions", "connections", "cpu_s", "cpu_pct"]
TOLERANCE = {  # column: (relative, absolute)
    "rss_kib": (0.05, 2048),
    "fds": (0.15, 24),
    "sessions": (0.15, 12),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        after = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; `after` starts at field 3.
    return (int(after[11]) + int(after[12])) / CLK_TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def gauge_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sample(pid, url, t0, phase, last):
    with urllib.request.urlopen(url, timeout=10) as r:
        metrics = r.read().decode()
    now, cpu = time.monotonic(), cpu_seconds(pid)
    pct = 0.0
    if last is not None and now > last[0]:
        pct = 100.0 * (cpu - last[1]) / (now - last[0])
    row = {
        "t_s": round(now - t0, 1),
        "phase": phase,
        "rss_kib": rss_kib(pid),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "sessions": int(gauge_sum(metrics, "imapgate_sessions_active")),
        "connections": int(gauge_sum(metrics, "imapgate_connections_active")),
        "cpu_s": round(cpu, 2),
        "cpu_pct": round(pct, 1),
    }
    return row, (now, cpu)


def run_sample(a):
    with open(a.csv, "w", newline="") as f:
        out = csv.DictWriter(f, FIELDS)
        out.writeheader()
        t0 = time.monotonic()
        row, last = sample(a.pid, a.metrics, t0, "baseline", None)
        out.writerow(row)
        stdout = open(a.stdout, "w") if a.stdout else None
        stderr = open(a.stderr, "w") if a.stderr else None
        load = subprocess.Popen(a.command, stdout=stdout, stderr=stderr)
        t0 = time.monotonic()
        next_at = t0 + a.interval
        while load.poll() is None:
            time.sleep(max(0.0, min(next_at, time.monotonic() + 0.5) - time.monotonic()))
            if time.monotonic() >= next_at and load.poll() is None:
                row, last = sample(a.pid, a.metrics, t0, "load", last)
                out.writerow(row)
                f.flush()
                print(
                    f"  t={row['t_s']:>7.0f} s  RSS {row['rss_kib'] / 1024:7.1f} MiB  fds {row['fds']:>5}"
                    f"  sessions {row['sessions']:>4}  connections {row['connections']:>4}  CPU {row['cpu_pct']:5.1f}%",
                    flush=True,
                )
                next_at += a.interval
        # The load is over: every connection should go, and with it every session.
        deadline = time.monotonic() + 30
        while True:
            time.sleep(1)
            row, last = sample(a.pid, a.metrics, t0, "drain", last)
            out.writerow(row)
            if (row["sessions"] == 0 and row["connections"] == 0) or time.monotonic() > deadline:
                break
    return load.returncode


def theil_sen(ts, ys):
    slopes = [
        (ys[j] - ys[i]) / (ts[j] - ts[i])
        for i in range(len(ts))
        for j in range(i + 1, len(ts))
        if ts[j] > ts[i]
    ]
    return statistics.median(slopes) if slopes else 0.0


def plot(rows, warmup, seconds, png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = [r for r in rows if r["phase"] != "baseline"]
    t = [r["t_s"] / 60 for r in load]
    fig, axes = plt.subplots(4, 1, figsize=(8, 8.5), sharex=True)
    series = [
        ("RSS (MiB)", [(r["rss_kib"] / 1024, None) for r in load]),
        ("open fds", [(r["fds"], None) for r in load]),
        ("sessions / connections", [(r["sessions"], r["connections"]) for r in load]),
        ("CPU (% of a core)", [(r["cpu_pct"], None) for r in load]),
    ]
    for ax, (label, ys) in zip(axes, series):
        ax.plot(t, [y[0] for y in ys], color="tab:blue", lw=1.2, marker=".", ms=3,
                label="logged-in sessions" if ys[0][1] is not None else None)
        if ys[0][1] is not None:
            ax.plot(t, [y[1] for y in ys], color="tab:orange", lw=1, label="client connections")
            ax.legend(loc="lower right", fontsize=8)
        ax.axvspan(0, warmup / 60, color="0.9", lw=0)
        if seconds:
            ax.axvline(seconds / 60, color="0.5", lw=0.8, ls="--")
        ax.set_ylabel(label, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_title(title + "\n(grey: warm-up; dashed: load stops, then the drain)", fontsize=10)
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(png, dpi=70)


def run_check(a):
    with open(a.csv) as f:
        rows = [
            {k: (v if k == "phase" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)
        ]
    failures = []
    base = next(r for r in rows if r["phase"] == "baseline")
    # Past `--seconds` the load is winding down (rounds in progress finish): not steady.
    end = a.seconds if a.seconds else float("inf")
    steady = [r for r in rows if r["phase"] == "load" and a.warmup <= r["t_s"] <= end]
    if len(steady) < 6:
        failures.append(f"only {len(steady)} samples after the warm-up: run longer or sample more often")
    else:
        mid = (steady[0]["t_s"] + steady[-1]["t_s"]) / 2
        first = [r for r in steady if r["t_s"] < mid]
        second = [r for r in steady if r["t_s"] >= mid]
        span_h = (steady[-1]["t_s"] - steady[0]["t_s"]) / 3600
        print(f"after the warm-up ({a.warmup:.0f} s): {len(steady)} samples, halves of {len(first)} and {len(second)}")
        for col, (rel, absolute) in TOLERANCE.items():
            m1 = statistics.median(r[col] for r in first)
            m2 = statistics.median(r[col] for r in second)
            allowed = max(rel * m1, absolute)
            slope = theil_sen([r["t_s"] / 3600 for r in steady], [r[col] for r in steady])
            trend = slope * span_h
            verdict = "ok" if m2 - m1 <= allowed and trend <= allowed else "GROWTH"
            print(
                f"  {col:>9}: halves' medians {m1:,.0f} → {m2:,.0f} ({m2 - m1:+,.0f}); Theil-Sen slope {slope:+,.0f}/h,"
                f" {trend:+,.0f} over the {span_h * 60:.1f} min; allowed +{allowed:,.0f}: {verdict}"
            )
            if verdict != "ok":
                failures.append(
                    f"{col} grew: halves' medians {m1:,.0f} → {m2:,.0f}, trend {trend:+,.0f} (allowed +{allowed:,.0f})"
                )
    load_rows = [r for r in rows if r["phase"] == "load"]
    if load_rows:
        cpu = [r["cpu_pct"] for r in load_rows[1:]] or [0]
        print(
            f"  RSS {base['rss_kib'] / 1024:.1f} MiB before the load, {load_rows[0]['rss_kib'] / 1024:.1f} at the first sample,"
            f" {load_rows[-1]['rss_kib'] / 1024:.1f} at the last (max {max(r['rss_kib'] for r in load_rows) / 1024:.1f});"
            f" fds {base['fds']:.0f} before, {min(r['fds'] for r in load_rows):.0f}-{max(r['fds'] for r in load_rows):.0f} under load;"
            f" sessions {min(r['sessions'] for r in load_rows):.0f}-{max(r['sessions'] for r in load_rows):.0f};"
            f" CPU median {statistics.median(cpu):.1f}% of a core; {load_rows[-1]['cpu_s'] - base['cpu_s']:.1f} CPU-s in all"
        )
    drained = [r for r in rows if r["phase"] == "drain"]
    if drained:
        last = drained[-1]
        # Each worker thread keeps up to 64 idle pipes (2 fds each) for splicing large literals.
        pipe_fds = 2 * 64 * 2
        print(
            f"  drain: after {last['t_s'] - load_rows[-1]['t_s'] if load_rows else 0:.0f} s, sessions {last['sessions']:.0f},"
            f" connections {last['connections']:.0f}, fds {last['fds']:.0f} (before the load {base['fds']:.0f}),"
            f" RSS {last['rss_kib'] / 1024:.1f} MiB"
        )
        if last["sessions"] or last["connections"]:
            failures.append(f"after the load: {last['sessions']:.0f} sessions, {last['connections']:.0f} connections left")
        if last["fds"] > base["fds"] + pipe_fds:
            failures.append(f"after the load: {last['fds']:.0f} fds, {base['fds']:.0f} before (+ at most {pipe_fds} pooled pipe fds)")
    else:
        failures.append("no drain sample")
    if a.load:
        with open(a.load) as f:
            load = json.load(f)
        print(f"  load: {json.dumps(load)}")
        ops, unexpected = load["operations"], load["unexpected"]
        if unexpected > 0.005 * max(ops, 1):
            failures.append(f"the load tool saw {unexpected} unexpected outcomes in {ops} operations: {load['reasons']}")
        for kind in ["logins", "idles", "appends", "fetches", "expunges", "wrong_rejected"]:
            if not load[kind]:
                failures.append(f"no {kind} in the load")
        if not all(load["abrupt"].values()):
            failures.append(f"not every kind of abrupt disconnect ran: {load['abrupt']}")
    if a.png:
        plot(rows, a.warmup, a.seconds, a.png, a.title)
        print(f"  plot: {a.png}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("OK: no growth after the warm-up, drained, the load as expected")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--interval", type=float, default=10)
    s.add_argument("--csv", required=True)
    s.add_argument("--stdout", help="the load command's stdout goes here")
    s.add_argument("--stderr", help="the load command's stderr goes here")
    s.add_argument("command", nargs="+")
    c = sub.add_parser("check")
    c.add_argument("--csv", required=True)
    c.add_argument("--warmup", type=float, default=30)
    c.add_argument("--seconds", type=float, help="how long the load ran at full strength")
    c.add_argument("--load")
    c.add_argument("--png")
    c.add_argument("--title", default="imapgate soak")
    a = p.parse_args()
    sys.exit(run_sample(a) if a.what == "sample" else run_check(a))


if __name__ == "__main__":
    main()
