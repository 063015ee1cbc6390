"""``dapo ablate``: the paper's Table 1 at laptop scale.

Runs the progressive rows (naive GRPO, +overlong filtering, +clip-higher, +soft overlong punishment,
+token-level loss, +dynamic sampling = DAPO) from the same base model with several seeds under an
equal budget of *generated samples* (``optim.max_samples``): dynamic sampling spends extra samples to
refill its batch, so an equal step count would flatter it. The GRPO/DAPO pair is run again at a
learning rate several times higher, where naive GRPO tends to become unstable.

Writes ``ablation.md`` and ``ablation.json`` (held-out accuracy mean +- std over seeds per row, entropy
and response length at the end, samples generated) and a report page overlaying every run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from dapo.config import ABLATION_ROWS, default, load_config
from dapo.config.flags import whole
from dapo.fsutil import write_atomic

DEFAULTS = {"seeds": 3, "max_samples": 8192, "high_lr": 4e-4}
"""The ablation's own settings; the table's learning rate is the config's (``optim.lr``)."""
EVAL = ["eval.seed=0", "eval.k=8"]
"""Every run is scored on the same held-out prompts, 8 samples each (avg@8): the seeds' spread is then
the training's, not which prompts a seed happened to draw (overridable like any key)."""
QUICK = {"seeds": 2, "max_samples": 3072}
_TAIL = 5  # "at the end" = mean over the last 5 logged steps


class AblationStopped(RuntimeError):
    pass


def _tail_mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))][-_TAIL:]
    return float(statistics.fmean(vals)) if vals else float("nan")


def run_one(row: str, seed: int, lr: float, budget: int, out: Path, extra: Sequence[str]) -> dict[str, Any]:
    from dapo.trainer.loop import train

    run_dir = out / "runs" / run_name(row, seed, lr)
    # a directory left by an interrupted ablation is continued from its newest checkpoint (or restarted
    # in place when it has none): nothing in it is thrown away
    resume = [f"ckpt.resume={run_dir}"] if run_dir.is_dir() and any(run_dir.iterdir()) else []
    cfg = load_config(row, overrides=[
        f"seed={seed}", f"optim.lr={lr}", f"optim.max_samples={budget}", "optim.steps=100000",
        f"log.out_dir={out / 'runs'}", f"log.run_name={run_dir.name}", "log.progress=none", "log.tensorboard=false",
        # a collapsed policy (every reward equal, no gradient) is a result here, not a setup to stop
        "log.report=false", "ckpt.save_final=false", "algo.max_idle_steps=0", *extra, *resume,
    ])
    res = train(cfg)
    if not res.after:  # stopped by a signal (SIGINT/SIGTERM) before its final evaluation
        raise AblationStopped(f"run {res.run_dir} stopped at step {res.steps} before its final evaluation")
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "row": row, "seed": seed, "lr": lr, "run_dir": str(res.run_dir), "steps": res.steps,
        "acc_before": res.before["accuracy"], "acc_after": res.after["accuracy"],
        "entropy_end": _tail_mean(rows, "actor/entropy"), "len_end": _tail_mean(rows, "response/len_mean"),
        "samples": rows[-1]["batch/samples_total"] if rows else 0, "wall_s": res.wall_s,
    }


def run_name(row: str, seed: int, lr: float) -> str:
    return f"{row.replace('+', 'plus_')}-lr{lr:g}-s{seed}"


