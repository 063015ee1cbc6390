"""Group-relative advantages (GRPO, arXiv 2402.03300 §4.1.2; DAPO Eq. 9; RLOO, arXiv 2402.14740) and the
Dynamic Sampling filter."""
from __future__ import annotations

import torch


def _grouped(values: torch.Tensor, group_size: int) -> torch.Tensor:
    assert values.dim() == 1, f"expected a flat (P*G,) tensor, got shape {tuple(values.shape)}"
    assert group_size >= 1 and values.numel() % group_size == 0, (
        f"{values.numel()} values do not split into groups of {group_size}"
    )
    return values.view(-1, group_size)  # (P, G)


ADV_ESTIMATORS = ("grpo", "rloo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, norm_std: bool = True, eps: float = 1e-6, estimator: str = "grpo"
) -> torch.Tensor:
    """A_i = (R_i - mean(R_group)) / (std(R_group) + eps), one scalar per response.

    rewards: (P*G,), the G responses of each prompt contiguous. Returns (P*G,) float32.

    The std is the *unbiased* sample std (Bessel's correction, divide by G-1), the convention of the
    GRPO reference code, verl and TRL, so advantages match theirs number for number. With
    ``norm_std=False`` the result is Dr. GRPO's plain ``R_i - mean`` (arXiv 2503.20783), which does not
    up-weight groups that are almost all right or all wrong. A group with equal rewards gets exactly
    zero advantage either way.

    ``estimator="rloo"`` replaces the group mean by the leave-one-out baseline (RLOO, Ahmadian et al.
    2024, arXiv 2402.14740): A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean), so the
    baseline of a response does not contain its own reward (an unbiased estimator). The paper's RLOO is
    ``norm_std=False``; with ``norm_std=True`` it is G / (G - 1) times the GRPO advantage. Needs G >= 2.

    >>> group_advantages(torch.tensor([1., -1., 1., 1.]), group_size=2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    >>> group_advantages(torch.tensor([1., 0., 0.]), group_size=3, norm_std=False, estimator="rloo")
    tensor([ 1.0000, -0.5000, -0.5000])
    """
    if estimator not in ADV_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {', '.join(ADV_ESTIMATORS)}")
    r = _grouped(rewards.float(), group_size)  # (P, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError(f"RLOO's leave-one-out baseline needs group_size >= 2, got {group_size}")
        centred = centred * (group_size / (group_size - 1))
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
