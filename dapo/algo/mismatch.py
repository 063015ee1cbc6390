"""Sampler-trainer mismatch: measured, and corrected by importance weights or sequence masks.

The rollout engine (vLLM in bf16, other kernels, another batch shape) and the trainer (fp32 master
weights, autocast) compute different probabilities for the same tokens under the same weights. PPO's
ratio is taken against the trainer's recompute ``old_logp``, but the tokens were drawn from the
sampler, so the update is off-policy by pi_old / pi_sampler. Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training" (https://fengyao.notion.site/off-policy-rl),
correct it with a truncated per-token importance weight (TIS); verl's rollout correction
(``verl/trainer/ppo/rollout_corr_helper.py``) and SkyRL add sequence-level rejection by the
geometric-mean ratio, which drops whole responses the trainer would not have sampled.

Inputs everywhere: ``old_logp`` (B, T) the trainer's recompute of the sampled tokens with the old
weights, ``sampler_logp`` (B, T) the engine's log-probs of the same tokens, ``mask`` (B, T) 1 on
valid tokens. Every function is elementwise per token or per response: a micro-batch of whole
responses gives the same values as the whole batch.

Stats convention (the same as ``policy_loss``): each stat is a MEAN over this call's valid tokens,
except keys ending in ``_max`` (a maximum) and those documented as means over responses. Means
combine exactly across micro-batches and ranks as sum(mean * count) / sum(count), with count =
``mask.sum()`` (the trainer's ``ntok``); maxima combine by max. An empty mask gives 0 for every stat,
which is also the neutral element of the max (ratios are > 0).
"""
from __future__ import annotations

import torch

from dapo.algo.losses import _MAX_LOG_RATIO, _masked_mean, kl_penalty

# Published defaults, cited in the docstrings below.
TIS_CAP = 2.0  # verl RolloutCorrectionConfig.rollout_is_threshold / decoupled_token_is(threshold=2.0)
GEO_MASK_LOW, GEO_MASK_HIGH = 0.999, 1.001  # verl decoupled_geo_rs: "0.999_1.001" (+-0.1 %)


