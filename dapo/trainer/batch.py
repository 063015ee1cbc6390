"""Batch assembly with Dynamic Sampling (DAPO §3.2, Algorithm 1 lines 3-8).

Each generation round samples ``gen_batch_size`` prompts x G responses, scores them, and keeps only
groups whose outcomes are mixed (all-correct and all-wrong groups have zero advantage and so no
gradient). Rounds repeat until ``train_batch_size`` groups are kept or ``max_gen_rounds`` is spent.
With ``refill="adaptive"`` the rounds after the first sample only about as many prompts as are missing
at the keep rate seen so far in the step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from dapo.algo import keep_groups, overlong_penalty
from dapo.data.example import Example
from dapo.rollout.base import Completion, RolloutEngine, SamplingParams, derive_seed


@dataclass
class PromptItem:
    uid: int
    """Position in the training stream: seeds the prompt's samples and is the data cursor."""
    example: Example
    prompt_ids: list[int]


@dataclass
class Group:
    """One prompt and its G scored responses."""

    item: PromptItem
    completions: list[Completion]
    scores: list[float]
    """Verifier scores (+1 / -1 for exact verifiers)."""
    correct: list[bool]
    rewards: list[float]
    """Scores plus the soft overlong penalty when it is on: what advantages are computed from."""
    step: int
    """RL step whose policy generated it (older than the current step when carried over)."""


class PromptStream(Protocol):
    def take(self, n: int) -> list[PromptItem]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ScoreFn = Callable[[list[str], list[Example]], tuple[list[float], list[bool], dict[str, float]]]


@dataclass
class SamplerSettings:
    group_size: int
    train_batch_size: int
    gen_batch_size: int
    params: SamplingParams
    dynamic_sampling: bool = True
    filter_metric: str = "acc"
    max_gen_rounds: int = 8
    on_gen_cap: str = "train"
    refill: str = "batch"
    carry_over: bool = False
    soft_overlong: bool = False
    overlong_cache_len: int = 4
    overlong_factor: float = 1.0
    seed: int = 0


class GenCapReached(RuntimeError):
    pass


@dataclass
class DynamicSampler:
    engine: RolloutEngine
    stream: PromptStream
    score_fn: ScoreFn
    decode: Callable[[list[int]], str]
    s: SamplerSettings
    carried: list[Group] = field(default_factory=list)
    samples_total: int = 0
    rounds_total: int = 0

    def collect(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """The groups to train on at ``step`` and the round's metrics."""
        s = self.s
        kept: list[Group] = list(self.carried)
        n_carried, self.carried = len(kept), []
        t_gen = t_rew = 0.0
        rounds, seen_groups, mixed, all_groups = 0, 0, 0, []
        stats_sum: dict[str, float] = {}
        while True:
            if s.dynamic_sampling and len(kept) >= s.train_batch_size:
                break
            if rounds >= (s.max_gen_rounds if s.dynamic_sampling else 1):
                break
            n = s.train_batch_size
            if s.dynamic_sampling:
                n = self._round_size(s.train_batch_size - len(kept), len(kept) - n_carried, seen_groups)
            items = self.stream.take(n)
            t0 = time.perf_counter()
            comps = self.engine.generate(
                [it.prompt_ids for it in items], s.params, [derive_seed(s.seed, it.uid) for it in items]
            )
            t1 = time.perf_counter()
            groups, rstats = self._score(items, comps, step)
            t_rew += time.perf_counter() - t1
            t_gen += t1 - t0
            for k, v in rstats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
            rounds += 1
            seen_groups += len(groups)
            all_groups += groups
            self.samples_total += len(comps)
            metric = [g.correct if s.filter_metric == "acc" else g.rewards for g in groups]
            mask = keep_groups(torch.tensor(metric, dtype=torch.float32).reshape(-1), s.group_size).tolist()
            mixed += sum(mask)
            if s.dynamic_sampling:
                kept += [g for g, k in zip(groups, mask) if k]
            else:
                kept += groups
        self.rounds_total += rounds
        capped = s.dynamic_sampling and len(kept) < s.train_batch_size
        if capped and s.on_gen_cap == "error":
            raise GenCapReached(
                f"step {step}: only {len(kept)} of {s.train_batch_size} groups had mixed outcomes after "
                f"{rounds} generation rounds (algo.max_gen_rounds); set algo.on_gen_cap=train to train on them"
            )
        if len(kept) > s.train_batch_size:
            surplus = kept[s.train_batch_size :]
            kept = kept[: s.train_batch_size]
            if s.carry_over:
                self.carried = surplus
        resp = [c for g in all_groups for c in g.completions]
        lens = [len(c.token_ids) for c in resp] or [0]
        metrics = {
            "rollout/acc": _mean([float(x) for g in all_groups for x in g.correct]),
            "rollout/score": _mean([x for g in all_groups for x in g.scores]),
            "rollout/reward": _mean([x for g in all_groups for x in g.rewards]),
            "response/len_mean": _mean([float(x) for x in lens]),
            "response/len_max": float(max(lens)),
            "response/truncated_frac": _mean([float(c.finish_reason == "length") for c in resp]),
            # NaN log-probs mean the policy's own numbers are broken (the loop stops after a few such steps)
            "rollout/nan_logprob_frac": _mean([float(math.isnan(sum(c.logprobs))) for c in resp]),
            "batch/groups": float(len(kept)),
            "batch/kept_frac": len([g for g in all_groups if g in kept]) / max(1, seen_groups),
            "batch/mixed_frac": mixed / max(1, seen_groups),  # with a gradient (by filter_metric), kept or not
            "batch/gen_rounds": float(rounds),
            "batch/capped": float(capped),
            "batch/carried": float(len(self.carried)),
            "batch/samples_total": float(self.samples_total),
            "time/gen": t_gen,
            "time/reward": t_rew,
        }
        metrics.update(stats_sum)
        return kept, metrics

    def _round_size(self, missing: int, kept_here: int, seen_here: int) -> int:
        """Prompts for the next round: ``gen_batch_size``; with adaptive refill, after the step's first round,
        the missing groups over the keep rate seen so far in this step, with a quarter to spare."""
        s = self.s
        if s.refill != "adaptive" or not seen_here or not kept_here:
            return s.gen_batch_size
        return max(1, min(s.gen_batch_size, math.ceil(1.25 * missing * seen_here / kept_here)))

    def _score(self, items: Sequence[PromptItem], comps: list[Completion], step: int) -> tuple[list[Group], dict]:
        G = self.s.group_size
        texts = [self.decode(c.token_ids) for c in comps]
        examples = [items[c.prompt_index].example for c in comps]
        scores, correct, stats = self.score_fn(texts, examples)
        rewards = list(scores)
        if self.s.soft_overlong:
            lens = torch.tensor([len(c.token_ids) for c in comps])
            pen = overlong_penalty(lens, self.s.params.max_new_tokens, self.s.overlong_cache_len, self.s.overlong_factor)
            rewards = [r + p for r, p in zip(rewards, pen.tolist())]
        groups = [
            Group(it, comps[i * G : (i + 1) * G], scores[i * G : (i + 1) * G], correct[i * G : (i + 1) * G],
                  rewards[i * G : (i + 1) * G], step)
            for i, it in enumerate(items)
        ]
        return groups, stats

    def state_dict(self) -> dict[str, Any]:
        return {"carried": self.carried, "samples_total": self.samples_total, "rounds_total": self.rounds_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried = list(state["carried"])
        self.samples_total = int(state["samples_total"])
        self.rounds_total = int(state["rounds_total"])


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0
