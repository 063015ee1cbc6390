"""The optimiser state on disk: the one file format a learner and a checkpoint agree on.

A run on trainer ranks keeps the optimiser state in ``OPTIMIZER_FILE`` beside the checkpoint's trainer
state, written by rank 0 in the single-process layout; a single process keeps it inline. Either loads in
either: a run can resume with another number of ranks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

OPTIMIZER_FILE = "optimizer.pt"
"""The optimiser state of a run on trainer ranks (same layout as a single process's, inline there)."""


def load_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """The optimiser state of a checkpoint's trainer state: inline, or its file mapped into memory."""
    if "optimizer" in state:
        return state["optimizer"]
    return load_pt(state["optimizer_file"], "the optimiser state", mmap=True)


def load_pt(path: str | Path, what: str, mmap: bool = False) -> Any:
    """``torch.load`` of plain tensors and Python types only; a failure names the file and ``what`` it holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError for a damaged zip, OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load {what} ({type(e).__name__}: {first})") from None
