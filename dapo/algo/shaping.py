"""Reward shaping for long responses (DAPO §3.4)."""
from __future__ import annotations

import torch


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, cache_len: int, factor: float = 1.0
) -> torch.Tensor:
    """Soft Overlong Punishment, DAPO Eq. 13, scaled by ``factor``.

    lengths: (B,) response lengths in tokens. Returns (B,) float32 in [-factor, 0]:
    0 up to L_max - L_cache, then a linear ramp to -factor at L_max, and -factor beyond.

    >>> overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, cache_len=4)
    tensor([ 0.0000,  0.0000, -0.5000, -1.0000, -1.0000])
    """
    assert lengths.dim() == 1, f"lengths must be (B,), got {tuple(lengths.shape)}"
    if not 0 < cache_len < max_len:
        raise ValueError(f"need 0 < cache_len < max_len, got cache_len={cache_len}, max_len={max_len}")
    expected = max_len - cache_len
    ramp = (expected - lengths.float()) / cache_len  # (B,) negative inside the cache window
    return factor * ramp.clamp(min=-1.0, max=0.0)
