"""Policy-gradient losses and the one place that owns loss normalisation.

Clip-Higher (DAPO §3.1, Eq. 10), dual clip (arXiv 1912.09729), KL estimators (Schulman,
"Approximating KL divergence", 2020), loss aggregation (DAPO §3.3; Dr. GRPO, arXiv 2503.20783).
"""
from __future__ import annotations

import torch

# log-ratios beyond this are clamped before exp(): exp(20) ~ 5e8 is already far outside any clip range
_MAX_LOG_RATIO = 20.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate loss with the decoupled clip range [1 - eps_low, 1 + eps_high].

    logp, old_logp, mask: (B, T); advantages: (B,) per response or (B, T) per token.
    Returns ``loss_tok`` (B, T), zero where ``mask`` is 0, and detached stats, each a mean over
    the valid tokens of this call: ``clipfrac_low`` (ratio < 1 - eps_low with A < 0, the lower clip
    is active), ``clipfrac_high`` (ratio > 1 + eps_high with A > 0), ``clipfrac_dual`` (A < 0 and
    ratio > clip_c), ``approx_kl`` (k3 estimate of KL(old || new)) and ``ratio_mean``.

    Clipped tokens get exactly zero gradient: the max picks the constant clipped branch.
    ``clip_c`` (> 1) bounds the loss of negative-advantage tokens at -A * clip_c (dual clip).
    """
    assert logp.shape == old_logp.shape == mask.shape and logp.dim() == 2, (
        f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)} must be equal (B, T)"
    )
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"dual-clip constant clip_c must be > 1, got {clip_c}")
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    mask = mask.to(logp.dtype)

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
    loss = loss * mask

    with torch.no_grad():
        r = ratio.detach()
        a = adv.expand_as(r)
        stats = {
            "clipfrac_low": _masked_mean(((r < 1.0 - eps_low) & (a < 0)).float(), mask),
            "clipfrac_high": _masked_mean(((r > 1.0 + eps_high) & (a > 0)).float(), mask),
            "clipfrac_dual": _masked_mean(dual.float(), mask),
            "approx_kl": _masked_mean(kl_penalty(old_logp.detach(), logp.detach(), kind="k3"), mask),
            "ratio_mean": _masked_mean(r, mask),
        }
    return loss, stats


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
