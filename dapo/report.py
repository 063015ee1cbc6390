"""Plots and a one-page report from training runs' ``metrics.jsonl``.

    dapo report runs/dapo-addition-20250101-120000
    dapo report runs/grpo-* runs/dapo-* --out report/

Each panel (accuracy, entropy, response length, clip fractions, groups kept; for multi-turn runs turns,
tool calls per trajectory and the share of observation tokens) is drawn twice: against
the RL step and against the number of samples generated (``batch/samples_total``), the fair axis when
comparing with and without dynamic sampling, which spends more samples per step. Runs are overlaid,
one colour each. PNGs go to the output directory, and ``report.html`` embeds them (base64) with a
table of each run's ``summary.json``, so the page can be mailed or attached on its own.

Metrics a run did not log are skipped; a panel no run has is left out. With ``--mean-seeds``, runs whose
names differ only in a trailing ``-s<seed>`` (as ``dapo ablate`` names them) are drawn as one line: at
each step, the mean over the seeds that logged it (the samples axis too).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from dapo.fsutil import write_atomic


class ReportError(ValueError):
    """A run directory that cannot be reported on, or matplotlib missing; the message says which."""


# (file stem, title, y label, [(metric key, line label)]) : one panel each
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("accuracy", "Accuracy", "accuracy", [("rollout/acc", "rollout (noisy: the policy's own samples)"),
                                          ("eval/acc", "held-out (before, every eval.every, after)")]),
    ("entropy", "Mean token entropy", "nats", [("actor/entropy", "entropy")]),
    ("response_length", "Response length", "tokens", [("response/len_mean", "mean length")]),
    ("clip_fraction", "Clipped token fraction", "fraction",
     [("actor/clipfrac_high", "high (ratio > 1+eps_high, A > 0)"), ("actor/clipfrac_low", "low (ratio < 1-eps_low, A < 0)")]),
    ("groups_kept", "Groups kept (mixed outcomes)", "fraction of groups", [("batch/kept_frac", "kept")]),
    # multi-turn runs (an environment or tools) only
    ("turns", "Model turns per trajectory", "turns", [("env/turns_mean", "rollout"),
                                                      ("eval/turns_mean", "held-out (every eval.every)")]),
    ("tool_calls", "Tool calls per trajectory", "calls", [("tool/calls_per_traj", "rollout"),
                                                          ("eval/tool_calls_mean", "held-out (every eval.every)")]),
    ("obs_frac", "Share of observation tokens", "fraction of trajectory tokens",
     [("env/obs_frac", "observation tokens (context, not trained)")]),
]
X_AXES = [("step", "step", "RL step"), ("samples", "batch/samples_total", "samples generated")]
HELD_OUT_KEY = "eval/acc"
"""Held-out accuracy, logged every ``eval.every`` steps; its line also carries the run's before and after."""
_LINESTYLES = ["-", "--", ":", "-."]