def _check(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    assert old_logp.shape == sampler_logp.shape == mask.shape and old_logp.dim() == 2, (
        f"old_logp {tuple(old_logp.shape)}, sampler_logp {tuple(sampler_logp.shape)}, mask {tuple(mask.shape)} "
        "must be equal (B, T)"
    )
    return mask.to(old_logp.dtype)


def _log_ratio(old_logp: torch.Tensor, sampler_logp: torch.Tensor) -> torch.Tensor:
    """log(pi_old / pi_sampler), detached and clamped so exp() stays finite (exp(20) ~ 5e8)."""
    return (old_logp.detach() - sampler_logp.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (B, T)


@torch.no_grad()
def mismatch_stats(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the sampler's log-probs are from the trainer's, for the same tokens and weights.

    Returns detached scalars: ``logp_abs_diff`` mean |old - sampler| and ``kl`` the k3 estimate of
    KL(sampler || trainer) from the sampler's own samples (pi_t/pi_s - 1 - log(pi_t/pi_s), >= 0,
    unbiased), both MEANS over this call's valid tokens (combine weighted by ``mask.sum()``), and
    ``ratio_max`` the largest pi_old / pi_sampler over valid tokens (combine by max; the ratio that
    TIS truncates). When the two engines agree exactly they are 0, 0 and 1.

    >>> old = torch.tensor([[0.0, -1.0, -5.0]]); smp = torch.tensor([[0.0, -1.5, 0.0]])
    >>> s = mismatch_stats(old, smp, torch.tensor([[1.0, 1.0, 0.0]]))
    >>> round(s["logp_abs_diff"].item(), 4), round(s["ratio_max"].item(), 4)
    (0.25, 1.6487)
    """
    m = _check(old_logp, sampler_logp, mask)
    lr = _log_ratio(old_logp, sampler_logp)  # (B, T)
    kl = kl_penalty(sampler_logp.detach(), old_logp.detach(), kind="k3")  # (B, T) KL(sampler || trainer)
    valid = m > 0
    ratio_max = torch.exp(lr).masked_fill(~valid, 0.0).amax() if valid.any() else lr.new_zeros(())
    return {
        "logp_abs_diff": _masked_mean(lr.abs(), m),
        "kl": _masked_mean(kl, m),
        "ratio_max": ratio_max,
    }


@torch.no_grad()
def rollout_is_weights(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float = TIS_CAP
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level truncated importance sampling (TIS): w = min(pi_old / pi_sampler, cap).

    Returns ``w`` (B, T) detached, 0 on masked positions, for the policy loss to multiply each token's
    loss by (``policy_loss(..., is_weights=w)``), and stats, means over valid tokens:
    ``is_weight_mean`` (after the cap) and ``is_clipfrac`` (tokens whose ratio exceeded the cap).

    Truncating only from above keeps the bias small where the sampler under-weights a token and bounds
    the variance where it over-weights. Default ``cap=2``: verl's ``rollout_is_threshold`` default
    (``RolloutCorrectionConfig.decoupled_token_is(threshold=2.0)``), the C = 2 of Yao et al.'s 32B
    example, ms-swift's ``rollout_importance_sampling_threshold`` default.

    >>> w, st = rollout_is_weights(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]]),
    ...                            torch.tensor([[1.0, 1.0, 0.0]]))
    >>> w
    tensor([[0.6065, 2.0000, 0.0000]])
    >>> st["is_clipfrac"].item()
    0.5
    """
    m = _check(old_logp, sampler_logp, mask)
    if not cap > 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    ratio = torch.exp(_log_ratio(old_logp, sampler_logp))  # (B, T)
    w = ratio.clamp(max=cap) * m
    stats = {"is_weight_mean": _masked_mean(w, m), "is_clipfrac": _masked_mean((ratio > cap).to(m.dtype), m)}
    return w, stats


@torch.no_grad()
def rollout_sequence_mask(
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    low: float = GEO_MASK_LOW,
    high: float = GEO_MASK_HIGH,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Drop whole responses whose geometric-mean ratio exp(mean_t log(pi_old / pi_sampler)) leaves [low, high].

    Returns ``keep`` (B,) float 1/0 and stats, MEANS over this call's responses that have >= 1 valid
    token (combine weighted by that count): ``masked_frac`` (responses dropped) and ``geo_ratio_mean``.
    A response without valid tokens is kept (it carries no loss either way) and not counted.

    The length-normalised ratio does not drift with response length as the product of token ratios does,
    so one band fits short and long responses. Defaults [0.999, 1.001]: verl's geometric rejection
    preset (``RolloutCorrectionConfig.decoupled_geo_rs``, "0.999_1.001", +-0.1 %); it is tight on purpose
    (a mean of log-ratios is small even when single tokens disagree), so bf16 samplers may need it wider.
    Multiply ``keep`` into the response mask before the step's token/sequence counts are taken, so the
    loss denominators leave the dropped responses out.

    >>> old = torch.tensor([[0.1, -0.1], [0.3, 0.3], [0.0, 9.0]]); m = torch.tensor([[1., 1.], [1., 1.], [1., 0.]])
    >>> keep, st = rollout_sequence_mask(old, torch.zeros(3, 2), m, low=0.8, high=1.2)
    >>> keep, round(st["masked_frac"].item(), 4)
    (tensor([1., 0., 1.]), 0.3333)
    """
    m = _check(old_logp, sampler_logp, mask)
    if not 0 < low <= 1 <= high:
        raise ValueError(f"need 0 < low <= 1 <= high for the geometric sequence mask, got low={low}, high={high}")
    n = m.sum(dim=1)  # (B,)
    has = n > 0
    mean_lr = (_log_ratio(old_logp, sampler_logp) * m).sum(dim=1) / n.clamp(min=1)  # (B,)
    geo = torch.exp(mean_lr)  # (B,)
    inside = (geo >= low) & (geo <= high)
    keep = (inside | ~has).to(m.dtype)  # (B,)
    hf = has.to(m.dtype)
    stats = {
        "masked_frac": ((1.0 - keep) * hf).sum() / hf.sum().clamp(min=1),
        "geo_ratio_mean": (geo * hf).sum() / hf.sum().clamp(min=1),
    }
    return keep, stats
