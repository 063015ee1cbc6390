"""The DAPO training loop, top to bottom.

    for each step:
        groups  = dynamic-sampling rollout          (batch.py: generate, score, keep mixed groups)
        A       = group-normalised rewards           (algo: group_advantages)
        old_lp  = log-probs under the rollout policy (recomputed with the training model, no grad)
        for each mini-batch (paper: 16 per rollout):
            for each micro-batch: loss = token-mean clipped surrogate / tokens of the mini-batch
            clip grad norm, AdamW step
        new weights -> rollout engine

What it simplifies: no critic, no KL term (kl_coef=0 by default), no reference model unless a KL is
asked for. One process by default (rank 0 of 1, an in-process engine); with ``dist.*`` set, ``dapo.dist``
runs this same loop with Ray rollout workers and data-parallel trainer ranks behind the same calls.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dapo.config import Config, save_config
from dapo.data.example import Example
from dapo.fsutil import write_atomic
from dapo.rollout.base import Completion, SamplingParams, derive_seed
from dapo.trainer.batch import DynamicSampler, Group, PromptItem, SamplerSettings
from dapo.trainer.checkpoint import load_trainer_state, save_checkpoint
from dapo.trainer.logger import RunLogger
from dapo.trainer.setup import RunParts, build_parts, resolve_run_dir
from dapo.trainer.update import (  # noqa: F401  (re-exported: the update lives in update.py)
    FlatBatch, TrainingError, compute_old_logp, flatten_groups, update_policy,
)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: dict[str, float]
    after: dict[str, float]
    wall_s: float
    history: list[dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ eval


@torch.no_grad()
def evaluate(parts: RunParts, cfg: Config, seed: int, tag: str = "eval") -> dict[str, float]:
    """Held-out accuracy: ``log.eval_k`` samples per prompt at the eval temperature / top-p, averaged (avg@k)."""
    if not parts.eval_items:
        return {"accuracy": float("nan"), "n": 0}
    k = cfg.log.eval_k
    params = SamplingParams(
        n=k, max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.eval_temperature,
        top_p=cfg.rollout.eval_top_p, top_k=cfg.rollout.top_k,
    )
    items = parts.eval_items
    comps = parts.engine.generate([it.prompt_ids for it in items], params, [derive_seed(seed, 7919, i) for i in range(len(items))])
    texts = [parts.decode(c.token_ids) for c in comps]
    scores, correct, _ = parts.score_fn(texts, [items[c.prompt_index].example for c in comps])
    return {
        "accuracy": sum(correct) / len(correct),
        "score": sum(scores) / len(scores),
        "len_mean": sum(len(c.token_ids) for c in comps) / len(comps),
        "n": len(items),
        "k": k,
    }


def evaluate_periodic(parts: RunParts, cfg: Config) -> dict[str, float]:
    """avg@k, pass@k, maj@k on the held-out prompts (``log.eval_k`` samples each), as metrics."""
    from dapo.eval import as_metrics, evaluate_k

    k = cfg.log.eval_k
    params = SamplingParams(n=k, max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.eval_temperature,
                            top_p=cfg.rollout.eval_top_p, top_k=cfg.rollout.top_k)
    res = evaluate_k(parts.engine, parts.eval_items, parts.score_fn, k, params, cfg.seed, parts.decode)
    return {**as_metrics(res), "eval/acc": float(res["metrics"][f"avg@{k}"])}


# ------------------------------------------------------------------------------------------------ the loop


class _StopFlag:
    """SIGINT / SIGTERM set this; the loop finishes the step, checkpoints and returns."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _group_to_plain(g: Group) -> dict[str, Any]:
    ex = g.item.example
    return {
        "uid": g.item.uid, "prompt_ids": g.item.prompt_ids, "step": g.step,
        "example": {"prompt": ex.prompt, "answer": ex.answer, "data_source": ex.data_source,
                    "fields": json.loads(json.dumps(ex.fields, default=str))},
        "completions": [{"token_ids": c.token_ids, "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                         "weight_version": c.weight_version, "prompt_index": c.prompt_index} for c in g.completions],
        "scores": g.scores, "correct": g.correct, "rewards": g.rewards,
    }


def _group_from_plain(d: dict[str, Any]) -> Group:
    item = PromptItem(d["uid"], Example(**d["example"]), list(d["prompt_ids"]))
    comps = [Completion(c["prompt_index"], c["token_ids"], c["logprobs"], c["finish_reason"], c["weight_version"])
             for c in d["completions"]]
    return Group(item, comps, d["scores"], d["correct"], d["rewards"], d["step"])


def _trainer_state(parts: RunParts, sampler: DynamicSampler, step: int, before: dict) -> dict[str, Any]:
    s = sampler.state_dict()
    return {
        "step": step,
        **parts.learner.state_dict(),  # optimizer, scheduler, bad_in_a_row
        "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_ver": random.getstate()[0]},
        "data": parts.stream.state_dict(),
        "sampler": {**s, "carried": [_group_to_plain(g) for g in s["carried"]]},
        "weight_version": parts.engine.weight_version,
        "before": before,
    }


def _restore(parts: RunParts, sampler: DynamicSampler, st: dict[str, Any]) -> None:
    parts.learner.load_state_dict(st)
    torch.set_rng_state(st["rng"]["torch"])
    random.setstate((st["rng"]["python_ver"], tuple(st["rng"]["python"]), None))
    parts.stream.load_state_dict(st["data"])
    sampler.load_state_dict({**st["sampler"], "carried": [_group_from_plain(g) for g in st["sampler"]["carried"]]})
    parts.engine.weight_version = st["weight_version"]


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines (metrics, samples) past the resumed step (they will be produced again), atomically."""
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


def _count_bad_rollout(parts: RunParts, cfg: Config, step: int, frac: float) -> None:
    parts.bad_in_a_row += 1
    if parts.bad_in_a_row >= cfg.optim.max_bad_steps:
        raise TrainingError(
            f"step {step}: {frac:.0%} of the rollout's log-probs are NaN, after {parts.bad_in_a_row - 1} non-finite "
            f"updates or rollouts before it: the weights are broken; stopping. The last good checkpoint is kept; "
            f"lower optim.lr or check the data/reward (optim.max_bad_steps={cfg.optim.max_bad_steps})."
        )


def _check_finite(model: torch.nn.Module, step: int) -> None:
    """Never checkpoint NaN/inf weights: keep-last-N would then prune the good checkpoints they replace."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"step {step}: {len(bad)} parameter tensors hold NaN or inf (first: {bad[0]}); not "
                            f"saving a checkpoint. The last good checkpoint is kept; lower optim.lr or check the reward.")


