"""The long fault soak (``pytest -m soak``): many SIGKILLs at random moments of a real ``dapo train``,
each followed by ``--resume`` in a new process (which may itself be killed), until the run completes;
every completed run must match an uninterrupted one exactly.

Kill moments are drawn three ways, a third each: uniformly from the process start (often during
start-up or the first evaluation), a random time into a step, and the instant a checkpoint's temporary
directory appears (a kill mid-save). Half the chains carry surplus groups over (``algo.carry_over``).
DAPO_SOAK_KILLS (default 40) sets the number of kills, DAPO_SOAK_SEED the draw, and DAPO_SOAK_REPORT a
file for the per-kill record (docs/reliability.md quotes it).
"""
import json
import os
import random
import time

import pytest

import faultkit as fk
from dapo.cli import main as cli_main
from dapo.trainer.checkpoint import latest_checkpoint

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif("'soak' not in (config.getoption('-m') or '')", reason="long fault soak: pytest -m soak"),
    pytest.mark.usefixtures("one_thread"),
]

STEPS = 6
VARIANTS = {"plain": [], "carry": ["algo.carry_over=true", "rollout.gen_batch_size=6"]}


def _args(model, out, name, extra):
    return ["--model", str(model), f"log.out_dir={out}", f"log.run_name={name}", f"optim.steps={STEPS}", *fk.FAST, *extra]


def _kill_once(proc, run, rng, step_s, total_s, log, offset, resume_from):
    """Kill ``proc`` at a random moment; returns how the moment was chosen and where it landed. ``log``
    from byte ``offset`` is this process's output; it has resumed from step ``resume_from``."""
    def said(text):
        return lambda: text.encode() in log.read_bytes()[offset:]

    mode = rng.choice(["uniform", "in_step", "in_checkpoint"])
    if mode == "uniform":
        fk.wait_for(lambda: False, rng.uniform(0, total_s), proc)
    else:  # a step drawn from those left, once this process has truncated what it will redo
        fk.wait_for(said("run directory:"), 120, proc)
        target = rng.randint(resume_from + 1, STEPS)
        fk.wait_for(lambda: fk.steps_logged(run) >= target - 1, 120, proc)
        if mode == "in_step":
            fk.wait_for(lambda: False, rng.uniform(0, step_s), proc)
        else:
            fk.wait_for(lambda: fk.checkpoint_in_progress(run), 120, proc)
    landed = "after exit" if proc.poll() is not None else (
        "checkpoint write" if fk.checkpoint_in_progress(run) else "step" if said(" | acc ")() else "start-up")
    fk.sigkill(proc)
    return mode, landed


def test_many_random_kill_points_resume_to_identical_metrics(tiny_model_dir, tmp_path):
    kills_wanted = int(os.environ.get("DAPO_SOAK_KILLS", "40"))
    rng = random.Random(os.environ.get("DAPO_SOAK_SEED", "soak"))
    refs, timing = {}, {}
    for name, extra in VARIANTS.items():
        t0 = time.perf_counter()
        assert cli_main(["train", *_args(tiny_model_dir, tmp_path, f"ref_{name}", extra)]) == 0
        refs[name] = fk.metrics(tmp_path / f"ref_{name}")
        timing[name] = time.perf_counter() - t0
    step_s = max(r["time/step"] for rows in refs.values() for r in rows)
    records, chains, kills = [], 0, 0
    while kills < kills_wanted:
        variant = list(VARIANTS)[chains % 2]
        run = tmp_path / f"chain{chains}"
        argv = first = _args(tiny_model_dir, tmp_path, run.name, VARIANTS[variant])
        chain_kills, saved = [], 0
        log = tmp_path / f"{run.name}.log"
        while True:
            offset = log.stat().st_size if log.exists() else 0
            proc = fk.start(argv, log)
            if kills >= kills_wanted or len(chain_kills) >= 5:  # let the chain finish
                assert proc.wait(timeout=600) == 0, (tmp_path / f"{run.name}.log").read_text()[-2000:]
                break
            mode, landed = _kill_once(proc, run, rng, step_s, timing[variant] + 10, log, offset, saved)
            if landed == "after exit":  # it finished before the kill: the chain is complete
                assert proc.returncode == 0, (tmp_path / f"{run.name}.log").read_text()[-2000:]
                break
            kills += 1
            ckpt = latest_checkpoint(run) if run.exists() else None
            saved = int(ckpt.name.split("_")[1]) if ckpt else 0
            kept = [r for r in fk.metrics(run) if r["step"] <= saved]
            prefix_ok = fk.first_difference(refs[variant][:saved], kept) is None
            chain_kills.append({"variant": variant, "mode": mode, "landed": landed, "logged": fk.steps_logged(run),
                                "resume_from": saved, "saved_prefix_identical": prefix_ok})
            if (run / "config.yaml").exists():  # else it died before making its run: start it again as it was
                argv = ["--resume", str(run)]
            else:
                argv = first
        diff = fk.first_difference(refs[variant], fk.metrics(run))
        for rec in chain_kills:
            rec["final_identical"] = diff is None
        records += chain_kills
        chains += 1
        assert diff is None, (run, chain_kills, diff)
    summary = {"kills": len(records), "chains": chains,
               "identical": sum(r["final_identical"] and r["saved_prefix_identical"] for r in records),
               "by_landing": {k: sum(r["landed"] == k for r in records) for k in ("start-up", "step", "checkpoint write")},
               "records": records}
    if os.environ.get("DAPO_SOAK_REPORT"):
        with open(os.environ["DAPO_SOAK_REPORT"], "w") as f:
            json.dump(summary, f, indent=1)
    assert summary["identical"] == summary["kills"]