def _previous_runs(out: Path, budget: int, overrides: list[str]) -> dict[tuple, dict[str, Any]]:
    """Finished runs of an earlier, interrupted ``dapo ablate`` into the same ``--out`` (same settings)."""
    path = out / "ablation.json"
    if not path.exists():
        return {}
    prev = json.loads(path.read_text())
    if prev.get("budget") != budget or prev.get("overrides", []) != overrides:
        raise ValueError(f"{out} holds an ablation with budget {prev.get('budget')} and overrides "
                         f"{prev.get('overrides', [])}, not {budget} and {overrides}; choose another --out")
    return {(r["row"], r["seed"], r["lr"]): r for r in prev.get("runs", [])}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (row, lr): mean and sample std over seeds."""
    out = []
    for key in dict.fromkeys((r["row"], r["lr"]) for r in runs):
        rs = [r for r in runs if (r["row"], r["lr"]) == key]
        acc = [r["acc_after"] for r in rs]
        line = {"row": key[0], "lr": key[1], "seeds": len(rs), "acc_mean": statistics.fmean(acc),
                "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "acc_before": statistics.fmean(r["acc_before"] for r in rs)}
        for k in ("entropy_end", "len_end", "samples", "steps", "wall_s"):
            line[k] = statistics.fmean(r[k] for r in rs)
        out.append(line)
    return out


def to_markdown(table: list[dict[str, Any]], budget: int, scoring: str = "") -> str:
    head = ("| row | lr | held-out acc (mean ± std) | before | entropy (end) | response len (end) | samples | steps |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = [f"| {t['row']} | {t['lr']:g} | {t['acc_mean']:.3f} ± {t['acc_std']:.3f} (n={t['seeds']}) | "
             f"{t['acc_before']:.3f} | {t['entropy_end']:.3f} | {t['len_end']:.1f} | {t['samples']:.0f} | {t['steps']:.0f} |"
             for t in table]
    return f"Equal budget: {budget} generated samples per run.{scoring}\n\n" + head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dapo ablate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"fewer seeds and samples ({QUICK}), ~10 minutes on 2 cores")
    p.add_argument("--seeds", type=whole(1), help=f"seeds per row (default {DEFAULTS['seeds']})")
    p.add_argument("--max-samples", type=whole(1), help=f"generated samples per run (default {DEFAULTS['max_samples']})")
    p.add_argument("--rows", default=",".join(ABLATION_ROWS), help="comma-separated presets, in table order")
    p.add_argument("--lr", type=float, default=default("optim.lr"), help=f"optim.lr of the table (default {default('optim.lr'):g})")
    p.add_argument("--high-lr", type=float, default=DEFAULTS["high_lr"],
                   help="the GRPO/DAPO pair again at this learning rate; 0 = skip")
    p.add_argument("--out", default="", help="output directory (default runs/ablate-<time>); an interrupted "
                   "ablation's directory is continued: finished runs are kept, a stopped run resumes")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run (e.g. data.task=addition)")
    args = p.parse_args(list(argv or []))
    seeds = args.seeds or (QUICK if args.quick else DEFAULTS)["seeds"]
    budget = args.max_samples or (QUICK if args.quick else DEFAULTS)["max_samples"]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    overrides = [*EVAL, *args.overrides]
    for r in rows:
        cfg = load_config(r, overrides=overrides)  # fail on a bad row or key before any run starts
    ev = "the same" if cfg.eval.seed is not None else "each seed's own"
    scoring = (f" Held-out accuracy: avg@{cfg.eval.k} (T {cfg.eval.temperature:g}) over {ev} "
               f"{cfg.eval.size} held-out prompts.")
    out = Path(args.out or f"runs/ablate-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    plan = [(r, s, args.lr) for r in rows for s in range(seeds)]
    if args.high_lr:
        plan += [(r, s, args.high_lr) for r in ("grpo", "dapo") for s in range(seeds)]
    done = _previous_runs(out, budget, overrides)
    if done:
        print(f"continuing the ablation in {out}: {len(done)} runs already finished", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, (row, seed, lr) in enumerate(plan, 1):
        if (row, seed, lr) in done:
            runs.append(done[(row, seed, lr)])
            continue
        try:
            runs.append(run_one(row, seed, lr, budget, out, overrides))
        except AblationStopped as e:
            print(f"dapo ablate: {e}; the {len(runs)} finished runs are in {out / 'ablation.json'}. "
                  f"The same command with --out {out} continues it.", file=sys.stderr)
            return 130
        except KeyboardInterrupt as e:  # a second Ctrl-C: the run's own hint names dapo train --resume
            e.dapo_hint = (f"the {len(runs)} finished runs are in {out / 'ablation.json'}; the same command with --out "
                           f"{out} continues it (the stopped run from its newest checkpoint)")
            raise
        r = runs[-1]
        print(f"[{i}/{len(plan)}] {row:17s} lr {lr:g} seed {seed}: acc {r['acc_before']:.3f} -> {r['acc_after']:.3f}, "
              f"entropy {r['entropy_end']:.3f}, len {r['len_end']:.1f}, {r['steps']} steps, {r['wall_s']:.0f}s "
              f"(total {time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        write_atomic(out / "ablation.json", json.dumps(
            {"budget": budget, "overrides": overrides, "runs": runs, "table": summarise(runs)}, indent=1))
    table = summarise(runs)
    md = to_markdown(table, budget, scoring)
    (out / "ablation.md").write_text(md)
    write_atomic(out / "ablation.json", json.dumps({"budget": budget, "overrides": overrides, "runs": runs,
                                                    "table": table, "wall_s": time.perf_counter() - t0}, indent=1))
    print(md)
    try:
        from dapo.report import write_report

        page = write_report([Path(r["run_dir"]) for r in runs], out / "report", mean_seeds=True)
        print(f"report: {page}")
    except ImportError as e:  # matplotlib missing: the table still stands
        print(f"no report: {e}", file=sys.stderr)
    print(f"ablation written to {out}")
    return 0
