"""The policy update on one data-parallel rank: old log-probs, then mini-batch optimiser steps.

A single process is rank 0 of 1. With M ranks (``dapo.dist``) every rank runs this same ``Learner`` on
its share of each mini-batch. The token-mean denominator is the valid-token count of the WHOLE
mini-batch (all ranks, all micro-batches), so each rank's loss is a partial sum of the single-process
loss and the SUM of the ranks' gradients is exactly the single-process gradient:

    grad = sum_r sum_{micro-batch m of rank r} d/dtheta [ sum_{tokens in m} loss_tok / num_tokens ]

``DataParallel.reduce_grads`` does that sum with an all-reduce (under FSDP2, its reduce-scatter
averages and the mean is scaled back by the world size). Nothing here knows about Ray.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from dapo.algo import group_advantages
from dapo.config import Config
from dapo.items import Group
from dapo.model import save_model, weights_to_sync
from dapo.ragged import Ragged
from dapo.rollout.base import Completion, derive_seed
from dapo.trainer.loss import micro_batches_of, micro_pass, micro_seqs, rank_micro_batches
from dapo.trainer.policy import ResponseLogprobs


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainBatch:
    """The step's responses, flattened over groups: what the update reads. Token ids and log-probs are
    ``Ragged``: one buffer each, with the same row offsets (row i is response i)."""

    prompts: list[list[int]]
    """Each response's prompt (the group's own list, not a copy: G rows share one)."""
    responses: Ragged
    """Token ids, int64."""
    behaviour_logp: Ragged
    """log-probs the sampler reported for each token (the behaviour policy), float32; ``responses``' offsets."""
    fresh: list[bool]
    """Sampled by the current policy (carried-over groups were not)."""
    advantages: torch.Tensor  # (N,)
    loss_mask: torch.Tensor  # (N,) 0 for responses kept out of the loss (overlong filter, sequence mask)
    is_weights: Ragged | None = None
    """Per-token importance weights on the loss (``algo.rollout_is=token``), float32; None = all 1."""

    @classmethod
    def of(cls, prompts: list[list[int]], responses: list, behaviour_logp: list, fresh: list[bool],
           advantages: torch.Tensor, loss_mask: torch.Tensor) -> "TrainBatch":
        """From per-response sequences (lists or 1-D tensors), as tests and benchmarks build one by hand."""
        r = Ragged.of(responses, torch.long)
        return cls(list(prompts), r, r.like(Ragged.of(behaviour_logp, torch.float32).values), list(fresh),
                   advantages, loss_mask)

    def seq_lengths(self) -> list[int]:
        """Prompt + response tokens of each row: what micro-batches are planned by."""
        return [len(p) + n for p, n in zip(self.prompts, self.responses.lengths.tolist())]

    def trainable(self) -> torch.Tensor:
        """(N,) bool: rows with at least one token in the loss."""
        return (self.loss_mask > 0) & (self.responses.lengths > 0)


def flatten_groups(groups: list[Group], cfg: Config, step: int) -> TrainBatch:
    """Advantages (group-normalised rewards, DAPO Eq. 9) and the overlong filter (§3.4) over the step's groups."""
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)  # (P*G,)
    adv = group_advantages(rewards, cfg.rollout.group_size, norm_std=cfg.algo.norm_adv_std,
                           estimator=cfg.algo.adv_estimator)
    comps: list[Completion] = [c for g in groups for c in g.completions]
    loss_mask = torch.ones(len(comps))
    if cfg.algo.overlong_filter:
        loss_mask = torch.tensor([0.0 if c.finish_reason == "length" else 1.0 for c in comps])
    responses = Ragged.of([c.token_ids for c in comps], torch.long)
    return TrainBatch(
        prompts=[g.item.prompt_ids for g in groups for _ in g.completions],
        responses=responses,
        behaviour_logp=responses.like(torch.cat([c.logprobs for c in comps]) if comps else torch.zeros(0)),
        fresh=[g.step == step for g in groups for _ in g.completions],
        advantages=adv,
        loss_mask=loss_mask,
    )