@dataclass
class Run:
    path: Path
    label: str
    rows: list[dict[str, float]]
    """One dict per step, sorted by step; a step logged twice (a resumed run) keeps its last line."""
    summary: dict[str, Any] = field(default_factory=dict)
    preset: str = ""

    def series(self, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
        """(x, y) over the steps that logged both keys with finite values. The held-out accuracy
        (``eval/acc``) also has the run's before (at x = 0) and after (at its last step) from summary.json:
        the line a user judges a run by, from start to end, beside the noisy rollout accuracy."""
        xs, ys = [], []
        for r in self.rows:
            x, y = r.get(x_key), r.get(y_key)
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                xs.append(x)
                ys.append(y)
        if y_key == HELD_OUT_KEY:
            return self._with_before_after(x_key, xs, ys)
        return xs, ys

    def _with_before_after(self, x_key: str, xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
        acc = lambda k: _as_float((self.summary.get(k) or {}).get("accuracy"))  # noqa: E731
        before, after = acc("before"), acc("after")
        last = next((r[x_key] for r in reversed(self.rows) if _as_float(r.get(x_key)) is not None), None)
        if before is not None and math.isfinite(before) and (not xs or xs[0] > 0):
            xs, ys = [0.0, *xs], [before, *ys]
        if after is not None and math.isfinite(after) and last is not None and (not xs or xs[-1] < last):
            xs, ys = [*xs, float(last)], [*ys, after]
        return xs, ys


def _as_float(v: Any) -> float | None:
    """Metric values are numbers, or strings for non-finite ones ('nan', 'inf': JSON has neither)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.jsonl -> rows sorted by step. Lines cut by a kill mid-write are skipped."""
    by_step: dict[int, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or _as_float(obj.get("step")) is None:
            continue
        row = {k: f for k, v in obj.items() if (f := _as_float(v)) is not None}
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def _read_yaml_preset(path: Path) -> str:
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ""
    return str(cfg.get("preset", "")) if isinstance(cfg, dict) else ""


def load_run(run_dir: str | Path) -> Run:
    """A run directory's metrics, summary and preset; a clear error when it has no metrics.jsonl."""
    p = Path(run_dir)
    if not p.is_dir():
        raise ReportError(f"{p}: no such run directory")
    mpath = p / "metrics.jsonl"
    if not mpath.exists():
        raise ReportError(f"{p}: no metrics.jsonl in this run directory (is it a `dapo train` run directory?)")
    summary: dict[str, Any] = {}
    if (p / "summary.json").exists():
        try:
            summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            summary = {}
    preset = _read_yaml_preset(p / "config.yaml") if (p / "config.yaml").exists() else ""
    preset = preset or str(summary.get("preset") or "")
    name = p.resolve().name
    # the run's name, plus its preset when the name does not already say it
    label = name if not preset or preset.replace("+", "plus_") in name or preset in name else f"{name} ({preset})"
    return Run(p, label, read_metrics(mpath), summary, preset)


def _unique_labels(runs: list[Run]) -> None:
    """Two runs with the same label (runs/a/x and runs/b/x) get their parent directory prepended."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.path.resolve().parent.name}/{r.label}"


def mean_over_seeds(runs: list[Run]) -> list[Run]:
    """One run per name without its ``-s<seed>`` suffix: every metric averaged over the seeds at each step."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(re.sub(r"-s\d+(?=( \(.*\))?$)", "", r.label), []).append(r)  # "x-s1 (dapo)" -> "x (dapo)"
    out = []
    for label, rs in groups.items():
        by_step: dict[int, list[dict[str, float]]] = {}
        for r in rs:
            for row in r.rows:
                by_step.setdefault(int(row["step"]), []).append(row)
        rows = []
        for step in sorted(by_step):
            keys = set().union(*by_step[step])
            rows.append({k: sum(x[k] for x in by_step[step] if k in x) / sum(k in x for x in by_step[step]) for k in keys})
        n = f" (mean of {len(rs)})" if len(rs) > 1 else ""
        out.append(Run(rs[0].path, label + n, rows, {}, rs[0].preset))
    return out


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("dapo report draws with matplotlib, which is not installed: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def plot_panel(runs: list[Run], panel: tuple, x_axis: tuple, out_path: Path) -> bool:
    """Draw one panel for every run that has its data; False (nothing written) when none has any."""
    Figure, FigureCanvasAgg = _matplotlib()
    stem, title, ylabel, keys = panel
    _, x_key, xlabel = x_axis
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, attached without pyplot: no global state, no display needed
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    drawn = 0
    for run, colour in zip(runs, colours):
        for j, (key, what) in enumerate(keys):
            xs, ys = run.series(x_key, key)
            if not xs:
                continue
            label = run.label if len(keys) == 1 else f"{run.label}: {what}"
            ax.plot(xs, ys, _LINESTYLES[j % len(_LINESTYLES)], color=colour, label=label,
                    marker="o" if len(xs) <= 20 else None, markersize=3)
            drawn += 1
    if not drawn:
        return False
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn <= 4:
        ax.legend(fontsize="small")
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.92)  # fixed margins: tight_layout costs a draw
    else:  # many lines: the legend goes beside the axes instead of over the curves
        fig.set_size_inches(10.4, 4.4)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.subplots_adjust(left=0.07, right=0.58, bottom=0.12, top=0.92)
    fig.savefig(out_path, format="png")
    return True


def _fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v)
    if isinstance(v, (int, float)):
        return f"{v:.{nd}f}" if isinstance(v, float) else str(v)
    return str(v)


def _summary_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        s = r.summary
        acc = lambda d: d.get("accuracy") if isinstance(d, dict) else None  # noqa: E731
        before, after = acc(s.get("before")), acc(s.get("after"))
        last = r.rows[-1] if r.rows else {}
        rows.append([
            r.label, r.preset or "—", _fmt(s.get("steps", int(last["step"]) if "step" in last else None)),
            _fmt(before), _fmt(after), _fmt(s.get("wall_s"), 1), _fmt(last.get("batch/samples_total"), 0),
            str(s.get("stopped_by") or "") if s else "no summary.json",
        ])
    return rows


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}.row{display:flex;flex-wrap:wrap;gap:1em}
.row img{width:600px;max-width:100%}h2{margin-top:1.5em}"""


def write_html(runs: list[Run], images: list[tuple[str, list[tuple[str, Path]]]], out_path: Path) -> None:
    """One self-contained page: the summary table, then each panel's images (base64 data URIs)."""
    head = ["run", "preset", "steps", "acc before", "acc after", "wall s", "samples", "note"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>dapo report</title>",
             f"<style>{_CSS}</style></head><body><h1>dapo report</h1>",
             "<p>Runs: " + ", ".join(f"<code>{html.escape(str(r.path))}</code>" for r in runs) + "</p>",
             "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in _summary_rows(runs):
        parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    for title, imgs in images:
        parts.append(f"<h2>{html.escape(title)}</h2><div class='row'>")
        for alt, p in imgs:
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(alt)}' title='{html.escape(p.name)}' src='data:image/png;base64,{data}'>")
        parts.append("</div>")
    if not images:
        parts.append("<p>None of the runs logged any of the plotted metrics.</p>")
    parts.append("</body></html>\n")
    write_atomic(out_path, "\n".join(parts))


def default_out_dir(run_dirs: Sequence[str | Path]) -> Path:
    """One run: RUN_DIR/report. Several: a ``report`` directory beside them (in their common parent)."""
    paths = [Path(p).resolve() for p in run_dirs]
    if len(paths) == 1:
        return paths[0] / "report"
    return Path(os.path.commonpath([str(p.parent) for p in paths])) / "report"


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, mean_seeds: bool = False) -> Path:
    """Plot every run's metrics into ``out_dir`` (PNG per panel and x-axis) and return the path of report.html.

    ``mean_seeds``: one line per run name without its ``-s<seed>`` suffix (see :func:`mean_over_seeds`);
    the page's table still lists every run."""
    if not run_dirs:
        raise ReportError("no run directories given")
    _matplotlib()  # fail before reading anything when it is missing
    runs = [load_run(d) for d in run_dirs]
    _unique_labels(runs)
    lines = mean_over_seeds(runs) if mean_seeds else runs
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, list[tuple[str, Path]]]] = []
    for panel in PANELS:
        imgs = []
        for x_axis in X_AXES:
            png = out / f"{panel[0]}_vs_{x_axis[0]}.png"
            if plot_panel(lines, panel, x_axis, png):
                imgs.append((f"{panel[1]} vs {x_axis[2]}", png))
            elif png.exists():  # a stale image from an earlier report of other runs
                png.unlink()
        if imgs:
            images.append((panel[1], imgs))
    page = out / "report.html"
    write_html(runs, images, page)
    return page


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dapo report", description="Plots and an HTML report from run directories' metrics.jsonl.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (several are overlaid)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/report, or report/ beside several runs)")
    p.add_argument("--mean-seeds", action="store_true",
                   help="one line per run name without its -s<seed> suffix, averaged over the seeds")
    args = p.parse_args(list(argv) if argv is not None else None)
    page = write_report(args.run_dirs, args.out, mean_seeds=args.mean_seeds)
    pngs = sorted(x.name for x in page.parent.glob("*_vs_*.png"))
    print(f"wrote {page} ({len(pngs)} plots: {', '.join(pngs)})")
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except ReportError as e:
        print(f"dapo report: error: {e}", file=sys.stderr)
        sys.exit(2)
