"""Helpers for the fault-injection tests: run ``python -m dapo.cli train`` as a real process, read its
run directory, and compare per-step metrics between runs.

Every process runs single-threaded (OMP_NUM_THREADS=1): on CPU that makes a run bit-for-bit
reproducible, so a resumed run can be compared with an uninterrupted one exactly, not approximately.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


REPO = Path(__file__).resolve().parents[2]

# a run that takes about a second a step on one core: G=4, 4 prompts, 8 new tokens, a checkpoint every
# step (so random kill points often land inside a checkpoint write); the random model is never right,
# so groups are kept by their shaped reward (lengths vary), which gives real updates
FAST = [
    "rollout.group_size=4", "optim.train_batch_size=4", "optim.mini_batch_size=2", "optim.micro_batch_size=5",
    "rollout.max_new_tokens=8", "algo.overlong_cache_len=2", "eval.size=4", "log.progress=plain",
    "algo.max_gen_rounds=2", "log.tensorboard=false", "algo.filter_metric=reward", "optim.lr=1e-2",
    "ckpt.every=1", "ckpt.keep_last=2", "log.samples_every=1",
]

# metrics that measure the machine, not the run: they differ between any two runs
VOLATILE = ("time/", "perf/")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             PYTHONUNBUFFERED="1")
    return e


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dapo.cli", "train", *args]


def start(args: list[str], log: Path, new_session: bool = False) -> subprocess.Popen:
    """Start ``dapo train ARGS`` with stdout and stderr going to ``log``; ``new_session`` gives it its own
    process group, for signalling the whole group as a terminal's Ctrl-C does."""
    f = open(log, "ab")
    try:
        return subprocess.Popen(train_cmd(*args), stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO,
                                start_new_session=new_session)
    finally:
        f.close()


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args), capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] if p.exists() else []


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def first_difference(a: list[dict], b: list[dict]) -> str | None:
    """None when the two metric histories are identical (machine timings aside), else what differs first."""
    a, b = comparable(a), comparable(b)
    for ra, rb in zip(a, b):
        if ra != rb:
            keys = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
            return f"step {ra.get('step')}: " + ", ".join(f"{k}: {ra.get(k)!r} != {rb.get(k)!r}" for k in keys[:4])
    if len(a) != len(b):
        return f"{len(a)} steps != {len(b)} steps"
    return None


def wait_for(cond: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.002) -> bool:
    """Poll ``cond`` until it holds (True), the timeout passes or ``proc`` exits (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return cond()
        time.sleep(poll)
    return False


def steps_logged(run_dir: Path) -> int:
    try:
        return (Path(run_dir) / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def checkpoint_in_progress(run_dir: Path) -> bool:
    try:
        return any(e.name.startswith(".tmp_step_") for e in os.scandir(run_dir))
    except OSError:
        return False


def sigkill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