def _save_samples(run_dir: Path, step: int, groups: list[Group], parts: RunParts, n: int = 4) -> None:
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for g in groups[:n]:
            for c, sc, r in list(zip(g.completions, g.scores, g.rewards))[:2]:
                prompt = g.item.example.prompt if isinstance(g.item.example.prompt, str) else str(g.item.example.prompt)
                f.write(json.dumps({"step": step, "prompt": prompt, "response": parts.decode(c.token_ids),
                                    "answer": g.item.example.answer, "score": sc, "reward": r,
                                    "finish": c.finish_reason}) + "\n")


def train(cfg: Config, log_stream: Any = None, on_step: Callable[[int, dict], None] | None = None,
          parts: RunParts | None = None) -> RunResult:
    """Run DAPO (or any preset) as configured; returns where the run is and what it reached.

    ``parts``: the run already built with ``build_parts(cfg, *resolve_run_dir(cfg))``, e.g. to keep its
    Ray workers and ranks for more work afterwards; the caller then closes it. By default ``train``
    builds the parts and closes them at the end.
    """
    t_start = time.perf_counter()
    cfg.validate()
    if parts is not None:
        return _train(cfg, parts, log_stream, on_step, t_start)
    run_dir, resume_from = resolve_run_dir(cfg)
    parts = build_parts(cfg, run_dir, resume_from, log=lambda s: print(s, file=log_stream or __import__("sys").stderr))
    try:
        return _train(cfg, parts, log_stream, on_step, t_start)
    finally:
        parts.close()  # Ray workers and ranks too, even when the run fails


