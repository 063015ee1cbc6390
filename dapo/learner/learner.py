"""The policy update on one data-parallel rank: old log-probs, then mini-batch optimiser steps.

A single process is rank 0 of 1. With M ranks (``dapo.distributed``) every rank runs this same ``LocalLearner`` on
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
from pathlib import Path
from typing import Any

import torch

from dapo.config import Config, token_budget
from dapo.learner.batch import TrainBatch
from dapo.learner.loss import LossSpec, add_sums, micro_inputs, micro_loss
from dapo.learner.parallel import DataParallel, whole_tensor
from dapo.learner.plan import MicroBatchPlan
from dapo.learner.policy import PackedBatch, ResponseLogprobs, SeqBatch, response_logprobs
from dapo.learner.state import load_optimizer_state
from dapo.model import reference_policy, save_model, tied_copies, weights_to_sync
from dapo.ragged import Ragged
from dapo.rollout.base import Fingerprints, RolloutEngine, derive_seed, weight_fingerprints


class TrainingError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ the learner


class LocalLearner:
    """The trained policy on one rank: model (float32 master weights), AdamW, schedule, optional KL
    reference, and the streak of non-finite updates it has skipped. What the loop calls in one process
    (a ``dapo.learner.Learner``), and what each ``dapo.distributed`` rank runs.

    ``sampler_shares_model``: the rollout engine samples with this very model object (one process, or a
    rank of ``dist.rollout_on_ranks``), so in float32 its log-probs already are the old policy's."""

    def __init__(self, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 pad_id: int, device: torch.device, compute_dtype: torch.dtype = torch.float32,
                 ref_model: torch.nn.Module | None = None, dp: DataParallel | None = None,
                 policy: ResponseLogprobs | None = None, sampler_shares_model: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.pad_id, self.device, self.compute_dtype, self.ref_model = pad_id, device, compute_dtype, ref_model
        self.dp = dp or DataParallel(device=device)
        self.policy = policy or ResponseLogprobs(model, compute_dtype, cfg.model.head_tf32)
        """Every training forward goes through it (FSDP2-wrapped on a sharded rank)."""
        self.cfg = cfg
        self.samples_the_policy = sampler_shares_model and compute_dtype == torch.float32
        """The engine samples with this model in float32 (under LoRA with its weights merged, W + alpha/r B A: the
        same function): its log-probs are the old policy's to float rounding, so nothing needs recomputing. (Under bfloat16 compute the decode kernels and shapes round differently
        from the training forward: the trainer recomputes.)"""
        self.bad_streak = 0
        """Non-finite updates in a row (each skipped); reset by a good one."""

    @property
    def cfg(self) -> Config:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:
        """The config, and what is derived from it once: the micro-batch plan and the loss's constants."""
        self._cfg = cfg
        self.plan = MicroBatchPlan(cfg.optim.micro_batch_size, token_budget(cfg), self.pad_id, self.dp)
        self.loss_spec = LossSpec.of(cfg)

    # -------------------------------------------------------------------------------------------- old log-probs

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
        if not needs_recompute(self.cfg) or self.samples_the_policy:
            return [], torch.zeros(0)
        todo = (batch.trainable() & torch.tensor(batch.fresh, dtype=torch.bool)).nonzero().squeeze(1).tolist()
        rows: list[int] = []
        vals: list[torch.Tensor] = []
        was_training = self.model.training
        self.model.eval()  # the policy as it samples: no dropout (the update's forward runs in train mode)
        try:
            for mb in self.plan.plan(batch, todo):  # no rows: an empty pass (FSDP)
                seqs = self.plan.layout(batch, mb)
                logp, _ = self.policy(seqs.to(self.device), self.cfg.rollout.temperature)  # (b, T)
                if mb.rows:
                    rows += mb.rows
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

    def _ref_logp(self, seqs: SeqBatch | PackedBatch) -> torch.Tensor:
        """(b, T) log-probs under the KL reference (under LoRA: this model with its adapters off)."""
        with reference_policy(self.model, self.ref_model) as ref:
            return response_logprobs(ref, seqs, self.cfg.rollout.temperature, compute_dtype=self.compute_dtype,
                                     head_tf32=self.cfg.model.head_tf32)[0]

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
        valid = batch.loss_tokens(idx)  # (n,) tokens in the loss
        num_tokens = float(valid.sum())
        num_seqs = float((valid > 0).sum())
        rows = idx[valid > 0].tolist()
        no_grad = set(zero_advantage_rows(batch, rows, self.cfg))
        ref = self._ref_logp if self.loss_spec.kl_coef > 0 else None
        sums: dict[str, float] = {}

        def loss_of(mb) -> torch.Tensor:
            x = micro_inputs(self.plan, batch, old_logp, mb).to(self.device)
            loss, s = micro_loss(self.policy, x, self.loss_spec, num_tokens, num_seqs, with_entropy, ref)
            add_sums(sums, s)
            return loss

        # the metrics-only pass first: under FSDP a forward without backward leaves the root unsharded, and
        # the backward passes that follow reshard it
        for mb in self.plan.plan(batch, [i for i in rows if i in no_grad]):
            with torch.no_grad():
                loss_of(mb)
        loss_sum = 0.0
        mbs = self.plan.plan(batch, [i for i in rows if i not in no_grad])
        for k, mb in enumerate(mbs):
            if self.dp.fsdp and self.dp.world > 1:  # reduce-scatter once, after the last micro-batch
                self.policy.set_requires_gradient_sync(k == len(mbs) - 1)
            loss = loss_of(mb)
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
                add_sums(sums, stats)
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

    def push_weights(self, engine: RolloutEngine, version: int) -> Fingerprints | None:
        """The new weights to the rollout engine (which only counts them when it shares this model); returns the
        fingerprints of what it pushed, in the dtype the engine keeps (None: nothing travelled)."""
        sd = weights_to_sync(self.model)  # under LoRA: the adapters only
        engine.load_weights(sd, version)  # an engine of its own casts (Ray workers' pushes: before they leave)
        if getattr(engine, "model", None) is self.model or not self.cfg.rollout.verify_weights:
            return None  # nothing travelled, or nothing will be checked
        tied = tied_copies(self.model)  # an engine may hold a tied copy once (vLLM): compare the tensor itself
        return weight_fingerprints(((k, v) for k, v in sd.items() if k not in tied), engine.weight_dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "bad_streak": self.bad_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(load_optimizer_state(state))  # a checkpoint of ranks has it in a file
        self.scheduler.load_state_dict(state["scheduler"])
        self.bad_streak = int(state.get("bad_streak", state.get("bad_in_a_row", 0)))

    def save_pretrained(self, path: str | Path) -> None:
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


__all__ = ["DataParallel", "LocalLearner", "TrainingError", "needs_recompute", "whole_tensor", "zero_advantage_rows"]
