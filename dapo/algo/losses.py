"""Policy-gradient losses and the one place that owns loss normalisation.

Clip-Higher (DAPO §3.1, Eq. 10), dual clip (arXiv 1912.09729), GSPO's sequence-level ratio
(arXiv 2507.18071), CISPO's clipped importance weight (MiniMax-M1, arXiv 2506.13585), KL estimators
(Schulman, "Approximating KL divergence", 2020), loss aggregation (DAPO §3.3; Dr. GRPO, arXiv 2503.20783).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

# log-ratios beyond this are clamped before exp(): exp(20) ~ 5e8 is already far outside any clip range
_MAX_LOG_RATIO = 20.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


class PolicyLoss(Protocol):
    """The signature every policy loss has: (B, T) log-probs, old log-probs and mask, (B,) or (B, T) advantages,
    the clip range, the dual-clip constant (``ppo`` only) and per-token importance weights; returns the (B, T)
    per-token loss, zero where ``mask`` is 0, and detached stats, each a mean over this call's valid tokens."""

    def __call__(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 eps_low: float, eps_high: float, clip_c: float | None = None,
                 is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


POLICY_LOSSES: dict[str, PolicyLoss] = {}
"""The registered policy losses by name (``algo.policy_loss``)."""


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Register a ``PolicyLoss`` under ``name`` where it is defined."""

    def register(fn: PolicyLoss) -> PolicyLoss:
        POLICY_LOSSES[name] = fn
        return fn

    return register


def _policy_inputs(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    is_weights: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks every policy loss shares (shapes, clip ranges >= 0); returns advantages as (B, 1) or (B, T)
    and a float mask."""
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    assert logp.shape == old_logp.shape == mask.shape and logp.dim() == 2, (
        f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)} must be equal (B, T)"
    )
    assert advantages.shape in (logp.shape[:1], logp.shape), (
        f"advantages {tuple(advantages.shape)} must be (B,) or (B, T) for logp {tuple(logp.shape)}"
    )
    assert is_weights is None or is_weights.shape == logp.shape, (
        f"is_weights {tuple(is_weights.shape)} must be (B, T) like logp {tuple(logp.shape)}"
    )
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    return adv, mask.to(logp.dtype)


def _no_dual_clip(name: str, clip_c: float | None) -> None:
    if clip_c is not None:
        raise ValueError(
            f"dual clip (clip_c={clip_c}) is an option of the 'ppo' policy loss only; {name} takes clip_c=None"
        )


def _policy_stats(
    ratio: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    dual: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The stats every policy loss returns, each a mean over the valid tokens of this call (see policy_loss)."""
    with torch.no_grad():
        return {
            "clipfrac_low": _masked_mean(low.float(), mask),
            "clipfrac_high": _masked_mean(high.float(), mask),
            "clipfrac_dual": _masked_mean(dual.float(), mask),
            "approx_kl": _masked_mean(kl_penalty(old_logp.detach(), logp.detach(), kind="k3"), mask),
            "ratio_mean": _masked_mean(ratio.detach(), mask),
        }


@register_policy_loss("ppo")
def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate loss with the decoupled clip range [1 - eps_low, 1 + eps_high].

    logp, old_logp, mask: (B, T); advantages: (B,) per response or (B, T) per token.
    Returns ``loss_tok`` (B, T), zero where ``mask`` is 0, and detached stats, each a mean over
    the valid tokens of this call: ``clipfrac_low`` (ratio < 1 - eps_low with A < 0, the lower clip
    is active), ``clipfrac_high`` (ratio > 1 + eps_high with A > 0), ``clipfrac_dual`` (A < 0 and
    ratio > clip_c), ``approx_kl`` (k3 estimate of KL(old || new)) and ``ratio_mean``.

    Clipped tokens get exactly zero gradient: the max picks the constant clipped branch.
    ``clip_c`` (> 1) bounds the loss of negative-advantage tokens at -A * clip_c (dual clip).
    ``is_weights`` (B, T), detached, multiplies each token's loss: the truncated importance weight
    pi_old / pi_sampler of ``dapo.algo.mismatch.rollout_is_weights`` (None: all 1).
    """
    adv, mask = _policy_inputs(logp, old_logp, advantages, mask, is_weights, eps_low, eps_high)
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"dual-clip constant clip_c must be > 1, got {clip_c}")

    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # (B, T)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)  # pessimistic bound, PPO Eq. 7
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if clip_c is not None:
        dual_bound = -adv * clip_c  # only binds where A < 0
        dual = (adv < 0) & (loss > dual_bound)
        loss = torch.where(dual, dual_bound.expand_as(loss), loss)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    loss = loss * mask

    r, a = ratio.detach(), adv.expand_as(ratio)
    low, high = (r < 1.0 - eps_low) & (a < 0), (r > 1.0 + eps_high) & (a > 0)
    stats = _policy_stats(r, low, high, dual, logp, old_logp, mask)
    return loss, stats


