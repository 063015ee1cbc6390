"""The loss of one micro-batch: where the maths of ``dapo.algo`` meets the model.

``micro_loss`` reads as the algorithm: log-probs of the responses under the current policy, the clipped
surrogate against the old log-probs (Clip-Higher, DAPO Eq. 10) weighted by the mismatch correction, an
optional KL term, and the aggregation with the mini-batch's global denominator (token-mean, DAPO Eq. 12).
Every tensor it uses is in its ``MicroInputs``; the constants are in a ``LossSpec`` built once per learner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dapo.algo import PolicyLoss, aggregate_loss, get_policy_loss, kl_penalty
from dapo.learner.batch import TrainBatch
from dapo.learner.plan import MicroBatch, MicroBatchPlan
from dapo.learner.policy import PackedBatch, SeqBatch
from dapo.ragged import Ragged

RefLogprobs = Callable[[SeqBatch | PackedBatch], torch.Tensor]
"""A micro-batch's (b, T) log-probs under the KL reference policy."""


@dataclass(frozen=True)
class LossSpec:
    """The constants of the policy loss (``algo.*``, ``rollout.temperature``), resolved once."""

    policy_loss: PolicyLoss
    eps_low: float
    eps_high: float
    clip_c: float | None
    loss_agg: str
    max_len: int
    """Dr. GRPO's constant length normaliser (``rollout.max_new_tokens``)."""
    temperature: float
    kl_coef: float = 0.0
    kl_kind: str = "k3"

    @classmethod
    def of(cls, cfg) -> "LossSpec":
        a = cfg.algo
        return cls(get_policy_loss(a.policy_loss), a.eps_low, a.eps_high, a.clip_c, a.loss_agg,
                   cfg.rollout.max_new_tokens, cfg.rollout.temperature, a.kl_coef, a.kl_kind)


@dataclass
class MicroInputs:
    """One micro-batch's tensors, as they go to the device."""

    seqs: SeqBatch | PackedBatch
    old_logp: torch.Tensor  # (b, T) pi_old of each response token
    advantages: torch.Tensor  # (b,)
    mask: torch.Tensor  # (b, T) 1 on tokens in the loss
    weights: torch.Tensor | None  # (b, T) the correction's importance weights; None = 1

    def to(self, device: torch.device) -> "MicroInputs":
        w = None if self.weights is None else self.weights.to(device)
        return MicroInputs(self.seqs.to(device), self.old_logp.to(device), self.advantages.to(device),
                           self.mask.to(device), w)


def micro_inputs(plan: MicroBatchPlan, batch: TrainBatch, old_logp: Ragged, mb: MicroBatch) -> MicroInputs:
    """Micro-batch ``mb`` of ``batch`` laid out on the CPU. No rows: the empty pass, mask 0."""
    seqs = plan.layout(batch, mb)
    T = seqs.n_resp
    if not mb.rows:
        return MicroInputs(seqs, torch.zeros(1, T), torch.zeros(1), torch.zeros(1, T), None)
    idx = torch.tensor(mb.rows, dtype=torch.long)
    mask, w = batch.in_loss(idx, T)
    return MicroInputs(seqs, old_logp.padded(idx, T), batch.advantages[idx], mask, w)


def micro_loss(policy: torch.nn.Module, x: MicroInputs, spec: LossSpec, num_tokens: float, num_seqs: float,
               with_entropy: bool = False, ref_logp: RefLogprobs | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch with its share of the mini-batch's normaliser (``num_tokens``, ``num_seqs``:
    the whole mini-batch's, every rank's), and its token-weighted stat sums."""
    logp, ent = policy(x.seqs, spec.temperature, with_entropy)  # (b, T)
    loss_tok, stats = spec.policy_loss(logp, x.old_logp, x.advantages, x.mask, spec.eps_low, spec.eps_high,
                                       spec.clip_c, x.weights)
    if spec.kl_coef > 0:
        with torch.no_grad():
            ref = ref_logp(x.seqs)  # (b, T)
        kl = kl_penalty(logp, ref, spec.kl_kind)
        loss_tok = loss_tok + spec.kl_coef * kl * x.mask
        stats["kl_ref"] = (kl.detach() * x.mask).sum() / x.mask.sum().clamp(min=1)
    loss = aggregate_loss(loss_tok, x.mask, spec.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                          max_len=spec.max_len)
    ntok = x.mask.sum().item()
    sums = {"tokens": ntok, **{k: v.item() * ntok for k, v in stats.items()}}
    if ent is not None:
        sums["entropy"] = (ent * x.mask).sum().item()
        sums["entropy_tokens"] = ntok
    return loss, sums


def add_sums(into: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """``into`` += ``sums``, key by key (keys may differ)."""
    for k, v in sums.items():
        into[k] = into.get(k, 0.0) + v
    return into
