"""Group-relative advantages (GRPO, arXiv 2402.03300 §4.1.2; DAPO Eq. 9) and the Dynamic Sampling filter."""
from __future__ import annotations

import torch


def _grouped(values: torch.Tensor, group_size: int) -> torch.Tensor:
    assert values.dim() == 1, f"expected a flat (P*G,) tensor, got shape {tuple(values.shape)}"
    assert group_size >= 1 and values.numel() % group_size == 0, (
        f"{values.numel()} values do not split into groups of {group_size}"
    )
    return values.view(-1, group_size)  # (P, G)


def group_advantages(
    rewards: torch.Tensor, group_size: int, norm_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (R_i - mean(R_group)) / (std(R_group) + eps), one scalar per response.

    rewards: (P*G,), the G responses of each prompt contiguous. Returns (P*G,) float32.

    The std is the *unbiased* sample std (Bessel's correction, divide by G-1), the convention of the
    GRPO reference code, verl and TRL, so advantages match theirs number for number. With
    ``norm_std=False`` the result is Dr. GRPO's plain ``R_i - mean`` (arXiv 2503.20783), which does not
    up-weight groups that are almost all right or all wrong. A group with equal rewards gets exactly
    zero advantage either way.

    >>> group_advantages(torch.tensor([1., -1., 1., 1.]), group_size=2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    r = _grouped(rewards.float(), group_size)  # (P, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if norm_std and group_size > 1:
        centred = centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    # equal rewards: exactly zero, even where the float mean rounds (0.3 * 3 / 3 != 0.3) or eps = 0
    flat = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))  # (P, 1)
    return centred.masked_fill(flat, 0.0).reshape(-1)


def keep_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dynamic Sampling's filter (DAPO Eq. 11): True for groups whose values are not all equal.

    values: (P*G,) any per-response metric (accuracy, or a continuous reward). Returns (P,) bool.
    ``max > min`` is exactly "std > 0" without the rounding of a computed std.

    >>> keep_groups(torch.tensor([1., 1., 0., 1., 0.5, 0.5]), group_size=2)
    tensor([False,  True, False])
    """
    v = _grouped(values, group_size)  # (P, G)
    return v.amax(dim=1) > v.amin(dim=1)