@register_policy_loss("gspo")
def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): the clipped surrogate on a SEQUENCE-level ratio.

    s_i = exp(mean over the response's valid tokens of (logp - old_logp)), the length-normalised
    likelihood ratio (paper §4.1), clipped to [1 - eps_low, 1 + eps_high]; response i's objective is
    min(s_i A_i, clip(s_i) A_i) (§4.1). Same arguments, shapes and stats keys as ``policy_loss``.

    Written in the GSPO-token form (§4.3): every valid token carries the value s_i, with gradient
    sg[s_i] * grad log pi_t, i.e. s_it = sg[s_i] * pi_t / sg[pi_t]. Any aggregation that weighs the
    tokens of one response equally then has the gradient of the sequence form (s_i depending on all
    of them); with ``aggregate_loss(mode="seq-mean-token-mean")`` the value is exactly the paper's
    objective, -(1/G) sum_i min(s_i A_i, clip(s_i) A_i). (B, T) advantages give GSPO-token itself.
    A response's ratio needs all its tokens: micro-batches must split the batch by responses, never
    along T (the trainer's micro-batches are lists of responses).

    Defaults eps_low = 3e-4, eps_high = 4e-4: the paper's left/right clipping ranges (v2, §5.1); they are
    tiny because s_i averages the per-token log-ratios. The clip stats count tokens whose response is
    clipped (token-weighted, as in ``policy_loss``); ``ratio_mean`` is the token-weighted mean of s_i.
    No dual clip (``clip_c`` must be None). ``is_weights`` multiplies each token's loss, as in policy_loss.
    """
    adv, mask = _policy_inputs(logp, old_logp, advantages, mask, is_weights, eps_low, eps_high)
    _no_dual_clip("gspo", clip_c)
    n = mask.sum(dim=1, keepdim=True)  # (B, 1) valid tokens per response
    seq_log_ratio = ((logp - old_logp) * mask).sum(dim=1, keepdim=True) / n.clamp(min=1)  # (B, 1)
    seq_log_ratio = seq_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # value log s_i at every token, gradient d logp_t only: the GSPO-token form
    s = torch.exp(seq_log_ratio.detach() + logp - logp.detach())  # (B, T)
    loss = torch.maximum(-adv * s, -adv * s.clamp(1.0 - eps_low, 1.0 + eps_high))
    if is_weights is not None:
        loss = loss * is_weights.detach()
    loss = loss * mask

    r, a = s.detach(), adv.expand_as(s)
    low, high = (r < 1.0 - eps_low) & (a < 0), (r > 1.0 + eps_high) & (a > 0)
    stats = _policy_stats(r, low, high, torch.zeros_like(low), logp, old_logp, mask)
    return loss, stats


@register_policy_loss("cispo")
def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 1.0,
    eps_high: float = 0.28,
    clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, §3.1): clip the importance WEIGHT, keep every token's gradient.

    loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A * logp_t, with r_t = exp(logp_t - old_logp_t).
    d loss_t / d logp_t = -clip(r_t) * A for every valid token, also outside the clip range: where
    PPO's min drops the rare "fork" tokens (Wait, However) after the first update, CISPO only bounds
    their weight. The paper aggregates with the token mean (``aggregate_loss`` "token-mean"). The loss
    VALUE is -w A logp, not comparable with the PPO surrogate's; only its gradient matters.

    Defaults: MiniMax-M1 set no lower bound (eps_low "a large value") and tuned only eps_high, whose
    value the paper does not give; eps_low >= 1 here means no lower bound (the ratio is > 0). eps_high
    0.28 is Trinity-RFT's CISPO default and this project's Clip-Higher value; verl's CISPO example uses
    clip_ratio_low=10, clip_ratio_high=0.2, Tinker's CISPO loss caps the weight at 4 (eps_high = 3).
    Stats as ``policy_loss``, but the weight is clipped whatever the sign of A: ``clipfrac_low`` counts
    r < 1 - eps_low, ``clipfrac_high`` r > 1 + eps_high. No dual clip (``clip_c`` must be None).
    ``is_weights`` multiplies each token's loss, as in policy_loss.
    """
    adv, mask = _policy_inputs(logp, old_logp, advantages, mask, is_weights, eps_low, eps_high)
    _no_dual_clip("cispo", clip_c)
    with torch.no_grad():
        r = torch.exp((logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # (B, T)
        w = r.clamp(1.0 - eps_low, 1.0 + eps_high)  # a lower bound <= 0 never binds
    loss = -adv * w * logp
    if is_weights is not None:
        loss = loss * is_weights.detach()
    loss = loss * mask
    no_dual = torch.zeros_like(r, dtype=torch.bool)
    return loss, _policy_stats(r, r < 1.0 - eps_low, r > 1.0 + eps_high, no_dual, logp, old_logp, mask)


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered as ``name`` (``POLICY_LOSSES``); an unknown name lists the valid ones.

    "ppo" is the token-level clipped surrogate of DAPO and GRPO (they differ in clip range and
    aggregation, not in the loss), "gspo" the sequence-ratio surrogate, "cispo" the clipped-weight
    policy gradient.

    >>> get_policy_loss("gspo") is gspo_loss
    True
    """
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid: {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate_loss(
    loss_tok: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to the scalar whose gradient the optimiser step uses.

    Modes:
      token-mean               sum over all valid tokens / num_tokens (DAPO Eq. 12: long responses
                               weigh by their length)
      seq-mean-token-mean      each response's token mean, summed / num_seqs (GRPO)
      seq-mean-token-sum       each response's token sum, summed / num_seqs
      seq-mean-token-sum-norm  each response's token sum / max_len, summed / num_seqs (Dr. GRPO)

    Denominators are explicit: when one optimiser step is split into micro-batches (or ranks), pass
    the step's global ``num_tokens`` (valid tokens) or ``num_seqs`` (responses with >= 1 valid token)
    and the micro-batch losses sum to exactly the whole-batch loss. Left as None they default to this
    call's own counts. ``max_len`` (default T) is Dr. GRPO's constant length normaliser.
    """
    assert loss_tok.shape == mask.shape and loss_tok.dim() == 2, (
        f"loss_tok {tuple(loss_tok.shape)} and mask {tuple(mask.shape)} must be equal (B, T)"
    )
    mask = mask.to(loss_tok.dtype)
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return (loss_tok * mask).sum() / max(float(denom), 1.0)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")
    tok_per_seq = mask.sum(dim=1)  # (B,)
    seq_sum = (loss_tok * mask).sum(dim=1)  # (B,)
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / tok_per_seq.clamp(min=1)
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sum
    else:
        per_seq = seq_sum / float(max_len if max_len is not None else loss_tok.shape[1])
    denom = (tok_per_seq > 0).sum() if num_seqs is None else num_seqs
    return per_seq.sum() / max(float(denom), 1.0)


KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, shape as the inputs.

    k1 = log(pi/pi_ref) (unbiased, high variance, can be negative); k2 = 0.5 * log(pi/pi_ref)^2;
    k3 = pi_ref/pi - 1 - log(pi_ref/pi) (unbiased, always >= 0; GRPO's choice).
    """
    assert logp.shape == ref_logp.shape, f"{tuple(logp.shape)} vs {tuple(ref_logp.shape)}"
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        neg = (-log_ratio).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(neg) - 1.0 - neg
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_KINDS)}")