# ------------------------------------------------------------------------------------------------ ranks


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel trainer ranks; rank 0 of 1 is a single process."""

    rank: int = 0
    world: int = 1
    fsdp: bool = False
    """Parameters are FSDP2-sharded: FSDP reduces gradients itself, and every rank must run the same
    number of forward/backward passes (its all-gathers are collectives), so short ranks run empty ones."""
    device: torch.device = torch.device("cpu")
    """Where this rank's collective tensors live: NCCL takes CUDA tensors only."""
    bucket_numel: int = 1 << 24
    """Gradients are all-reduced in flat buckets of at most this many elements."""

    def share(self, idx: list[int], rank: int | None = None) -> list[int]:
        """Rank ``rank``'s (default: this rank's) responses of ``idx``: strided, so shares differ by at most one."""
        return idx[self.rank if rank is None else rank :: self.world]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (a no-op on one rank). ``t`` must be on ``device``."""
        if self.world > 1:
            assert t.device == self.device, f"collective tensor on {t.device}, this rank's device is {self.device}"
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def sum_scalar(self, x: float) -> float:
        """A float summed over ranks (the loss), in float64 on the rank's device."""
        return self.all_reduce(torch.tensor([x], dtype=torch.float64, device=self.device)).item()

    def reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum the ranks' partial gradients, so every rank holds the whole mini-batch's gradient (its shard
        of it under FSDP)."""
        if self.world == 1:
            return
        if self.fsdp:  # FSDP2 reduce-scattered in the last backward, as a MEAN over ranks (gloo has no
            for p in model.parameters():  # pre-scaled sum); the losses already carry the global denominator
                if p.grad is not None:
                    p.grad.mul_(self.world)
            return
        params = [p for p in model.parameters() if p.requires_grad]
        # a parameter no rank touched keeps grad None (as in one process: AdamW then skips it); one
        # that only some ranks touched gets zeros on the others so the sum lines up
        touched = self.all_reduce(torch.tensor([float(p.grad is not None) for p in params], device=self.device))
        params = [p for p, t in zip(params, touched.tolist()) if t > 0]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        for i, p in enumerate(params):
            bucket.append(p.grad)
            if i == len(params) - 1 or sum(g.numel() for g in bucket) + params[i + 1].numel() > self.bucket_numel:
                flat = self.all_reduce(torch.cat([g.reshape(-1) for g in bucket]))
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
                bucket = []

    def gather_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Add up per-rank metric sums (keys may differ: a rank without data has none). Python objects go
        over the object-collective group (gloo), never NCCL."""
        if self.world == 1:
            return sums
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, sums)
        out: dict[str, float] = {}
        for p in parts:
            for k, v in p.items():
                out[k] = out.get(k, 0.0) + v
        return out


def whole_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) as the whole tensor; a plain tensor as is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


# ------------------------------------------------------------------------------------------------ the learner


