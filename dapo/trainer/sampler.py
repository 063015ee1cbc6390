"""Batch assembly with Dynamic Sampling (DAPO §3.2, Algorithm 1 lines 3-8).

Each generation round samples ``rollout.gen_batch_size`` prompts x G responses, scores them, and keeps
only groups whose outcomes are mixed (all-correct and all-wrong groups have zero advantage and so no
gradient). Rounds repeat until ``optim.train_batch_size`` groups are kept or ``algo.max_gen_rounds`` is
spent. With ``algo.refill=adaptive`` the rounds after the first sample only about as many prompts as are
missing at the keep rate seen so far in the step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from dapo.algo import keep_groups, overlong_penalty
from dapo.config import Config
from dapo.items import Group, PromptItem, PromptStream, ScoreIds
from dapo.rollout.base import Completion, RolloutEngine, SamplingParams, derive_seed
from dapo.rollout.multiturn import MultiTurnRollout, Trajectory, score_trajectories, trajectory_metrics


class GenCapReached(RuntimeError):
    pass


def rollout_params(cfg: Config) -> SamplingParams:
    """Training's sampling settings: G samples per prompt at ``rollout.*``."""
    r = cfg.rollout
    return SamplingParams(n=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                          top_p=r.top_p, top_k=r.top_k)


