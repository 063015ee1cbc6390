"""The run directory: where a run lives, how it resumes or branches, what its checkpoints carry, and
the files it leaves (config.yaml, metrics.jsonl, samples.jsonl, summary.json, step_N/).

A resume continues in the checkpoint's own run directory, dropping what was logged after the checkpoint
(it is produced again). Continuing from a checkpoint older than the run's newest would overwrite the newer
checkpoints and their metrics: that is refused. Naming another run (``log.run_name``, ``log.out_dir``:
other than the resumed run's own) branches off instead: a new directory that starts with the source's
metrics and samples up to the checkpoint, and the source is left untouched.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dapo.config import Config, config_changes, save_config
from dapo.data.example import Example
from dapo.fsutil import occupied, strict_json, write_atomic
from dapo.items import Group, PromptItem
from dapo.model import SetupError
from dapo.rollout.base import Completion
from dapo.trainer.checkpoint import checkpoint_step, is_complete, latest_checkpoint, newer_checkpoints

if TYPE_CHECKING:
    from dapo.trainer.build import Run


def resume_source(resume: str) -> tuple[Path, Path | None]:
    """(run directory, checkpoint) that ``ckpt.resume=resume`` names, checked; no checkpoint only for a run
    killed before its first one. Changes nothing on disk."""
    p = Path(resume)
    if not p.exists():
        raise SetupError(f"ckpt.resume={resume}: no such directory")
    if (p / "trainer_state.pt").exists() or p.name.startswith("step_"):
        if not is_complete(p, verify=True):
            raise SetupError(f"ckpt.resume={resume}: not a complete checkpoint (manifest missing, or a "
                             f"file missing or damaged); resume from the run directory to use its newest complete one")
        return p.parent, p
    ckpt = latest_checkpoint(p)
    if ckpt is None and not (p / "config.yaml").exists():
        raise SetupError(f"ckpt.resume={resume}: no complete checkpoint (step_N/ with a manifest) in it")
    return p, ckpt  # None: a run killed before its first checkpoint, nothing to lose: it starts again


def resolve_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None). Never reuses a finished run's directory silently."""
    if cfg.ckpt.resume:
        source, ckpt = resume_source(cfg.ckpt.resume)
        if ckpt is not None:
            _same_kind(cfg, ckpt)
            done = checkpoint_step(ckpt)
            # fewer steps than done: the loop would run none, re-evaluate and rewrite summary.json and config.yaml.
            # As many: a finished run is left as it is (finished_summary; a requeued job), a run killed before its
            # final evaluation does that; a branch of it would train nothing
            if done is not None and (done > cfg.optim.steps or done == cfg.optim.steps and _names_another_run(
                    cfg, source) and finished_summary(source, done) is not None):
                raise SetupError(f"ckpt.resume={cfg.ckpt.resume}: {ckpt.name} is {done} steps in, and optim.steps="
                                 f"{cfg.optim.steps}: nothing left to train; continue with optim.steps=N, N > {done}")
        if _names_another_run(cfg, source):
            branch = Path(cfg.log.out_dir) / cfg.log.run_name
            if occupied(branch):
                raise SetupError(f"log.run_name: {branch} already exists and is not empty; a resume branches into a "
                                 f"new directory only (or leave log.run_name as it was to continue in {source})")
            branch.mkdir(parents=True, exist_ok=True)
            return branch, ckpt
        newer = [q.name for q in newer_checkpoints(ckpt)] if ckpt is not None else []
        if newer:
            raise SetupError(
                f"ckpt.resume={cfg.ckpt.resume}: {source} has newer checkpoints ({', '.join(newer)}); continuing from "
                f"{ckpt.name} there would overwrite them and the metrics after it. Branch into a new directory with "
                f"log.run_name=NEW_NAME, or resume the newest with ckpt.resume={source}"
            )
        return source, ckpt
    stem = cfg.data.task if not cfg.data.path else Path(cfg.data.path).stem
    name = cfg.log.run_name or f"{cfg.preset.replace('+', 'plus_')}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.log.out_dir) / name
    if occupied(run_dir):
        raise SetupError(f"run directory {run_dir} already exists and is not empty; continue it with "
                         f"ckpt.resume={run_dir} or choose another log.run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def finished_summary(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The run's summary.json when it says the run ended after ``step`` with its final evaluation done, else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    done = isinstance(summary, dict) and summary.get("steps") == step and bool(summary.get("after"))
    return summary if done else None


def _same_kind(cfg: Config, ckpt: Path) -> None:
    """A LoRA checkpoint (adapter + the adapters' optimiser state) resumes only as LoRA, a full one only as full
    fine-tuning: the optimiser state belongs to the parameters that were trained."""
    from dapo.lora import is_lora_checkpoint

    adapter = is_lora_checkpoint(ckpt)
    if adapter != (cfg.model.lora_rank > 0):
        held = "a LoRA adapter and its optimiser state" if adapter else "a full model and its optimiser state"
        raise SetupError(f"ckpt.resume={cfg.ckpt.resume}: {ckpt.name} holds {held}, but model.lora_rank="
                         f"{cfg.model.lora_rank}: resume with the run's own model.lora_* settings (its config.yaml), or "
                         f"start a new run from it (model.path={ckpt}{'' if adapter else ' model.lora_rank=R'})")


def _names_another_run(cfg: Config, source: Path) -> bool:
    """``log.out_dir``/``log.run_name`` point away from ``source`` and were not simply carried over from its
    saved config (a run that was moved or copied still names where it was first written)."""
    if not cfg.log.run_name:
        return False
    target = Path(cfg.log.out_dir) / cfg.log.run_name
    if target.resolve() == source.resolve():
        return False
    saved = source / "config.yaml"
    if saved.exists():
        import yaml

        try:
            log = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("log", {})
        except (OSError, yaml.YAMLError):
            log = {}
        if (str(log.get("out_dir")), str(log.get("run_name"))) == (str(cfg.log.out_dir), str(cfg.log.run_name)):
            return False
    return True


def open_logs(cfg: Config, run_dir: Path, resume_from: Path | None, start: int) -> list[str]:
    """Save the config, and on a resume drop what was logged past the checkpoint (a branch first copies the
    source's logs). Only once the run is built: a resume refused earlier must not touch the run's files.

    A resume (in place, or a branch) with changed keys keeps the config the earlier steps ran with as
    ``config.upto_step_N.yaml`` beside the new config.yaml; returns the changes (``key: old -> new``)."""
    kept, changes = run_dir / f"config.upto_step_{start}.yaml", []
    if cfg.ckpt.resume and resume_from is not None:
        # what steps 1..start ran with: the copy an earlier resume from this step kept, else the (source) run's config
        earlier = kept if kept.is_file() else resume_from.parent / "config.yaml"
        changes = config_changes(earlier, cfg, ignore=RESUME_KEYS)
        if any(not c.startswith(HOW_LONG) for c in changes) and not kept.is_file():  # more steps alone change
            shutil.copyfile(earlier, kept)  # nothing the earlier ones did
    save_config(cfg, run_dir / "config.yaml")
    if not cfg.ckpt.resume:
        return changes
    for name in ("metrics.jsonl", "samples.jsonl"):  # lines past the checkpoint (all, with none) come again
        if resume_from is not None and resume_from.parent != run_dir and (resume_from.parent / name).is_file():
            shutil.copyfile(resume_from.parent / name, run_dir / name)
        truncate_log(run_dir / name, start)
    return changes


HOW_LONG = ("optim.steps:", "optim.max_samples:")
"""Keys that say how long a run goes on: changing them on a resume is continuing, not changing the recipe."""
RESUME_KEYS = ("ckpt.resume", "log.out_dir", "log.run_name")
"""Keys that name the resume itself and a branch: not reported as changed."""


def truncate_log(path: Path, last_step: int) -> None:
    """Drop lines (metrics, samples) past ``last_step`` (they will be produced again), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    write_atomic(path, "".join(x + "\n" for x in keep))


def append_samples(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_atomic(run_dir / "summary.json", strict_json(summary, indent=1))


def should_checkpoint(cfg: Config, step: int, last: bool, stopping: bool) -> bool:
    """Save at ``ckpt.every``, after the last step (``ckpt.save_final``), and when a signal stops the run."""
    return stopping or (cfg.ckpt.every > 0 and step % cfg.ckpt.every == 0) or (last and cfg.ckpt.save_final)


# --------------------------------------------------------------------------------------------------
# what a checkpoint holds besides the weights: trainer_state.pt (plain tensors and Python types only)


def _group_to_plain(g: Group) -> dict[str, Any]:
    ex = g.item.example
    return {
        "uid": g.item.uid, "prompt_ids": g.item.prompt_ids, "step": g.step,
        "example": {"prompt": ex.prompt, "answer": ex.answer, "data_source": ex.data_source,
                    "fields": json.loads(json.dumps(ex.fields, default=str))},
        # a multi-turn trajectory's mask (False on observation tokens) goes with it: without it a resumed run would
        # train on the environment's tokens; None (no key) for single-turn completions, as older checkpoints hold
        "completions": [{"token_ids": c.token_ids, "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                         "weight_version": c.weight_version, "prompt_index": c.prompt_index,
                         **({} if c.mask is None else {"mask": c.mask})} for c in g.completions],
        "scores": g.scores, "correct": g.correct, "rewards": g.rewards, "errors": g.errors,
    }


def _group_from_plain(d: dict[str, Any]) -> Group:
    item = PromptItem(d["uid"], Example(**d["example"]), list(d["prompt_ids"]))
    comps = [Completion(c["prompt_index"], c["token_ids"], c["logprobs"], c["finish_reason"], c["weight_version"],
                        c.get("mask")) for c in d["completions"]]
    return Group(item, comps, d["scores"], d["correct"], d["rewards"], d["step"], d.get("errors"))


def trainer_state(run: Run, step: int, before: dict[str, Any], wall_s: float = 0.0) -> dict[str, Any]:
    """Optimiser, schedule, RNG, data cursor, dynamic-sampling state and weight version at ``step``, and the
    run's wall time up to it (``wall_s``, every session's)."""
    sampler = run.sampler.state_dict()
    return {
        "step": step,
        **run.learner.state_dict(),  # optimizer, scheduler, bad_streak
        "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_ver": random.getstate()[0]},
        "data": run.problems.stream.state_dict(),
        "sampler": {**sampler, "carried": [_group_to_plain(g) for g in sampler["carried"]]},
        "rollout_ahead": _rollout_to_plain(run.rollouts.state_dict()),
        "weight_version": run.engine.weight_version,
        "before": before,
        "wall_s": wall_s,
    }


def restore(run: Run, state: dict[str, Any]) -> None:
    run.learner.load_state_dict(state)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate((state["rng"]["python_ver"], tuple(state["rng"]["python"]), None))
    run.problems.stream.load_state_dict(state["data"])
    run.sampler.load_state_dict({**state["sampler"], "carried": [_group_from_plain(g) for g in state["sampler"]["carried"]]})
    run.engine.weight_version = state["weight_version"]
    run.rollouts.load_state_dict(_rollout_from_plain(state.get("rollout_ahead") or {}))


def _rollout_to_plain(ahead: dict[str, Any]) -> dict[str, Any]:
    """A rollout collected one step ahead (``dist.async_steps``), as plain data for trainer_state.pt."""
    if not ahead:
        return {}
    return {**ahead, "groups": [_group_to_plain(g) for g in ahead["groups"]],
            "sampled": [_group_to_plain(g) for g in ahead["sampled"]]}


def _rollout_from_plain(ahead: dict[str, Any]) -> dict[str, Any]:
    if not ahead:
        return {}
    return {**ahead, "groups": [_group_from_plain(g) for g in ahead["groups"]],
            "sampled": [_group_from_plain(g) for g in ahead["sampled"]]}
