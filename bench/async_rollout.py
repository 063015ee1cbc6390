"""One-step-off async rollout against synchronous, on the demo: seconds per step and the learning curve.

    python bench/async_rollout.py                     # 3 seeds x {sync, async}, 120 steps each (~15 min on 2 cores)
    python bench/async_rollout.py --seeds 1 --steps 20

Both sides run the same Ray layout, 1 rollout worker (its own process and model copy) and the trainer in the
driver (1 rank), so the only difference is ``dist.async_steps``: 0 samples step N after update N-1; 1 samples
step N+1 while update N runs. Reports per mode the median seconds per step (steps 3 on), where the step's
time goes (generation, update, waiting for the rollout collected ahead), and held-out accuracy (avg@8 on the
same 256 prompts) after training, mean +- std over seeds; writes the runs, a JSON of the figures and a report
page with the curves (mean over seeds) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, machine, table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--out", default="runs/async-bench")
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    a = p.parse_args()

    from dapo.cli import _quiet_libraries
    from dapo.config import load_config
    from dapo.report import write_report
    from dapo.trainer.loop import train

    _quiet_libraries()
    out = Path(a.out)
    rows, runs = [], {}
    for mode, steps_off in (("sync", 0), ("async", 1)):
        for seed in range(a.seeds):
            name = f"{mode}-s{seed}"
            cfg = load_config(overrides=[
                f"seed={seed}", f"optim.steps={a.steps}", "dist.rollout_workers=1", f"dist.async_steps={steps_off}",
                "eval.seed=0", "eval.k=8", f"log.out_dir={out}", f"log.run_name={name}", "log.progress=none",
                "log.report=false", "log.tensorboard=false", "ckpt.save_final=false", *a.overrides])
            t0 = time.perf_counter()
            res = train(cfg)
            hist = res.history[2:]  # steps 3 on: Ray and the first weight pushes warmed up
            runs.setdefault(mode, []).append({
                "seed": seed, "acc_before": res.before["accuracy"], "acc_after": res.after["accuracy"],
                "s_per_step": statistics.median(m["time/step"] for m in hist),
                "gen_s": statistics.median(m["time/gen"] for m in hist),
                "update_s": statistics.median(m["time/update"] for m in hist),
                "wait_s": statistics.median(m["time/wait_rollout"] for m in hist if "time/wait_rollout" in m),
                "wall_s": time.perf_counter() - t0, "run_dir": str(res.run_dir)})
            r = runs[mode][-1]
            print(f"{name}: {r['s_per_step']:.3f} s/step, acc {r['acc_before']:.3f} -> {r['acc_after']:.3f}",
                  file=sys.stderr, flush=True)
    for mode, rs in runs.items():
        acc = [r["acc_after"] for r in rs]
        rows.append({"mode": mode, "s/step": statistics.fmean(r["s_per_step"] for r in rs),
                     "gen s": statistics.fmean(r["gen_s"] for r in rs),
                     "update s": statistics.fmean(r["update_s"] for r in rs),
                     "wait s": statistics.fmean(r["wait_s"] for r in rs),
                     "acc after": statistics.fmean(acc), "acc std": statistics.stdev(acc) if len(acc) > 1 else 0.0})
    print(table(rows))
    page = write_report([r["run_dir"] for rs in runs.values() for r in rs], out / "report", mean_seeds=True)
    print(f"report: {page}")
    emit_json({"bench": "async_rollout", "machine": machine(), "steps": a.steps, "rows": rows, "runs": runs})
    (out / "async_rollout.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