@dataclass
class DynamicSampler:
    """Collects each step's groups: ``collect(step) -> (groups to train on, metrics)``."""

    cfg: Config
    engine: RolloutEngine
    stream: PromptStream
    score_ids: ScoreIds
    """Responses' token ids (1-D int64 tensors) and their examples -> RewardBatch. It decodes them itself, once
    each and where it is cheapest (``dapo.problems.ResponseDecoder``): the reward workers when there are, else
    one batched call for the round; every response is decoded, as every one needs a score. The few texts the
    watch writes to samples.jsonl are decoded again there (8 of a step's thousands)."""
    carried: list[Group] = field(default_factory=list)
    """Surplus mixed groups kept for the next step (``algo.carry_over``)."""
    samples_total: int = 0
    """Responses generated over the run (the ``optim.max_samples`` budget counts these)."""
    last_round: list[Group] = field(default_factory=list)
    """Every group sampled in the last ``collect``, kept or not (for samples.jsonl and diagnostics)."""
    multiturn: MultiTurnRollout | None = None
    """Trajectories with an environment (``env.*``): each prompt's G trajectories, scored by the environment's
    rewards or the score function on the last turn; None = one completion per sample, scored as it is."""

    @property
    def gen_batch_size(self) -> int:
        return self.cfg.rollout.gen_batch_size or self.cfg.optim.train_batch_size

    def collect(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """The groups to train on at ``step`` and the round's metrics."""
        a, want = self.cfg.algo, self.cfg.optim.train_batch_size
        kept: list[Group] = list(self.carried)
        n_carried, self.carried = len(kept), []
        self.last_round = []  # the last step's groups go now, not at the end of this one (memory)
        t_gen = t_rew = 0.0
        rounds, mixed, sampled = 0, 0, []
        stats_sum: dict[str, float] = {}
        params = rollout_params(self.cfg)
        trajs_all: list[Trajectory] = []
        while not (a.dynamic_sampling and len(kept) >= want) and rounds < (a.max_gen_rounds if a.dynamic_sampling else 1):
            n = self._round_size(want - len(kept), len(kept) - n_carried, len(sampled)) if a.dynamic_sampling else want
            items = self.stream.take(n)
            t0 = time.perf_counter()
            seeds = [derive_seed(self.cfg.seed, it.uid) for it in items]
            trajs = None
            if self.multiturn is None:
                comps = self.engine.generate([it.prompt_ids for it in items], params, seeds)
            else:  # the environment's turns run here too: time/gen counts them
                items, trajs = self.multiturn.run(items, params, seeds)
                comps = [t.completion for t in trajs]
                trajs_all += trajs
            t1 = time.perf_counter()
            groups, rstats = self._score(items, comps, step, trajs)
            t_gen, t_rew = t_gen + t1 - t0, t_rew + time.perf_counter() - t1
            for k, v in rstats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
            rounds += 1
            sampled += groups
            self.samples_total += len(comps)
            metric = [g.correct if a.filter_metric == "acc" else g.rewards for g in groups]
            has_gradient = keep_groups(torch.tensor(metric, dtype=torch.float32).reshape(-1), self.cfg.rollout.group_size)
            mixed += int(has_gradient.sum())
            kept += [g for g, m in zip(groups, has_gradient.tolist()) if m or not a.dynamic_sampling]
        capped = a.dynamic_sampling and len(kept) < want
        if capped and a.on_gen_cap == "error":
            raise GenCapReached(
                f"step {step}: only {len(kept)} of {want} groups had mixed outcomes after {rounds} generation "
                f"rounds (algo.max_gen_rounds); set algo.on_gen_cap=train to train on them"
            )
        if len(kept) > want:
            kept, surplus = kept[:want], kept[want:]
            if a.carry_over:
                self.carried = surplus
        self.last_round = sampled
        metrics = {
            **_rollout_metrics(sampled),
            "batch/groups": float(len(kept)),
            "batch/kept_frac": len({id(g) for g in kept} & {id(g) for g in sampled}) / max(1, len(sampled)),
            "batch/mixed_frac": mixed / max(1, len(sampled)),  # with a gradient (by filter_metric), kept or not
            "batch/gen_rounds": float(rounds),
            "batch/capped": float(capped),
            "batch/carried": float(len(self.carried)),
            "batch/samples_total": float(self.samples_total),
            "time/gen": t_gen,
            "time/reward": t_rew,
            **stats_sum,
            **(trajectory_metrics(trajs_all) if self.multiturn is not None else {}),
        }
        return kept, metrics

    def _round_size(self, missing: int, kept_here: int, seen_here: int) -> int:
        """Prompts for the next round: ``gen_batch_size``; with adaptive refill, after the step's first round,
        the missing groups over the keep rate seen so far in this step, with a quarter to spare."""
        if self.cfg.algo.refill != "adaptive" or not seen_here or not kept_here:
            return self.gen_batch_size
        return max(1, min(self.gen_batch_size, math.ceil(1.25 * missing * seen_here / kept_here)))

    def _score(self, items: Sequence[PromptItem], comps: list[Completion], step: int,
               trajs: list[Trajectory] | None = None) -> tuple[list[Group], dict]:
        a, G = self.cfg.algo, self.cfg.rollout.group_size
        examples = [items[c.prompt_index].example for c in comps]
        if trajs is None:
            scored = self.score_ids([c.token_ids for c in comps], examples)
        else:
            scored = score_trajectories(trajs, examples, self.score_ids)
        rewards = list(scored.scores)
        if a.soft_overlong:  # over the model's own tokens (all turns): observations are not the model's length
            lens = torch.tensor([c.n_model_tokens for c in comps])
            pen = overlong_penalty(lens, self.cfg.rollout.max_new_tokens, a.overlong_cache_len, a.overlong_factor)
            rewards = [r + p for r, p in zip(rewards, pen.tolist())]
        errors = scored.errors or [""] * len(comps)
        groups = [
            Group(it, comps[i * G : (i + 1) * G], scored.scores[i * G : (i + 1) * G], scored.correct[i * G : (i + 1) * G],
                  rewards[i * G : (i + 1) * G], step, errors[i * G : (i + 1) * G])
            for i, it in enumerate(items)
        ]
        return groups, scored.stats

    def state_dict(self) -> dict[str, Any]:
        return {"carried": self.carried, "samples_total": self.samples_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried = list(state["carried"])
        self.samples_total = int(state["samples_total"])


def _rollout_metrics(groups: list[Group]) -> dict[str, float]:
    """What the step's samples look like: accuracy, reward, lengths (and exact token counts), truncation. Lengths
    count the model's tokens (a multi-turn trajectory's observation tokens are in ``env/obs_tokens``)."""
    resp = [c for g in groups for c in g.completions]
    lens = [c.n_model_tokens for c in resp] or [0]
    return {
        "rollout/acc": _mean([float(x) for g in groups for x in g.correct]),
        "rollout/score": _mean([x for g in groups for x in g.scores]),
        "rollout/reward": _mean([x for g in groups for x in g.rewards]),
        "response/len_mean": _mean([float(x) for x in lens]),
        "response/len_max": float(max(lens)),
        "response/truncated_frac": _mean([float(c.finish_reason == "length") for c in resp]),
        "batch/gen_tokens": float(sum(lens)),  # every token generated this step, kept or not
        # NaN log-probs mean the policy's own numbers are broken (the loop stops after a few such steps)
        "rollout/nan_logprob_frac": float(torch.stack([c.logprobs.sum() for c in resp]).isnan().float().mean())
        if resp else 0.0,
    }


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


class Rollouts:
    """Where each step's groups come from: collected when the step asks (synchronous), or, with
    ``dist.async_steps=1``, collected in a background thread while the previous step's update runs.

    One step off: ``start(N + 1)`` is called after step N's rollout, before its update, so step N+1 samples
    with the weights that sampled step N; ``wait()`` is called after the update and before the new weights
    are pushed, because nothing may be sampling while they change. The rollout workers are other processes,
    so the thread only waits on them (and scores; with an environment it also drives the turns: tokenising
    observations, stepping the environments, waiting on the tool pool). ``state_dict`` carries a rollout collected ahead, so a
    checkpoint between the two steps resumes exactly.
    """

    def __init__(self, sampler: DynamicSampler):
        self.sampler = sampler
        self.ahead = sampler.cfg.dist.async_steps > 0
        self._pool = None
        if self.ahead:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dapo-rollout")
        self._future: Any = None
        self._ready: tuple[int, list[Group], dict[str, float], list[Group]] | None = None
        self.sampled: list[Group] = []
        """Every group sampled for the step last handed out by ``get``, kept or not (samples, diagnostics)."""

    def _collect(self, step: int) -> tuple[int, list[Group], dict[str, float], list[Group]]:
        groups, m = self.sampler.collect(step)
        return step, groups, m, list(self.sampler.last_round)

    def get(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """Step ``step``'s groups and rollout metrics: the ones collected ahead, or collected now."""
        # one collected ahead for another step has taken prompts and counted samples: never drop it silently
        assert self._ready is None or self._ready[0] == step, f"rollout collected for step {self._ready[0]}, not {step}"
        ready = self._ready or self._collect(step)
        self._ready = None
        _, groups, m, self.sampled = ready
        return groups, dict(m)

    def start(self, step: int) -> None:
        """Begin collecting ``step`` now (async only; nothing past ``optim.steps``)."""
        if self.ahead and step <= self.sampler.cfg.optim.steps:
            self._future = self._pool.submit(self._collect, step)

    def wait(self) -> None:
        """The rollout collected ahead, finished (its errors raised here)."""
        if self._future is not None:
            future, self._future = self._future, None
            self._ready = future.result(timeout=self.sampler.cfg.dist.timeout_s)

    def state_dict(self) -> dict[str, Any]:
        if self._ready is None:
            return {}
        step, groups, m, sampled = self._ready
        return {"step": step, "groups": groups, "metrics": m, "sampled": sampled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ready = (state["step"], state["groups"], state["metrics"], state["sampled"]) if state else None

    def close(self) -> None:
        """Let a rollout still being collected finish before the engine and the reward pool it uses close."""
        if self._pool is not None:
            if self._future is not None:
                try:  # a generation round at most; a stuck one is the engine's close's to end
                    self._future.result(timeout=min(30.0, self.sampler.cfg.dist.timeout_s))
                except Exception:  # noqa: BLE001  the run is ending for another reason already
                    pass
                self._future = None
            self._pool.shutdown(wait=False, cancel_futures=True)