def _train(cfg: Config, parts: RunParts, log_stream: Any, on_step: Callable[[int, dict], None] | None,
           t_start: float) -> RunResult:
    run_dir, resume_from = parts.run_dir, parts.resume_from
    r = cfg.rollout
    sampler = DynamicSampler(
        parts.engine, parts.stream, parts.score_fn, parts.decode,
        SamplerSettings(
            group_size=r.group_size, train_batch_size=cfg.optim.train_batch_size,
            gen_batch_size=cfg.optim.gen_batch_size or cfg.optim.train_batch_size,
            params=SamplingParams(n=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                  top_p=r.top_p, top_k=r.top_k),
            dynamic_sampling=cfg.algo.dynamic_sampling, filter_metric=cfg.algo.filter_metric,
            max_gen_rounds=cfg.algo.max_gen_rounds, on_gen_cap=cfg.algo.on_gen_cap, refill=cfg.algo.refill,
            carry_over=cfg.algo.carry_over,
            soft_overlong=cfg.algo.soft_overlong, overlong_cache_len=cfg.algo.overlong_cache_len,
            overlong_factor=cfg.algo.overlong_factor, seed=cfg.seed,
        ),
    )
    start = 0
    before: dict[str, float] = {}
    if resume_from is not None:
        st = load_trainer_state(resume_from)
        _restore(parts, sampler, st)
        start, before = int(st["step"]), st["before"]
    save_config(cfg, run_dir / "config.yaml")  # only now: a resume refused above must not overwrite the run's config
    if cfg.ckpt.resume:  # lines past the checkpoint (or all, when none was written yet) are produced again
        for name in ("metrics.jsonl", "samples.jsonl"):
            if resume_from is not None and resume_from.parent != run_dir and (resume_from.parent / name).is_file():
                shutil.copyfile(resume_from.parent / name, run_dir / name)  # a branch starts with the source's logs
            _truncate_metrics(run_dir / name, start)
    logger = RunLogger(run_dir, cfg.optim.steps, cfg.log.progress, cfg.log.tensorboard, cfg.log.wandb,
                       cfg.log.wandb_project, cfg.to_dict(), stream=log_stream, start_step=start,
                       resumed=bool(cfg.ckpt.resume))
    logger.message(f"run directory: {run_dir}" + (f" (resuming from {resume_from.name})" if resume_from and resume_from.parent == run_dir
                   else f" (branching off {resume_from})" if resume_from else
                   " (no complete checkpoint in it yet: starting again from step 0)" if cfg.ckpt.resume else ""))
    if parts.device.type == "cpu":
        from dapo.trainer.sft import idle_fraction
        from dapo.trainer.setup import contention_warning

        warn = contention_warning(torch.get_num_threads(), os.cpu_count() or 1, idle_fraction, dict(os.environ))
        if warn:
            logger.message(f"warning: {warn}")
    if not before:
        before = evaluate(parts, cfg, cfg.seed)
        logger.message(f"held-out accuracy before: {before['accuracy']:.3f} (n={before['n']})")
    history: list[dict[str, float]] = []
    step = start
    stopped_by = None
    try:
        with _StopFlag() as stop:
            for step in range(start + 1, cfg.optim.steps + 1):
                t0 = time.perf_counter()
                groups, m = sampler.collect(step)
                if m.get("rollout/nan_logprob_frac"):  # a policy that computes NaN: nothing sampled from it is usable
                    groups = []
                    m["actor/skipped_updates"] = 1.0
                    _count_bad_rollout(parts, cfg, step, m["rollout/nan_logprob_frac"])
                if not groups:
                    logger.message(f"step {step}: " + ("NaN log-probs in the rollout" if m.get("rollout/nan_logprob_frac")
                                   else "no group with mixed outcomes to train on") + "; skipping the update")
                    m.update({"time/step": time.perf_counter() - t0})
                else:
                    fb = flatten_groups(groups, cfg, step)
                    t1 = time.perf_counter()
                    old_logp = parts.learner.old_logp(fb, cfg)
                    t2 = time.perf_counter()
                    m.update(parts.learner.update(fb, old_logp, cfg, step))
                    t3 = time.perf_counter()
                    parts.learner.push_weights(parts.engine, parts.engine.weight_version + 1)
                    m.update({"time/old_logp": t2 - t1, "time/update": t3 - t2, "time/weight_sync": time.perf_counter() - t3})
                    fresh = [c.weight_version for g in groups for c in g.completions if g.step == step]
                    if fresh:  # none when carried-over groups filled the whole batch
                        m["rollout/weight_version"] = float(min(fresh))
                    if cfg.log.samples_every and step % cfg.log.samples_every == 0:
                        _save_samples(run_dir, step, groups, parts)
                dt = time.perf_counter() - t0
                gen_tokens = m["response/len_mean"] * m["batch/gen_rounds"] * sampler.s.gen_batch_size * r.group_size \
                    if sampler.s.dynamic_sampling else m["response/len_mean"] * len(groups) * r.group_size
                m.update({"time/step": dt, "perf/gen_tokens_per_s": gen_tokens / max(m["time/gen"], 1e-9),
                          "perf/tokens_per_s": gen_tokens / max(dt, 1e-9), "time/wall": time.perf_counter() - t_start})
                if cfg.log.eval_every and step % cfg.log.eval_every == 0:
                    m.update(evaluate_periodic(parts, cfg))
                logger.log(step, m)
                history.append(m)
                if on_step is not None:
                    on_step(step, m)
                out_of_samples = bool(cfg.optim.max_samples) and sampler.samples_total >= cfg.optim.max_samples
                last = step == cfg.optim.steps or out_of_samples
                saved = False
                if stop.signum is not None or (cfg.ckpt.every and step % cfg.ckpt.every == 0) or (last and cfg.ckpt.save_final):
                    if parts.bad_in_a_row:  # keep-last-N must not prune good checkpoints for ones from a bad streak
                        logger.message(f"step {step}: not checkpointing after {parts.bad_in_a_row} non-finite update(s) "
                                       f"in a row; the last good checkpoint is kept")
                    else:
                        if parts.optimizer is not None:  # one process: the trained weights are here to check
                            _check_finite(parts.model, step)
                        save_checkpoint(run_dir, step, parts.learner, parts.tokenizer,
                                        _trainer_state(parts, sampler, step, before), cfg.ckpt.keep_last)
                        saved = True
                if out_of_samples:
                    logger.message(f"sample budget reached: {sampler.samples_total} >= optim.max_samples={cfg.optim.max_samples}")
                    break
                if stop.signum is not None:
                    stopped_by = signal.Signals(stop.signum).name
                    logger.message(f"{stopped_by}: stopped after step {step}" + (", checkpoint saved" if saved else "")
                                   + f"; continue with: dapo train --resume {run_dir}")
                    break
        if stopped_by is None:
            after = evaluate(parts, cfg, cfg.seed)
            logger.message(f"held-out accuracy after: {after['accuracy']:.3f} (before {before['accuracy']:.3f})")
        else:
            after = {}
    finally:
        logger.close()
    wall = time.perf_counter() - t_start
    result = RunResult(run_dir, step, before, after, wall, history)
    summary = {"before": before, "after": after, "wall_s": wall, "steps": step, "preset": cfg.preset,
               "stopped_by": stopped_by}
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    return result
