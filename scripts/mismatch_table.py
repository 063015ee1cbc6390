"""A bf16 sampler against the fp32 trainer on the demo task: the mismatch metrics and held-out accuracy with
``algo.rollout_is`` none / token / sequence, and a float32 sampler as the control, over seeds and learning rates.

    python scripts/mismatch_table.py                       # 3 seeds, lr 1e-4 and 4e-4, 8192 samples a run
    python scripts/mismatch_table.py --seeds 1 --max-samples 2048 --out /tmp/mm   # a quick look

Every run is ``dapo ablate``'s (``dapo.ablate.run_one``): DAPO from the demo's base, the same held-out prompts
scored avg@8, stopped at an equal budget of generated samples. Writes ``mismatch.md`` and ``mismatch.json``
(the per-run rows and the table) into ``--out``; an interrupted table continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from dapo.ablate import EVAL, _tail_mean, run_one
from dapo.cli import _quiet_libraries
from dapo.fsutil import write_atomic

MODES = {  # name: (run directory, overrides)
    "fp32 sampler (control)": ("fp32", ["rollout.dtype=float32"]),
    "bf16 sampler, none": ("bf16-none", ["rollout.dtype=bfloat16", "algo.rollout_is=none"]),
    "bf16 sampler, token IS": ("bf16-token", ["rollout.dtype=bfloat16", "algo.rollout_is=token"]),
    "bf16 sampler, sequence mask": ("bf16-sequence", ["rollout.dtype=bfloat16", "algo.rollout_is=sequence"]),
}


def _mean_over_steps(rows: list[dict], key: str, fn=statistics.fmean) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(fn(vals)) if vals else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", default="1e-4,4e-4")
    p.add_argument("--max-samples", type=int, default=8192)
    p.add_argument("--modes", default=",".join(slug for slug, _ in MODES.values()),
                   help="comma-separated run names of MODES (fp32, bf16-none, bf16-token, bf16-sequence)")
    p.add_argument("--out", default="runs/mismatch")
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    a = p.parse_args(argv)
    _quiet_libraries()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "mismatch.json"
    runs = json.loads(done_path.read_text())["runs"] if done_path.exists() else []
    done = {(r["mode"], r["seed"], r["lr"]) for r in runs}
    t0 = time.perf_counter()
    for lr in [float(x) for x in a.lrs.split(",")]:
        by_slug = {slug: name for name, (slug, _) in MODES.items()}
        for mode in [by_slug[m.strip()] for m in a.modes.split(",")]:
            for seed in range(a.seeds):
                if (mode, seed, lr) in done:
                    continue
                slug, extra = MODES[mode]
                r = run_one("dapo", seed, lr, a.max_samples, out / slug, [*EVAL, *extra, *a.overrides])
                rows = [json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x]
                r.update(mode=mode, logp_abs_diff=_mean_over_steps(rows, "mismatch/logp_abs_diff"),
                         kl=_mean_over_steps(rows, "mismatch/kl"), ratio_max=_mean_over_steps(rows, "mismatch/ratio_max", max),
                         masked_frac=_mean_over_steps(rows, "mismatch/masked_frac"),
                         ratio_mean_end=_tail_mean(rows, "actor/ratio_mean"))
                runs.append(r)
                print(f"{mode:30s} lr {lr:g} seed {seed}: acc {r['acc_before']:.3f} -> {r['acc_after']:.3f}, |dlogp| "
                      f"{r['logp_abs_diff']:.2e}, kl {r['kl']:.2e}, masked {r['masked_frac']:.2f}, {r['steps']} steps "
                      f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
                write_atomic(done_path, json.dumps({"runs": runs}, indent=1))
    table = []
    for key in dict.fromkeys((r["mode"], r["lr"]) for r in runs):
        rs = [r for r in runs if (r["mode"], r["lr"]) == key]
        acc = [r["acc_after"] for r in rs]
        table.append({"mode": key[0], "lr": key[1], "seeds": len(rs), "acc_mean": statistics.fmean(acc),
                      "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                      **{k: statistics.fmean(r[k] for r in rs) for k in ("logp_abs_diff", "kl", "masked_frac", "steps")},
                      "ratio_max": max(r["ratio_max"] for r in rs)})
    md = ["| sampler, correction | lr | held-out acc | mismatch/logp_abs_diff | mismatch/kl | mismatch/ratio_max "
          "(max) | mismatch/masked_frac | steps |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {t['mode']} | {t['lr']:g} | {t['acc_mean']:.3f} ± {t['acc_std']:.3f} (n={t['seeds']}) | "
           f"{t['logp_abs_diff']:.2e} | {t['kl']:.2e} | {t['ratio_max']:.3f} | {t['masked_frac']:.3f} | {t['steps']:.0f} |"
           for t in table]
    text = (f"DAPO on the demo task from its base, {a.max_samples} generated samples a run, held-out avg@8 on the "
            f"same 256 prompts; mismatch metrics are means over a run's steps (ratio_max: the largest).\n\n"
            + "\n".join(md) + "\n")
    (out / "mismatch.md").write_text(text)
    write_atomic(done_path, json.dumps({"runs": runs, "table": table, "max_samples": a.max_samples}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
