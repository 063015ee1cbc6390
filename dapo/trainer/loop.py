"""The DAPO training loop. One step, ``train_step``, is the algorithm (DAPO Algorithm 1):

    groups   = sample G responses per prompt, score them, keep only groups with mixed outcomes   (§3.2)
    A        = group-normalised rewards; truncated responses masked out of the loss              (Eq. 9, §3.4)
    old_logp = log-probs of each sampled token under the policy that sampled it
               (+ the sampler/trainer mismatch measured, and corrected when ``algo.rollout_is`` asks)
    for each mini-batch: clipped surrogate with [1 - eps_low, 1 + eps_high], token-mean, AdamW   (Eq. 10, 12)
    new weights -> the rollout engine

Old log-probs are the engine's own where they provably equal a recompute (one process, float32 compute:
the engine samples with the very model being trained, whose weights have not moved since) and where no
recompute could give the behaviour policy's (carried-over groups, a one-step-off async rollout: the
trainer's weights have moved since); the trainer recomputes them otherwise (Ray workers, vLLM, bfloat16
compute), and ``algo.rollout_is`` corrects for what the two disagree on.

What it simplifies: no critic, no KL term (``algo.kl_coef=0`` by default), no reference model unless a
KL is asked for. One process by default (an in-process engine); with ``dist.*`` set, ``dapo.distributed`` puts
the same two calls (``learner``, ``engine``) behind Ray rollout workers and data-parallel trainer ranks.

``train`` wraps steps with what a run needs around them: the held-out evaluation (before, every
``eval.every`` steps, after), logs, samples, checkpoints, signals, and stopping a run that cannot learn.
"""
from __future__ import annotations

import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dapo.config import Config, validate
from dapo.eval import as_metrics, evaluate, headline, sampling_params
from dapo.items import Group
from dapo.learner import TrainingError
from dapo.rollout.base import Fingerprints, RolloutEngine, WeightSyncError
from dapo.trainer.batch import flatten_groups, rollout_correction
from dapo.trainer.build import Run, build_run
from dapo.trainer.checkpoint import checkpoint_step, load_trainer_state, save_checkpoint
from dapo.trainer.logger import RunLogger
from dapo.trainer.run import (finished_summary, open_logs, resolve_run_dir, restore, should_checkpoint, trainer_state,
                              write_summary)
from dapo.trainer.watch import StepWatch


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: dict[str, float]
    after: dict[str, float]
    wall_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    report: Path | None = None


@contextmanager
def timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    metrics[key] = time.perf_counter() - t0


def train_step(run: Run, step: int) -> tuple[list[Group], dict[str, float]]:
    """One RL step; returns the groups it trained on (none: no update) and its metrics."""
    groups, m = run.rollouts.get(step)  # G scored responses per prompt, mixed groups only
    if m["rollout/nan_logprob_frac"] or not groups:  # a policy computing NaN, or nothing with a gradient
        return [], m
    batch = flatten_groups(groups, run.cfg, step)  # advantages; the overlong filter's loss mask
    with timed(m, "time/old_logp"):
        old_logp = run.learner.old_logp(batch)  # pi_old of every token (recomputed where it can differ)
    weights, mm = rollout_correction(batch, old_logp, run.cfg.algo)  # sampler vs trainer: measured, and
    m.update(mm)                                                      # per-token weights if algo.rollout_is asks
    check_mismatch(m, run.cfg.rollout.max_logp_diff, step)  # a sampler far off the policy: not trained on
    run.rollouts.start(step + 1)  # one step off (dist.async_steps): the next rollout samples during the update
    with timed(m, "time/update"):
        m.update(run.learner.update(batch.weighted(weights), old_logp, step))  # clipped, token-mean, AdamW steps
    with timed(m, "time/wait_rollout"):
        run.rollouts.wait()  # nothing may sample while the weights change
    with timed(m, "time/weight_sync"):
        pushed = run.learner.push_weights(run.engine, run.engine.weight_version + 1)  # the sampler gets the new policy
        if pushed is not None:  # fingerprints of what travelled (none with rollout.verify_weights=false)
            verify_push(run.engine, pushed, step)  # ... and provably holds it
    fresh = [c.weight_version for g in groups if g.step == step for c in g.completions]
    if fresh:  # none when carried-over groups filled the whole batch
        m["rollout/weight_version"] = float(min(fresh))
    return groups, m


