"""The loss of one micro-batch, and how a mini-batch is cut into micro-batches.

``micro_pass`` is where the maths of ``dapo.algo`` meets the model: log-probs of the responses under the
current policy, the clipped surrogate against the old log-probs (Clip-Higher, DAPO Eq. 10), an optional KL
term, and the aggregation with the mini-batch's global denominator (token-mean, DAPO Eq. 12).
"""
from __future__ import annotations

from typing import Any

import torch

from dapo.algo import aggregate_loss, get_policy_loss, kl_penalty, mismatch_stats, rollout_is_weights, rollout_sequence_mask
from dapo.model import reference_policy
from dapo.trainer.policy import make_seq_batch, response_logprobs

_CHUNK_ROWS = 512


def pad_logps(rows: list[list[float]], T: int) -> torch.Tensor:
    """Per-response log-prob lists as a (B, T) float32 tensor, zero-padded on the right."""
    out = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r[:T])
    return out


def micro_batches_of(idx: list[int], lengths: list[int], size: int) -> list[list[int]]:
    """Length-sorted micro-batches: little padding, and the token-mean gradient does not depend on order."""
    idx = sorted(idx, key=lambda i: lengths[i])
    return [idx[k : k + size] for k in range(0, len(idx), size)]


def rank_micro_batches(idx: list[int], lengths: list[int], size: int, dp: Any) -> list[list[int] | None]:
    """This rank's micro-batches of ``idx``; under FSDP padded with ``None`` (an empty pass) to the
    longest rank's count. Every rank computes every rank's count from the same data: no collective."""
    mbs: list[list[int] | None] = list(micro_batches_of(dp.share(idx), lengths, size))
    if dp.fsdp and dp.world > 1:
        most = max(len(micro_batches_of(dp.share(idx, r), lengths, size)) for r in range(dp.world))
        mbs += [None] * (most - len(mbs))
    return mbs


def micro_pass(learner: Any, batch: Any, old_logp: list[list[float]], rows: list[int], with_entropy: bool,
               num_tokens: float, num_seqs: float, sums: dict[str, float]) -> torch.Tensor:
    """The loss of one micro-batch (``rows``; empty: a padding pass, so the same collectives run) with its
    share of the mini-batch's normaliser; adds its token-weighted stats to ``sums``."""
    a, pad = learner.cfg.algo, learner.pad_id
    if rows:
        seq_batch = make_seq_batch([batch.prompts[i] for i in rows], [batch.responses[i] for i in rows], pad)
        in_loss = batch.loss_mask[rows]
    else:  # an empty pass: one padding token with mask 0
        seq_batch, in_loss = make_seq_batch([[pad]], [[pad]], pad), torch.zeros(1)
    seq_batch = seq_batch.to(learner.device)
    T = seq_batch.n_resp
    logp, ent = learner.policy(seq_batch, learner.cfg.rollout.temperature, with_entropy)  # (b, T)
    old = pad_logps([old_logp[i] for i in rows] or [[0.0]], T).to(learner.device)
    adv = (batch.advantages[rows] if rows else torch.zeros(1)).to(learner.device)  # (b,)
    mask = seq_batch.response_mask * in_loss.to(learner.device)[:, None]  # (b, T)
    w = pad_logps([batch.is_weights[i] for i in rows], T).to(learner.device) if batch.is_weights and rows else None
    loss_tok, stats = get_policy_loss(a.policy_loss)(logp, old, adv, mask, a.eps_low, a.eps_high, a.clip_c, w)
    if a.kl_coef > 0:
        with torch.no_grad(), reference_policy(learner.model, learner.ref_model) as ref:  # LoRA: adapters off
            ref_logp, _ = response_logprobs(ref, seq_batch, learner.cfg.rollout.temperature,
                                            compute_dtype=learner.compute_dtype)
        kl = kl_penalty(logp, ref_logp, a.kl_kind)
        loss_tok = loss_tok + a.kl_coef * kl * mask
        stats["kl_ref"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    loss = aggregate_loss(loss_tok, mask, a.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                          max_len=learner.cfg.rollout.max_new_tokens)
    ntok = mask.sum().item()
    sums["tokens"] = sums.get("tokens", 0.0) + ntok
    for key, v in stats.items():
        sums[key] = sums.get(key, 0.0) + v.item() * ntok
    if ent is not None:
        sums["entropy"] = sums.get("entropy", 0.0) + (ent * mask).sum().item()
        sums["entropy_tokens"] = sums.get("entropy_tokens", 0.0) + ntok
    return loss


def rollout_correction(batch: Any, old_logp: list[list[float]], cfg: Any) -> dict[str, float]:
    """The sampler/trainer mismatch, measured on every response in the loss, and corrected as
    ``algo.rollout_is`` says: token weights into ``batch.is_weights``, or responses whose geometric-mean
    ratio leaves the band dropped from ``batch.loss_mask`` (before the update counts its denominators).

    ``old_logp`` is the trainer's recompute where one ran and the sampler's own log-probs elsewhere (one
    process in float32, carried-over groups): there the metrics read 0 (and a ratio of 1), and nothing is
    corrected, because the recompute would give the same numbers to float rounding.
    """
    a = cfg.algo
    rows = [i for i, r in enumerate(batch.responses) if r and batch.loss_mask[i] > 0]
    sums, ntok, ratio_max, n_seq, n_masked = {"logp_abs_diff": 0.0, "kl": 0.0}, 0.0, 0.0, 0, 0
    is_sums: dict[str, float] = {}
    weights: list[list[float]] = [[1.0] * len(r) for r in batch.responses] if a.rollout_is == "token" else []
    for k in range(0, len(rows), _CHUNK_ROWS):
        chunk = rows[k : k + _CHUNK_ROWS]
        T = max(len(batch.responses[i]) for i in chunk)
        old = pad_logps([old_logp[i] for i in chunk], T)  # (c, T)
        sampler = pad_logps([batch.behaviour_logp[i] for i in chunk], T)  # (c, T)
        mask = (torch.arange(T)[None, :] < torch.tensor([len(batch.responses[i]) for i in chunk])[:, None]).float()
        n = mask.sum().item()
        st = mismatch_stats(old, sampler, mask)
        sums["logp_abs_diff"] += st["logp_abs_diff"].item() * n
        sums["kl"] += st["kl"].item() * n
        ratio_max, ntok = max(ratio_max, st["ratio_max"].item()), ntok + n
        if a.rollout_is == "token":
            w, wst = rollout_is_weights(old, sampler, mask, a.rollout_is_cap)
            for row, i in enumerate(chunk):
                weights[i] = w[row, : len(batch.responses[i])].tolist()
            for key, v in wst.items():
                is_sums[key] = is_sums.get(key, 0.0) + v.item() * n
        elif a.rollout_is == "sequence":
            keep, _ = rollout_sequence_mask(old, sampler, mask, a.rollout_mask_low, a.rollout_mask_high)
            for row, i in enumerate(chunk):
                if keep[row] == 0:
                    batch.loss_mask[i] = 0.0
                    n_masked += 1
        n_seq += len(chunk)
    if weights:
        batch.is_weights = weights
    out = {f"mismatch/{k}": v / max(ntok, 1.0) for k, v in sums.items()}
    out.update({f"mismatch/{k}": v / max(ntok, 1.0) for k, v in is_sums.items()})
    out["mismatch/ratio_max"] = ratio_max if ntok else 1.0
    out["mismatch/masked_frac"] = n_masked / max(n_seq, 1)
    return out
