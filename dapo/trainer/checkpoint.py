"""Checkpoints that survive a crash: written to a temporary directory, checksummed, renamed into place.

A checkpoint ``step_N/`` holds the model and tokenizer in Hugging Face format (safetensors; under LoRA only
the adapter, ``adapter_model.safetensors`` + ``adapter_config.json`` naming its base: see ``dapo.lora``), the
optimiser, scheduler, RNG, data-cursor and dynamic-sampling state in ``trainer_state.pt`` (plain
tensors and Python types only, so it loads with ``torch.load(weights_only=True)``; a run on trainer
ranks keeps the optimiser state in ``optimizer.pt`` beside it, written by rank 0), and ``manifest.json``
with every file's size and SHA-256. A directory without a valid manifest is partial and never resumed from.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dapo.fsutil import fsync_dir, install_dir
from dapo.learner import Learner
from dapo.learner.state import load_pt

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    run_dir: Path, step: int, learner: Learner, tokenizer: Any, trainer_state: dict[str, Any], keep_last: int = 2,
    template: str | None = None, log: Callable[[str], None] | None = None,
) -> Path:
    """Write ``run_dir/step_{step}`` atomically and prune to the newest ``keep_last`` complete ones (``log`` is told
    where the files a pruned one held beyond the checkpoint went).

    ``learner`` writes the model files (and, on ranks, the optimiser file). ``template``: the prompt template the
    run renders its prompts with, recorded so that the checkpoint used as a model keeps it.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step}"
    tmp = run_dir / f".tmp_step_{step}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    learner.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if template is not None:
        from dapo.problems import save_template

        save_template(tmp, template)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"step": step, "time": time.time(), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    fsync_dir(tmp)
    install_dir(tmp, final)  # a re-save of the same step moves the old one aside, never deletes it first
    for where in prune_checkpoints(run_dir, keep_last):
        if log is not None:
            log(f"{where.name} pruned (ckpt.keep_last={keep_last}); the files it held beyond the checkpoint "
                f"(e.g. dapo eval's results) are kept in {where}")
    return final


def is_complete(ckpt: Path, verify: bool = False) -> bool:
    """True if ``ckpt`` has a manifest whose files all exist with the recorded sizes (and hashes)."""
    try:
        manifest = json.loads((Path(ckpt) / MANIFEST).read_text(encoding="utf-8"))
        for rel, meta in manifest["files"].items():
            p = Path(ckpt) / rel
            if not p.is_file() or p.stat().st_size != meta["bytes"]:
                return False
            if verify and _sha256(p) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def checkpoint_step(ckpt: Path) -> int | None:
    """The step a ``step_N`` checkpoint directory was saved after (None for another name)."""
    m = _STEP_DIR.match(Path(ckpt).name)
    return int(m.group(1)) if m else None


def newer_checkpoints(ckpt: Path) -> list[Path]:
    """The complete checkpoints of ``ckpt``'s run directory with a higher step than ``ckpt``'s (none for a
    directory not named ``step_N``)."""
    m = _STEP_DIR.match(Path(ckpt).name)
    if not m:
        return []
    return [p for s, p in list_checkpoints(Path(ckpt).parent) if s > int(m.group(1)) and is_complete(p)]


def latest_checkpoint(run_dir: Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` (partial or corrupt ones are skipped), or None."""
    for _, p in reversed(list_checkpoints(run_dir)):
        if is_complete(p, verify=verify):
            return p
    return None


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Keep the newest ``keep_last`` complete checkpoints; remove what killed saves and prunes left behind. Files
    a checkpoint holds beyond its manifest (``dapo eval``'s ``eval_*.json``, anything a user put there) are not
    the run's to delete: they move to ``RUN/kept/step_N/``, which is returned (one entry per checkpoint)."""
    all_ckpts = list_checkpoints(run_dir)
    complete = [(s, p) for s, p in all_ckpts if is_complete(p)]
    kept = []
    for _, p in complete[:-keep_last] if keep_last > 0 else []:
        kept += _remove(p, run_dir, p.name)
    if complete:  # a partial step_N older than the newest complete one: a prune killed half-way
        for s, p in all_ckpts:
            if s < complete[-1][0] and not is_complete(p):
                kept += _remove(p, run_dir, p.name)
    for pattern in (".tmp_step_*", ".old_step_*", ".old-step_*"):  # leftovers of a killed save
        for p in Path(run_dir).glob(pattern):
            if p.is_dir():
                kept += _remove(p, run_dir, "step_" + p.name.split("step_", 1)[1].split("_")[0])
    return kept


def _remove(ckpt: Path, run_dir: Path, name: str) -> list[Path]:
    """Delete checkpoint directory ``ckpt``, first moving the files its manifest does not list (none is known
    for one without a manifest: only eval_* files are then taken as the user's) to ``run_dir/kept/name/``."""
    try:
        listed = set(json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    extra = [f for f in ckpt.iterdir() if f.is_file() and (f.name not in listed if listed is not None
                                                            else f.name.startswith("eval_"))] if ckpt.is_dir() else []
    where = Path(run_dir) / "kept" / name
    for f in extra:
        where.mkdir(parents=True, exist_ok=True)
        target = where / f.name
        if target.exists():  # a second prune of the same step's files: neither is lost
            target = where / f"{f.stem}.{int(time.time())}{f.suffix}"
        os.replace(f, target)
    shutil.rmtree(ckpt, ignore_errors=True)
    return [where] if extra else []


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The optimiser / RNG / data state; ``weights_only`` refuses anything but tensors and plain types."""
    path = Path(ckpt) / "trainer_state.pt"
    state = load_pt(path, "the trainer state")
    if "optimizer_file" in state:  # written by trainer ranks: where it is, for whoever loads it (never here)
        opt = (Path(ckpt) / state["optimizer_file"]).resolve()
        if not opt.is_file():
            raise ValueError(f"{path}: names the optimiser state {opt}, which does not exist")
        state["optimizer_file"] = str(opt)
    return state