def verify_push(engine: RolloutEngine, pushed: Fingerprints, step: int) -> None:
    """Stop the run if the engine's weights are not the ones just pushed (``rollout.verify_weights``)."""
    try:
        engine.check_weights(pushed)
    except WeightSyncError as e:
        raise TrainingError(f"step {step}: weight sync v{engine.weight_version} failed: {e}. The sampler would "
                            f"serve a policy that is not the one being trained; stopping (rollout.verify_weights)") from None


def check_mismatch(m: dict[str, float], bound: float, step: int) -> None:
    """Stop the run when the sampler's log-probs are further from the trainer's than ``rollout.max_logp_diff``."""
    diff = m["mismatch/logp_abs_diff"]
    if bound > 0 and diff > bound:
        raise TrainingError(f"step {step}: mismatch/logp_abs_diff={diff:.4g} > rollout.max_logp_diff={bound:g}: the "
                            f"rollout engine samples from a policy far from the one being trained (stale or wrong "
                            f"weights, or a sampler in another dtype far off); not training on it. Raise "
                            f"rollout.max_logp_diff (0 = off) if this gap is expected")


def held_out_eval(run: Run) -> dict[str, Any]:
    """The held-out evaluation (``eval.*``): the same seeds at every step, so equal weights score equally."""
    return evaluate(run.engine, run.problems.eval_items, run.problems.score_fn, run.decode, sampling_params(run.cfg),
                    run.cfg.eval_seed, extract=run.problems.extract, multiturn=run.sampler.multiturn)


# ------------------------------------------------------------------------------------------------ the run


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


def train(cfg: Config, log_stream: Any = None, on_step: Callable[[int, dict], None] | None = None,
          run: Run | None = None) -> RunResult:
    """Run DAPO (or any preset) as configured; returns where the run is and what it reached.

    ``run``: one already built with ``build_run(cfg, *resolve_run_dir(cfg))``, e.g. to keep its Ray workers
    and ranks for more work afterwards; the caller then closes it. By default ``train`` builds the run and
    closes it at the end, also when it fails.
    """
    t_start = time.perf_counter()
    validate(cfg)
    if run is not None:
        return _train(run, log_stream, on_step, t_start)
    named = Path(cfg.log.out_dir) / cfg.log.run_name if cfg.log.run_name else None
    existed = named is not None and named.exists()  # a directory the user made stays, even empty
    run_dir, resume_from = resolve_run_dir(cfg)
    made = not (existed and run_dir.resolve() == named.resolve())
    done = checkpoint_step(resume_from) if resume_from is not None and resume_from.parent == run_dir else None
    summary = finished_summary(run_dir, done) if done == cfg.optim.steps else None
    if summary is not None:  # resumed in place after it finished (a requeued job): nothing to do, nothing rewritten
        print(f"{run_dir} finished at step {done} of optim.steps={cfg.optim.steps}: nothing to do (continue with "
              f"optim.steps=N, N > {done})", file=log_stream or sys.stderr)
        return RunResult(run_dir, done, summary.get("before") or {}, summary.get("after") or {},
                         time.perf_counter() - t_start)
    try:
        run = build_run(cfg, run_dir, resume_from, log=lambda s: print(s, file=log_stream or sys.stderr))
        try:
            return _train(run, log_stream, on_step, t_start)
        finally:
            run.close()
    except BaseException as e:
        fresh = not cfg.ckpt.resume and _nothing_trained(run_dir)
        if fresh and isinstance(e, (Exception, KeyboardInterrupt)):
            for f in run_dir.iterdir():  # a new run that failed or was stopped before its first step (an
                shutil.rmtree(f) if f.is_dir() else f.unlink()  # environment's error, Ctrl-C in the first
                # evaluation): the same command runs again
        if made and run_dir.is_dir() and not any(run_dir.iterdir()):  # refused before writing anything: leave no
            run_dir.rmdir()  # empty run (or branch) directory of its own behind; one holding anything is kept
        if isinstance(e, KeyboardInterrupt):
            e.dapo_hint = _interrupted(run_dir, fresh, cfg)  # what the command line says of it
        raise


