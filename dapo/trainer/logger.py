"""Metrics out: metrics.jsonl always, TensorBoard and Weights & Biases when asked, a live terminal line.

The loop calls ``log(step, metrics)`` once per step and ``message(text)`` for anything a person should read.
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


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        log_cfg: Any,
        config: dict | None = None,
        stream: TextIO | None = None,
        start_step: int = 0,
        resumed: bool = False,
    ):
        """``log_cfg``: the config's ``log`` section (progress, tensorboard, wandb, wandb_project)."""
        self.run_dir = Path(run_dir)
        self.total = total_steps
        self.stream = stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.mode = ("bar" if tty else "plain") if log_cfg.progress == "auto" else log_cfg.progress
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.t0 = time.perf_counter()
        self.start_step = start_step
        self.tb = None
        if log_cfg.tensorboard != "false":
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on a resume, events past the checkpoint are hidden: the steps after it are logged again
                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if resumed else None)
            except ImportError:
                if log_cfg.tensorboard == "true":  # asked for by name: say why there are none
                    self.message("log.tensorboard=true but tensorboard is not installed (pip install tensorboard): "
                                 "no TensorBoard events")
        self.wandb = None
        if log_cfg.wandb:
            try:
                import wandb as wb

                self.wandb = wb.init(project=log_cfg.wandb_project, name=self.run_dir.name, config=config,
                                     dir=str(self.run_dir))
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
