"""What the CPU is doing: idle share, thread counts, and the warning for a run that would spin.

On a CPU that other busy processes share, OpenMP threads that wait spin: a 2-thread run next to one busy
process went from 40 s to over 5 CPU-minutes here. The warm-up picks its thread count from the idle cores
(``default_threads``); ``dapo train`` warns at the start (``contention_warning``).
"""
from __future__ import annotations

import os
import time
from typing import Callable


def idle_fraction(window_s: float = 0.25) -> float:
    """Fraction of CPU time the whole machine spent idle over ``window_s`` (Linux ``/proc/stat``);
    elsewhere estimated from the 1-minute load average, which lags by about a minute."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(x) for x in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal ...
        return vals[3] + vals[4], sum(vals[:8])

    try:
        idle0, total0 = sample()
        time.sleep(window_s)
        idle1, total1 = sample()
        return (idle1 - idle0) / max(1, total1 - total0)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cores = os.cpu_count() or 1
        return max(0.0, 1.0 - os.getloadavg()[0] / cores)
    except (AttributeError, OSError):
        return 1.0


def default_threads() -> int:
    """Torch threads for the warm-up: one per core that is idle right now, 1 to 4.

    A second thread only pays on an idle core. Measured on a 2-core machine: a step took 0.47 s with
    2 threads and 0.78 s with 1 when the machine was otherwise quiet, but 4.7 s with 2 threads when
    one other process was busy (each parallel region waits for the thread sharing a core, spinning
    meanwhile). 4 is the most a 1M-parameter model uses well.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores, round(cores * idle_fraction())))


def contention_warning(threads: int, cores: int, idle: Callable[[], float], env: dict[str, str]) -> str | None:
    """A warning when other processes keep the CPU busy and OpenMP would spin: None when all is well.

    ``idle`` measures the machine's idle fraction (``idle_fraction``: a quarter-second sample); it is
    called only when the thread count and environment leave spinning possible. ``OMP_WAIT_POLICY=PASSIVE``
    avoids the spinning, but on an idle machine every parallel op then waits for a sleeping thread to wake
    (~0.1 ms: an RL step of the 1M demo took 2.2x as long, of a 25M model 1.4x; bench/RESULTS.md), so dapo
    does not set it for you.
    """
    if threads <= 1 or "OMP_WAIT_POLICY" in env:
        return None
    busy = cores * (1.0 - idle())
    if busy < 0.5:
        return None
    return (f"the CPU is busy with other work ({busy:.1f} of {cores} cores) and torch uses {threads} threads: "
            f"OpenMP threads spin while waiting and can make training several times slower; set "
            f"OMP_WAIT_POLICY=PASSIVE (or OMP_NUM_THREADS=1) in the environment before starting dapo")
