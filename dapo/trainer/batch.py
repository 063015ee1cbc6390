"""From the step's scored groups to what the update reads: advantages, the overlong filter, and the
sampler/trainer mismatch correction as per-token weights (DAPO Eq. 9, §3.4; ``algo.rollout_is``)."""
from __future__ import annotations

import torch

from dapo.algo import group_advantages, mismatch_stats, rollout_is_weights, rollout_sequence_mask
from dapo.config import AlgoConfig, Config
from dapo.items import Group
from dapo.learner import TrainBatch
from dapo.ragged import Ragged
from dapo.rollout.base import Completion

_CHUNK_ROWS = 512


def flatten_groups(groups: list[Group], cfg: Config, step: int) -> TrainBatch:
    """Advantages (group-normalised rewards, DAPO Eq. 9) and the overlong filter (§3.4) over the step's groups;
    a response's tokens that the model did not sample (``Completion.mask``: observations) stay out of the loss."""
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)  # (P*G,)
    adv = group_advantages(rewards, cfg.rollout.group_size, norm_std=cfg.algo.norm_adv_std,
                           estimator=cfg.algo.adv_estimator)
    comps: list[Completion] = [c for g in groups for c in g.completions]
    loss_mask = torch.ones(len(comps))
    if cfg.algo.overlong_filter:
        loss_mask = torch.tensor([0.0 if c.finish_reason == "length" else 1.0 for c in comps])
    responses = Ragged.of([c.token_ids for c in comps], torch.long)
    masks = [c.mask for c in comps]
    token_mask = None
    if any(m is not None for m in masks):
        token_mask = responses.like(torch.cat([torch.ones(len(c.token_ids)) if m is None else m.float()
                                               for c, m in zip(comps, masks)]))
    return TrainBatch(
        prompts=[g.item.prompt_ids for g in groups for _ in g.completions],
        responses=responses,
        behaviour_logp=responses.like(torch.cat([c.logprobs for c in comps]) if comps else torch.zeros(0)),
        fresh=[g.step == step for g in groups for _ in g.completions],
        advantages=adv,
        loss_mask=loss_mask,
        token_mask=token_mask,
    )


def rollout_correction(batch: TrainBatch, old_logp: Ragged, a: AlgoConfig) -> tuple[Ragged | None, dict[str, float]]:
    """The sampler/trainer mismatch, measured on every token in the loss, and the correction ``algo.rollout_is``
    asks for, as per-token loss weights: truncated importance weights (``token``), or 1 and 0 for responses whose
    geometric-mean ratio leaves the band (``sequence``); None for ``none``. Returns (weights, metrics).

    ``old_logp`` is the trainer's recompute where one ran and the sampler's own log-probs elsewhere (one
    process in float32, carried-over groups): there the metrics read 0 (and a ratio of 1), and nothing is
    corrected, because the recompute would give the same numbers to float rounding. Rows go in chunks of
    similar lengths (sorted), so the (chunk, T) blocks hold little padding.
    """
    lens = batch.responses.lengths  # (N,)
    rows = batch.trainable().nonzero().squeeze(1)
    rows = rows[torch.argsort(lens[rows], stable=True)]
    keep = batch.token_keep  # observation tokens (multi-turn) are neither measured nor weighted
    sums, ntok, ratio_max, n_seq, n_masked = {"logp_abs_diff": 0.0, "kl": 0.0}, 0.0, 0.0, 0, 0
    is_sums: dict[str, float] = {}
    weights = None if a.rollout_is == "none" else torch.ones_like(batch.behaviour_logp.values)
    for chunk in rows.split(_CHUNK_ROWS) if len(rows) else ():  # (an empty tensor splits into one empty chunk)
        n_rows = lens[chunk]  # (c,)
        T = int(n_rows.max())
        old = old_logp.padded(chunk, T)  # (c, T)
        sampler = batch.behaviour_logp.padded(chunk, T)  # (c, T)
        inside = torch.arange(T)[None, :] < n_rows[:, None]  # (c, T)
        mask = inside.float() if keep is None else keep.padded(chunk, T) * inside
        n = mask.sum().item()
        st = mismatch_stats(old, sampler, mask)
        sums["logp_abs_diff"] += st["logp_abs_diff"].item() * n
        sums["kl"] += st["kl"].item() * n
        ratio_max, ntok = max(ratio_max, st["ratio_max"].item()), ntok + n
        at = batch.responses.positions(chunk)  # row by row, their tokens
        if a.rollout_is == "token":
            w, wst = rollout_is_weights(old, sampler, mask, a.rollout_is_cap)
            weights[at] = torch.where(mask > 0, w, 1.0)[inside]
            for key, v in wst.items():
                is_sums[key] = is_sums.get(key, 0.0) + v.item() * n
        elif a.rollout_is == "sequence":
            kept, _ = rollout_sequence_mask(old, sampler, mask, a.rollout_mask_low, a.rollout_mask_high)
            weights[at] = kept[:, None].expand(-1, T)[inside]
            n_masked += int((kept == 0).sum())
        n_seq += len(chunk)
    out = {f"mismatch/{k}": v / max(ntok, 1.0) for k, v in sums.items()}
    out.update({f"mismatch/{k}": v / max(ntok, 1.0) for k, v in is_sums.items()})
    out["mismatch/ratio_max"] = ratio_max if ntok else 1.0
    out["mismatch/masked_frac"] = n_masked / max(n_seq, 1)
    return None if weights is None else batch.responses.like(weights), out