def _interrupted(run_dir: Path, fresh: bool, cfg: Config) -> str:
    """What a run stopped by a (second) Ctrl-C or SIGTERM outside a step's end leaves, in words. A resume stopped
    before it saved its config (while loading, in the first evaluation) names the keys it changed again: the
    run's config.yaml does not hold them yet."""
    import shlex

    from dapo.config.load import changed_overrides
    from dapo.trainer.checkpoint import latest_checkpoint

    if fresh:
        return "it stopped before its first step: nothing was trained and nothing of it is kept (the same command " \
               "starts it again)"
    again = changed_overrides(run_dir / "config.yaml", cfg, ignore=("ckpt.resume",))
    command = " ".join(["dapo train --resume", shlex.quote(str(run_dir)), *map(shlex.quote, again)])
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        return f"{run_dir} has no complete checkpoint yet: {command} starts it again from step 0"
    return f"{run_dir} keeps its last complete checkpoint, {ckpt.name}; continue with: {command}"


_BEFORE_THE_FIRST_STEP = {"config.yaml", "metrics.jsonl", "summary.json", "tb"}
"""What a new run's directory holds until its first step is logged (samples.jsonl is kept: it shows a step)."""


def _nothing_trained(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a new run writes before its first step, no step logged."""
    try:
        names = {f.name for f in run_dir.iterdir()}
        metrics = run_dir / "metrics.jsonl"
        return names <= _BEFORE_THE_FIRST_STEP and (not metrics.exists() or not metrics.read_text().strip())
    except OSError:
        return False


def _train(run: Run, log_stream: Any, on_step: Callable[[int, dict], None] | None, t_start: float) -> RunResult:
    cfg, run_dir = run.cfg, run.run_dir
    start, before = 0, {}
    if run.resume_from is not None:
        state = load_trainer_state(run.resume_from)
        restore(run, state)
        start, before = int(state["step"]), state["before"]
        t_start -= float(state.get("wall_s", 0.0))  # time/wall and summary.json's wall_s go on from the checkpoint
    changes = open_logs(cfg, run_dir, run.resume_from, start)
    logger = RunLogger(run_dir, cfg.optim.steps, cfg.log, cfg.to_dict(), stream=log_stream, start_step=start,
                       resumed=bool(cfg.ckpt.resume))
    if changes:
        kept = (run_dir / f"config.upto_step_{start}.yaml").is_file()
        logger.message(f"resumed with {len(changes)} changed key(s): {'; '.join(changes)}" + (
            f"; the config of steps 1..{start} is kept as config.upto_step_{start}.yaml" if kept else ""))
    watch = StepWatch(run, logger)
    watch.starting(start)
    measured = bool(run.problems.eval_items)  # eval.size=0, or a file too small to hold rows out
    if not measured and not before:
        logger.message(f"no held-out problems ({_why_none_held_out(cfg, run)}): accuracy before and after "
                       f"training is not measured (null in summary.json)")
    if not before:
        before = headline(held_out_eval(run)) if measured else {"accuracy": float("nan"), "n": 0, "k": cfg.eval.k}
        if measured:
            logger.message(f"held-out accuracy before: {before['accuracy']:.3f} (n={before['n']}, avg@{before['k']})")
    history: list[dict[str, float]] = []
    step, stopped_by, after = start, None, {}
    try:
        with _StopFlag() as stop:
            for step in range(start + 1, cfg.optim.steps + 1):
                t0 = time.perf_counter()
                groups, m = train_step(run, step)
                watch.after_step(step, groups, m)  # samples, reward errors, idle / NaN streaks (may stop the run)
                m.update({"time/step": time.perf_counter() - t0, "time/wall": time.perf_counter() - t_start,
                          "perf/gen_tokens_per_s": m["batch/gen_tokens"] / max(m["time/gen"], 1e-9),
                          "perf/tokens_per_s": m["batch/gen_tokens"] / max(time.perf_counter() - t0, 1e-9)})
                if cfg.eval.every and step % cfg.eval.every == 0 and measured:
                    m.update(as_metrics(held_out_eval(run)))
                logger.log(step, m)
                history.append(m)
                if on_step is not None:
                    on_step(step, m)
                # the samples this step's rollout brought the total to (a rollout collected ahead is not counted)
                out_of_samples = bool(cfg.optim.max_samples) and m["batch/samples_total"] >= cfg.optim.max_samples
                last = step == cfg.optim.steps or out_of_samples or watch.solved
                saved = should_checkpoint(cfg, step, last, stop.signum is not None) \
                    and _checkpoint(run, step, before, watch, logger, time.perf_counter() - t_start)
                if watch.solved:
                    break
                if out_of_samples:
                    logger.message(f"sample budget reached: {m['batch/samples_total']:.0f} >= optim.max_samples="
                                   f"{cfg.optim.max_samples}")
                    break
                if stop.signum is not None:
                    stopped_by = signal.Signals(stop.signum).name
                    logger.message(f"{stopped_by}: stopped after step {step}" + (", checkpoint saved" if saved else "")
                                   + f"; continue with: dapo train --resume {run_dir}")
                    break
        if stopped_by is None and measured:
            after = headline(held_out_eval(run))
            logger.message(f"held-out accuracy after: {after['accuracy']:.3f} (before {before['accuracy']:.3f})")
        elif stopped_by is None:
            after = dict(before)
    finally:
        logger.close()
        write_summary(run_dir, {"before": before, "after": after, "wall_s": time.perf_counter() - t_start,
                                "steps": step, "preset": cfg.preset, "stopped_by": stopped_by})
    report = _report(run_dir, logger) if cfg.log.report and stopped_by is None else None
    return RunResult(run_dir, step, before, after, time.perf_counter() - t_start, history, report)


def _why_none_held_out(cfg: Config, run: Run) -> str:
    if cfg.eval.size <= 0:
        return "eval.size=0"
    if cfg.data.path and not cfg.eval.path:
        rows = len(getattr(run.problems.stream, "examples", None) or [])
        return (f"{cfg.data.path} has {rows} rows and a tenth of a file is held out, none under 10 rows; set "
                f"eval.path=FILE to measure on other rows")
    return f"{cfg.eval.path or cfg.data.task} gave none"


def _checkpoint(run: Run, step: int, before: dict, watch: StepWatch, logger: RunLogger, wall_s: float) -> bool:
    """Save ``step_N/`` unless the weights may be broken; returns whether it saved. ``wall_s``: the run's
    training time so far, over every session (a resume goes on from it)."""
    streak = max(run.learner.bad_streak, watch.nan_streak)
    if streak:  # keep-last-N must not prune good checkpoints for ones from a bad streak
        logger.message(f"step {step}: not checkpointing after {streak} non-finite update(s) or rollout(s) in a row; "
                       f"the last good checkpoint is kept")
        return False
    bad = run.learner.nonfinite_params()
    if bad:  # never checkpoint NaN/inf weights: keep-last-N would then prune the good checkpoints they replace
        raise TrainingError(f"step {step}: {len(bad)} parameter tensors hold NaN or inf (first: {bad[0]}); not "
                            f"saving a checkpoint. The last good checkpoint is kept; lower optim.lr or check the reward.")
    save_checkpoint(run.run_dir, step, run.learner, run.tokenizer, trainer_state(run, step, before, wall_s),
                    run.cfg.ckpt.keep_last, template=run.problems.template, log=logger.message)
    return True


def _report(run_dir: Path, logger: RunLogger) -> Path | None:
    """Plots and report.html into RUN/report (as ``dapo report RUN`` would)."""
    try:
        from dapo.report import write_report

        page = write_report([run_dir], run_dir / "report")
    except Exception as e:  # noqa: BLE001  a report must never fail a finished run
        logger.message(f"no report: {e}")
        return None
    logger.message(f"report: {page}")
    return page


__all__ = ["RunResult", "TrainingError", "train", "train_step"]
