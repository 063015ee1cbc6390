"""Run ``dapo train`` for a fixed wall time and sample its memory (RSS, process + children) every few seconds.

    python scripts/rss_soak.py --minutes 30 --out /tmp/rss -- --model DIR optim.steps=1000000 ...

Writes ``rss.csv`` (elapsed_s, step, rss_mb) next to the run, then stops the run with SIGTERM (which
also exercises the graceful stop: the run must finish its step, checkpoint and exit 0) and prints a
summary: RSS at 10% of the run, at the end, the peak, and the least-squares slope in MB per hour over
the second half (warm-up allocations excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree_rss_mb(proc: psutil.Process) -> float:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 3600 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--every", type=float, default=10, help="seconds between samples")
    ap.add_argument("--out", required=True, help="log.out_dir for the run; rss.csv goes in the run directory")
    ap.add_argument("--name", default="soak")
    ap.add_argument("train_args", nargs="*")
    a = ap.parse_args()
    run_dir = Path(a.out) / a.name
    cmd = [sys.executable, "-m", "dapo.cli", "train", f"log.out_dir={a.out}", f"log.run_name={a.name}", *a.train_args]
    log = open(Path(a.out) / f"{a.name}.log", "w")
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    proc = psutil.Process(child.pid)
    rows: list[tuple[float, int, float]] = []
    t0 = time.time()
    csv = None
    while child.poll() is None and time.time() - t0 < a.minutes * 60:
        time.sleep(a.every)
        if child.poll() is not None:
            break
        steps = 0
        if (run_dir / "metrics.jsonl").exists():
            steps = sum(1 for _ in open(run_dir / "metrics.jsonl", "rb"))
        rows.append((time.time() - t0, steps, tree_rss_mb(proc)))
        if csv is None and run_dir.exists():
            csv = open(run_dir.parent / f"{a.name}_rss.csv", "w")
            csv.write("elapsed_s,step,rss_mb\n")
        if csv is not None:
            csv.write("%.1f,%d,%.1f\n" % rows[-1])
            csv.flush()
    stopped = child.poll() is None
    if stopped:
        child.send_signal(signal.SIGTERM)
    rc = child.wait()
    half = [r for r in rows if r[0] >= rows[-1][0] / 2] if rows else []
    tenth = next((r for r in rows if r[0] >= rows[-1][0] / 10), rows[0]) if rows else (0, 0, 0)
    summary = {
        "wall_s": round(time.time() - t0, 1), "samples": len(rows), "steps": rows[-1][1] if rows else 0,
        "rss_mb_first": rows[0][2] if rows else None, "rss_mb_at_10pct": tenth[2],
        "rss_mb_last": rows[-1][2] if rows else None, "rss_mb_peak": max(r[2] for r in rows) if rows else None,
        "slope_mb_per_h_second_half": round(slope_per_hour([r[0] for r in half], [r[2] for r in half]), 2),
        "stopped_with_sigterm": stopped, "exit_code": rc,
    }
    print(json.dumps(summary))
    (run_dir.parent / f"{a.name}_rss_summary.json").write_text(json.dumps(summary, indent=1))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
