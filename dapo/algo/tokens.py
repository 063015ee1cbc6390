"""Per-token quantities from logits, computed in chunks.

A (B, T, V) float32 tensor for 8 x 4096 tokens and a 150k vocabulary is 20 GB; both functions walk the
flattened tokens ``chunk`` rows at a time and upcast only that slice, so peak extra memory is
chunk x V floats whatever B x T is.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 1024


def _rows(logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    assert logits.dim() >= 2, f"logits must be (..., V), got {tuple(logits.shape)}"
    return logits.reshape(-1, logits.shape[-1]), tuple(logits.shape[:-1])


def token_entropy(logits: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (B, T, V) -> (B, T) float32.

    H = logsumexp(z) - sum softmax(z) * z on max-shifted logits, so large logits lose no precision.
    Differentiable; callers that only log it wrap the call in ``torch.no_grad()``.
    """
    flat, lead = _rows(logits)
    out = []
    for start in range(0, flat.shape[0], chunk):
        z = flat[start : start + chunk].float()  # (c, V)
        z = z - z.amax(dim=-1, keepdim=True).detach()  # shift first: lse and E[z] stay small, no cancellation
        out.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
    return torch.cat(out).view(lead) if out else flat.new_zeros(lead, dtype=torch.float32)


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """log softmax(logits)[label] per position: logits (B, T, V), labels (B, T) -> (B, T) float32."""
    flat, lead = _rows(logits)
    assert tuple(labels.shape) == lead, f"labels {tuple(labels.shape)} do not match logits {lead}"
    lab = labels.reshape(-1)
    out = []
    for start in range(0, flat.shape[0], chunk):
        z = flat[start : start + chunk].float()  # (c, V)
        picked = z.gather(-1, lab[start : start + chunk, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(z, dim=-1))
    return torch.cat(out).view(lead) if out else flat.new_zeros(lead, dtype=torch.float32)