class Learner:
    """The trained policy on one rank: model (float32 master weights), AdamW, schedule, optional KL
    reference, and the streak of non-finite updates it has skipped. What the loop calls in one process,
    and what each ``dapo.dist`` rank runs."""

    def __init__(self, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 pad_id: int, device: torch.device, compute_dtype: torch.dtype = torch.float32,
                 ref_model: torch.nn.Module | None = None, dp: DataParallel | None = None,
                 policy: ResponseLogprobs | None = None, engine: Any = None):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.pad_id, self.device, self.compute_dtype, self.ref_model = pad_id, device, compute_dtype, ref_model
        self.dp = dp or DataParallel(device=device)
        self.policy = policy or ResponseLogprobs(model, compute_dtype)
        """Every training forward goes through it (FSDP2-wrapped on a sharded rank)."""
        self.engine = engine
        """The rollout engine when it samples with this very model (one process; ``dist.rollout_on_ranks``)."""
        self.bad_streak = 0
        """Non-finite updates in a row (each skipped); reset by a good one."""

    # -------------------------------------------------------------------------------------------- old log-probs

    def samples_the_policy(self) -> bool:
        """The engine samples with this learner's own model object in float32: its log-probs already are the
        old policy's to float rounding, so nothing needs recomputing. (Under bfloat16 compute the decode
        kernels and shapes round differently from the training forward: the trainer recomputes.)"""
        return getattr(self.engine, "model", None) is self.model and self.compute_dtype == torch.float32

    @torch.no_grad()
    def old_logp_share(self, batch: TrainBatch) -> tuple[list[int], torch.Tensor]:
        """This rank's share of the recomputed behaviour log-probs: (response indices, their log-probs one
        after the other, float32). Two tensors' worth to ship back, however many rows.

        Recomputed with the training model (its numerics, not the engine's), except where a recompute
        cannot change anything: responses kept out of the loss, and responses sampled in this step by an
        engine that runs this very model (``samples_the_policy``), whose weights have not changed since.
        One step off (``dist.async_steps``) the sampler ran the weights before the last update: the old
        policy is the sampler's own, so nothing is recomputed, unless ``algo.rollout_is`` asks for the
        decoupled form (the trainer's recompute, importance-weighted to the sampler).
        """
        if not needs_recompute(self.cfg) or self.samples_the_policy():
            return [], torch.zeros(0)
        todo = (batch.trainable() & torch.tensor(batch.fresh, dtype=torch.bool)).nonzero().squeeze(1).tolist()
        rows: list[int] = []
        vals: list[torch.Tensor] = []
        o = self.cfg.optim
        was_training = self.model.training
        self.model.eval()  # the policy as it samples: no dropout (the update's forward runs in train mode)
        try:
            for mb in rank_micro_batches(todo, batch.seq_lengths(), o.micro_batch_size, self.dp, o.micro_batch_tokens):
                seqs = micro_seqs(batch, mb or [], self.pad_id, packed=o.micro_batch_tokens > 0)  # None: empty pass (FSDP)
                logp, _ = self.policy(seqs.to(self.device), self.cfg.rollout.temperature)  # (b, T)
                if mb:
                    rows += mb
                    vals.append(logp[seqs.response_mask.to(logp.device) > 0].float().cpu())  # row by row, its tokens
        finally:
            self.model.train(was_training)
        return rows, torch.cat(vals) if vals else torch.zeros(0)

    def old_logp(self, batch: TrainBatch) -> Ragged:
        """Log-probs of each response under the policy that sampled it (one process: every response)."""
        out = batch.behaviour_logp.clone()
        rows, vals = self.old_logp_share(batch)
        if rows:
            out.values[batch.responses.positions(rows)] = vals
        return out

    # -------------------------------------------------------------------------------------------- update

    def minibatch_backward(self, batch: TrainBatch, old_logp: Ragged, resp_idx: list[int],
                           with_entropy: bool = False) -> tuple[float, dict[str, float]]:
        """Forward/backward of this rank's share of one mini-batch, accumulating into ``.grad``.

        ``resp_idx`` is the WHOLE mini-batch (every rank's responses): the token-mean (or seq-mean)
        denominator counts all of it, so the ranks' gradients sum to the single-process gradient.
        Responses with an exactly-zero advantage (``optim.skip_zero_adv``) get a forward pass without
        autograd, for the metrics only: the gradient is the same, for less work.
        Returns this rank's loss (its partial sum) and token-weighted stat sums.
        """
        idx = torch.tensor(resp_idx, dtype=torch.long)
        valid = batch.loss_mask[idx].double() * batch.responses.lengths[idx].double()  # (n,) tokens in the loss
        num_tokens = float(valid.sum())
        num_seqs = float((valid > 0).sum())
        rows = idx[valid > 0].tolist()
        no_grad = set(zero_advantage_rows(batch, rows, self.cfg))
        lengths = batch.seq_lengths()
        o = self.cfg.optim
        sums: dict[str, float] = {}
        # the metrics-only pass first: under FSDP a forward without backward leaves the root unsharded, and
        # the backward passes that follow reshard it
        for mb in rank_micro_batches([i for i in rows if i in no_grad], lengths, o.micro_batch_size, self.dp,
                                     o.micro_batch_tokens):
            with torch.no_grad():
                micro_pass(self, batch, old_logp, mb or [], with_entropy, num_tokens, num_seqs, sums)
        loss_sum = 0.0
        mbs = rank_micro_batches([i for i in rows if i not in no_grad], lengths, o.micro_batch_size, self.dp,
                                 o.micro_batch_tokens)
        for k, mb in enumerate(mbs):
            if self.dp.fsdp and self.dp.world > 1:  # reduce-scatter once, after the last micro-batch
                self.policy.set_requires_gradient_sync(k == len(mbs) - 1)
            loss = micro_pass(self, batch, old_logp, mb or [], with_entropy, num_tokens, num_seqs, sums)
            loss.backward()
            loss_sum += loss.item()
        return loss_sum, sums

    def update(self, batch: TrainBatch, old_logp: Ragged, step: int) -> dict[str, float]:
        """Mini-batch optimiser steps over the rollout; returns the step's actor metrics (the same on every rank)."""
        o, G, dp = self.cfg.optim, self.cfg.rollout.group_size, self.dp
        P = len(batch.responses) // G
        trainable = batch.trainable()  # (N,)
        sums: dict[str, float] = {}
        n_updates = n_skipped = 0
        grad_norms, losses = [], []
        self.model.train()
        for epoch in range(o.epochs):
            order = list(range(P))
            random.Random(derive_seed(self.cfg.seed, step, epoch)).shuffle(order)
            for m0 in range(0, P, o.mini_batch_size):
                resp_idx = [g * G + j for g in order[m0 : m0 + o.mini_batch_size] for j in range(G)]
                if not trainable[resp_idx].any():
                    continue  # no valid token in the whole mini-batch: every rank skips it alike
                self.optimizer.zero_grad(set_to_none=True)
                loss, stats = self.minibatch_backward(batch, old_logp, resp_idx, with_entropy=epoch == 0)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                loss = dp.sum_scalar(loss)
                grad_norm = self._step(loss, step)
                if grad_norm is None:
                    n_skipped += 1
                else:
                    n_updates += 1
                    losses.append(loss)
                    grad_norms.append(grad_norm)
        return self._metrics(dp.gather_sums(sums), losses, grad_norms, n_updates, n_skipped)

    def _step(self, loss: float, step: int) -> float | None:
        """Clip and apply the summed gradient (returns its norm), or skip a non-finite one (returns None; and
        stop after ``optim.max_bad_steps`` in a row)."""
        o = self.cfg.optim
        self.dp.reduce_grads(self.model)
        gn = whole_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf")))
        if not (math.isfinite(loss) and torch.isfinite(gn)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_streak += 1
            if self.bad_streak >= o.max_bad_steps:
                raise TrainingError(
                    f"step {step}: {self.bad_streak} optimiser updates in a row had a non-finite loss or gradient "
                    f"(loss {loss}, grad norm {gn.item()}); stopping. The last good checkpoint is kept; lower optim.lr "
                    f"or check the data/reward (optim.max_bad_steps={o.max_bad_steps}).")
            return None
        self.bad_streak = 0
        self.optimizer.step()
        self.scheduler.step()
        return gn.item()

    def _metrics(self, sums: dict[str, float], losses: list[float], grad_norms: list[float], n_updates: int,
                 n_skipped: int) -> dict[str, float]:
        tokens = sums.pop("tokens", 0.0)
        ent, ent_tok = sums.pop("entropy", 0.0), sums.pop("entropy_tokens", 0.0)
        m = {f"actor/{k}": v / max(tokens, 1.0) for k, v in sums.items()}
        if ent_tok:
            m["actor/entropy"] = ent / ent_tok
        m.update({
            "actor/pg_loss": sum(losses) / max(len(losses), 1),
            "actor/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "actor/lr": self.scheduler.get_last_lr()[0],
            "actor/updates": float(n_updates),
            "actor/skipped_updates": float(n_skipped),
            "actor/bad_streak": float(self.bad_streak),
            "actor/loss_tokens": tokens / self.cfg.optim.epochs,
        })
        return m

    # -------------------------------------------------------------------------------------------- weights, state

    def push_weights(self, engine: Any, version: int) -> None:
        """The new weights to the rollout engine (which only counts them when it shares this model)."""
        engine.load_weights(weights_to_sync(self.model), version)  # under LoRA: the adapters only

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "bad_streak": self.bad_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from dapo.trainer.checkpoint import load_optimizer_state

        self.optimizer.load_state_dict(load_optimizer_state(state))  # a checkpoint of ranks has it in a file
        self.scheduler.load_state_dict(state["scheduler"])
        self.bad_streak = int(state.get("bad_streak", state.get("bad_in_a_row", 0)))

    def save_pretrained(self, path: Any) -> None:
        save_model(self.model, path)  # under LoRA: the adapter only

    def nonfinite_params(self) -> list[str]:
        """Names of parameter tensors holding NaN or inf (empty when all is well)."""
        return [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]

    def close(self) -> None:
        pass


def needs_recompute(cfg: Config) -> bool:
    """Whether the trainer recomputes old log-probs at all: not with ``rollout.use_engine_logprobs``, nor one step
    off (``dist.async_steps``) without ``algo.rollout_is``, where the old policy is the sampler's own."""
    stale = cfg.dist.async_steps > 0 and cfg.algo.rollout_is == "none"
    return not (cfg.rollout.use_engine_logprobs or stale)


def zero_advantage_rows(batch: TrainBatch, rows: list[int], cfg: Config) -> list[int]:
    """The responses of ``rows`` whose backward pass can be skipped: advantage exactly 0 and no KL term.

    Their loss is -0 * ratio at every token, so their gradient is exactly zero; they still count in the
    loss's denominator (token-mean, seq-mean), and their tokens still enter the metrics. Empty when the
    switch is off, when a KL term gives them a gradient, when they are under a quarter of the rows (their
    separate forward pass would cost about what it saves on a small model: bench/zero_adv.py), or when
    every row is one of them (then the mini-batch runs as usual, so AdamW still steps on a zero gradient).
    """
    if not cfg.optim.skip_zero_adv or cfg.algo.kl_coef > 0:
        return []
    zero = [i for i, z in zip(rows, (batch.advantages[rows] == 0.0).tolist()) if z]
    return [] if 4 * len(zero) < len(rows) or len(zero) == len(rows) else zero


__all__ = ["DataParallel", "Learner", "Ragged", "TrainBatch", "TrainingError", "flatten_groups", "micro_batches_of",
           "whole_tensor", "zero_advantage_rows"]
