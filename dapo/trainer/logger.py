"""Metrics out: metrics.jsonl always, TensorBoard and Weights & Biases when asked, a live terminal line.

The loop calls ``log(step, metrics)`` once per step; a ``NullLogger`` has the same methods, so the loop
never branches on whether logging is on (e.g. on non-zero ranks).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

# the metrics shown on the live line, in order, with short labels
_LIVE = [
    ("rollout/acc", "acc", "{:.2f}"),
    ("eval/acc", "eval", "{:.2f}"),
    ("response/len_mean", "len", "{:.1f}"),
    ("actor/entropy", "ent", "{:.3f}"),
    ("actor/clipfrac_high", "clip_hi", "{:.3f}"),
    ("batch/kept_frac", "kept", "{:.2f}"),
    ("time/step", "s/step", "{:.2f}"),
]


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no NaN/inf: keep the line valid and the fact visible
    return x


class NullLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class RunLogger(NullLogger):
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        progress: str = "auto",
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "dapo",
        config: dict | None = None,
        stream: TextIO | None = None,
        start_step: int = 0,
        resumed: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.total = total_steps
        self.stream = stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.mode = ("bar" if tty else "plain") if progress == "auto" else progress
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.t0 = time.perf_counter()
        self.start_step = start_step
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on a resume, events past the checkpoint are hidden: the steps after it are logged again
                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if resumed else None)
            except ImportError:
                self.message("tensorboard not installed: skipping TensorBoard events (pip install tensorboard)")
        self.wandb = None
        if wandb:
            try:
                import wandb as wb

                self.wandb = wb.init(project=wandb_project, name=self.run_dir.name, config=config, dir=str(self.run_dir))
            except ImportError:
                self.message("log.wandb=true but wandb is not installed (pip install wandb): not logging to W&B")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _finite(float(v)) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self.tb.add_scalar(k, float(v), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)
        self._live(step, metrics)

    def _live(self, step: int, m: dict[str, float]) -> None:
        if self.mode == "none":
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = [f"step {step}/{self.total}"]
        parts += [f"{lab} {fmt.format(m[k])}" for k, lab, fmt in _LIVE if k in m]
        parts.append(f"eta {eta:.0f}s")
        line = " | ".join(parts)
        if self.mode == "bar":
            width = 20
            fill = int(width * step / max(self.total, 1))
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {line}\x1b[K")
            if step >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.mode == "bar":
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
