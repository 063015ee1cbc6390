"""The loss of one micro-batch, and how a mini-batch is cut into micro-batches.

``micro_pass`` is where the maths of ``dapo.algo`` meets the model: log-probs of the responses under the
current policy, the clipped surrogate against the old log-probs (Clip-Higher, DAPO Eq. 10), an optional KL
term, and the aggregation with the mini-batch's global denominator (token-mean, DAPO Eq. 12).
"""
from __future__ import annotations

import bisect
from typing import Any

import torch

from dapo.algo import aggregate_loss, get_policy_loss, kl_penalty, mismatch_stats, rollout_is_weights, rollout_sequence_mask
from dapo.model import reference_policy
from dapo.ragged import Ragged
from dapo.trainer.policy import PackedBatch, SeqBatch, make_packed_batch, make_seq_batch, response_logprobs

_CHUNK_ROWS = 512


def micro_batches_of(idx: list[int], lengths: list[int], size: int, tokens: int = 0) -> list[list[int]]:
    """Micro-batches of ``idx`` (the token-mean gradient does not depend on how they are cut).

    ``tokens`` = 0: length-sorted runs of ``size`` rows (padded to their longest: little padding).
    ``tokens`` > 0: as many sequences as fit in ``tokens`` (``lengths[i]`` each, prompt + response), best-fit
    over the longest first (a near-minimal number of micro-batches, O(n log n)); a sequence longer than the
    budget goes alone. Deterministic: ties break by index.

    >>> micro_batches_of([0, 1, 2, 3], [5, 3, 4, 2], 2)
    [[3, 1], [2, 0]]
    >>> micro_batches_of([0, 1, 2, 3], [5, 3, 4, 2], 0, tokens=7)
    [[0, 3], [2, 1]]
    """
    if tokens <= 0:
        idx = sorted(idx, key=lambda i: lengths[i])
        return [idx[k : k + size] for k in range(0, len(idx), size)]
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (tokens left, bin), sorted: the tightest bin that fits, by bisection
    for i in sorted(idx, key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(rooms, (lengths[i], -1))
        if k == len(rooms):
            bins.append([])
            room, b = tokens, len(bins) - 1
        else:
            room, b = rooms.pop(k)
        bins[b].append(i)
        bisect.insort(rooms, (room - lengths[i], b))
    return bins


def rank_micro_batches(idx: list[int], lengths: list[int], size: int, dp: Any, tokens: int = 0) -> list[list[int] | None]:
    """This rank's micro-batches of ``idx`` (``micro_batches_of``); under FSDP padded with ``None`` (an empty
    pass) to the longest rank's count. Every rank computes every rank's count from the same data: no collective."""
    mbs: list[list[int] | None] = list(micro_batches_of(dp.share(idx), lengths, size, tokens))
    if dp.fsdp and dp.world > 1:
        most = max(len(micro_batches_of(dp.share(idx, r), lengths, size, tokens)) for r in range(dp.world))
        mbs += [None] * (most - len(mbs))
    return mbs


def micro_seqs(batch: Any, rows: list[int], pad_id: int, packed: bool = False) -> SeqBatch | PackedBatch:
    """Rows ``rows`` of ``batch`` laid out for the model: padded side by side, or packed into one row
    (``optim.micro_batch_tokens``). No rows: one padding token (an empty pass, so the same collectives run)."""
    prompts = [batch.prompts[i] for i in rows] or [[pad_id]]
    responses = [batch.responses[i] for i in rows] or [[pad_id]]
    return make_packed_batch(prompts, responses) if packed else make_seq_batch(prompts, responses, pad_id)


def micro_inputs(learner: Any, batch: Any, old_logp: Ragged, rows: list[int]) -> tuple[Any, ...]:
    """What one micro-batch sends to the device, laid out on the CPU: (seqs, old (b, T), advantages (b,),
    loss mask (b, T), importance weights (b, T) or None). ``rows`` empty: the empty pass, mask 0."""
    seqs = micro_seqs(batch, rows, learner.pad_id, packed=learner.cfg.optim.micro_batch_tokens > 0)
    T = seqs.n_resp
    if not rows:
        return seqs, torch.zeros(1, T), torch.zeros(1), torch.zeros(1, T), None
    idx = torch.tensor(rows, dtype=torch.long)
    mask = seqs.response_mask * batch.loss_mask[idx][:, None]  # (b, T)
    w = batch.is_weights.padded(idx, T) if batch.is_weights is not None else None
    return seqs, old_logp.padded(idx, T), batch.advantages[idx], mask, w


def micro_pass(learner: Any, batch: Any, old_logp: Ragged, rows: list[int], with_entropy: bool,
               num_tokens: float, num_seqs: float, sums: dict[str, float]) -> torch.Tensor:
    """The loss of one micro-batch (``rows``; empty: a padding pass, so the same collectives run) with its
    share of the mini-batch's normaliser; adds its token-weighted stats to ``sums``."""
    a, dev = learner.cfg.algo, learner.device
    seqs, old, adv, mask, w = (x.to(dev) if x is not None else None for x in micro_inputs(learner, batch, old_logp, rows))
    logp, ent = learner.policy(seqs, learner.cfg.rollout.temperature, with_entropy)  # (b, T)
    loss_tok, stats = get_policy_loss(a.policy_loss)(logp, old, adv, mask, a.eps_low, a.eps_high, a.clip_c, w)
    if a.kl_coef > 0:
        with torch.no_grad(), reference_policy(learner.model, learner.ref_model) as ref:  # LoRA: adapters off
            ref_logp, _ = response_logprobs(ref, seqs, learner.cfg.rollout.temperature,
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


def rollout_correction(batch: Any, old_logp: Ragged, cfg: Any) -> dict[str, float]:
    """The sampler/trainer mismatch, measured on every response in the loss, and corrected as
    ``algo.rollout_is`` says: token weights into ``batch.is_weights``, or responses whose geometric-mean
    ratio leaves the band dropped from ``batch.loss_mask`` (before the update counts its denominators).

    ``old_logp`` is the trainer's recompute where one ran and the sampler's own log-probs elsewhere (one
    process in float32, carried-over groups): there the metrics read 0 (and a ratio of 1), and nothing is
    corrected, because the recompute would give the same numbers to float rounding. Rows go in chunks of
    similar lengths (sorted), so the (chunk, T) blocks hold little padding.
    """
    a = cfg.algo
    lens = batch.responses.lengths  # (N,)
    rows = ((lens > 0) & (batch.loss_mask > 0)).nonzero().squeeze(1)
    rows = rows[torch.argsort(lens[rows], stable=True)]
    sums, ntok, ratio_max, n_seq, n_masked = {"logp_abs_diff": 0.0, "kl": 0.0}, 0.0, 0.0, 0, 0
    is_sums: dict[str, float] = {}
    weights = torch.ones_like(batch.behaviour_logp.values) if a.rollout_is == "token" else None
    for chunk in rows.split(_CHUNK_ROWS) if len(rows) else ():  # (an empty tensor splits into one empty chunk)
        n_rows = lens[chunk]  # (c,)
        T = int(n_rows.max())
        old = old_logp.padded(chunk, T)  # (c, T)
        sampler = batch.behaviour_logp.padded(chunk, T)  # (c, T)
        mask = (torch.arange(T)[None, :] < n_rows[:, None]).float()
        n = mask.sum().item()
        st = mismatch_stats(old, sampler, mask)
        sums["logp_abs_diff"] += st["logp_abs_diff"].item() * n
        sums["kl"] += st["kl"].item() * n
        ratio_max, ntok = max(ratio_max, st["ratio_max"].item()), ntok + n
        if a.rollout_is == "token":
            w, wst = rollout_is_weights(old, sampler, mask, a.rollout_is_cap)
            weights[batch.responses.positions(chunk)] = w[mask > 0]  # row by row, its tokens
            for key, v in wst.items():
                is_sums[key] = is_sums.get(key, 0.0) + v.item() * n
        elif a.rollout_is == "sequence":
            keep, _ = rollout_sequence_mask(old, sampler, mask, a.rollout_mask_low, a.rollout_mask_high)
            dropped = chunk[keep == 0]
            batch.loss_mask[dropped] = 0.0
            n_masked += len(dropped)
        n_seq += len(chunk)
    if weights is not None:
        batch.is_weights = batch.responses.like(weights)
    out = {f"mismatch/{k}": v / max(ntok, 1.0) for k, v in sums.items()}
    out.update({f"mismatch/{k}": v / max(ntok, 1.0) for k, v in is_sums.items()})
    out["mismatch/ratio_max"] = ratio_max if ntok else 1.0
    out["mismatch/masked_frac"] = n_masked / max(n_seq, 1)
    return out
