"""The DAPO maths, checked against hand-computed values, gradients and slow loop references."""
import doctest
import math

import pytest
import torch

import dapo.algo.advantages
import dapo.algo.shaping
from dapo.algo import (
    aggregate_loss,
    group_advantages,
    keep_groups,
    kl_penalty,
    overlong_penalty,
    policy_loss,
    token_entropy,
    token_logprobs,
)


def test_docstring_examples_run():
    for mod in (dapo.algo.advantages, dapo.algo.shaping):
        assert doctest.testmod(mod).failed == 0


# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    # group 1: rewards 1, -1, -1 -> mean -1/3, unbiased std = sqrt(((4/3)^2 + 2 (2/3)^2) / 2) = sqrt(4/3)
    # group 2: all equal -> 0
    r = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, group_size=3, eps=0.0)
    s = math.sqrt(4 / 3)
    expected = torch.tensor([(4 / 3) / s, -(2 / 3) / s, -(2 / 3) / s, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)


def test_group_advantages_dr_grpo_no_std():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
    adv = group_advantages(r, group_size=3, norm_std=False)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0]))


def _slow_group_advantages(r, g, eps):
    out = []
    for p in range(len(r) // g):
        grp = [float(x) for x in r[p * g : (p + 1) * g]]
        m = sum(grp) / g
        sd = math.sqrt(sum((x - m) ** 2 for x in grp) / (g - 1))
        out += [(x - m) / (sd + eps) for x in grp]
    return torch.tensor(out)


def test_group_advantages_matches_loop_reference():
    gen = torch.Generator().manual_seed(0)
    for g in (2, 4, 8):
        r = torch.randn(5 * g, generator=gen)
        torch.testing.assert_close(group_advantages(r, g), _slow_group_advantages(r, g, 1e-6), rtol=1e-5, atol=1e-6)


def test_group_advantages_rejects_ragged():
    with pytest.raises(AssertionError):
        group_advantages(torch.zeros(7), group_size=3)


def test_keep_groups_continuous_and_binary():
    v = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.30001, 0.3, 1.0, 0.0, -1.0, -1.0])
    assert keep_groups(v, 2).tolist() == [False, False, True, True, False]
    # a slow reference: non-zero std
    gen = torch.Generator().manual_seed(1)
    vals = torch.randint(0, 2, (40,), generator=gen).float()
    ref = [torch.tensor(vals[i : i + 4].tolist()).std().item() > 0 for i in range(0, 40, 4)]
    assert keep_groups(vals, 4).tolist() == ref


# ---------------------------------------------------------------- policy loss


def _case():
    # 2 x 3: ratios exp(logp - old) chosen to hit each branch
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 2.0]])
    old = torch.zeros(2, 3)
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_policy_loss_hand_computed_clip_higher():
    logp, old, adv, mask = _case()
    loss, stats = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # row 0, A=+1: r=1 -> -1; r=1.5 clipped to 1.28 -> -1.28; r=0.5: max(-0.5, -0.8) = -0.5
    # row 1, A=-2: r=1.1 -> max(2.2, 2.2) = 2.2; r=0.7: max(1.4, 1.6) = 1.6 (clipped at 0.8); masked -> 0
    expected = torch.tensor([[-1.0, -1.28, -0.5], [2.2, 1.6, 0.0]])
    torch.testing.assert_close(loss, expected)
    assert stats["clipfrac_high"].item() == pytest.approx(1 / 5)
    assert stats["clipfrac_low"].item() == pytest.approx(1 / 5)
    assert stats["clipfrac_dual"].item() == 0.0


def test_policy_loss_symmetric_clip_differs_at_high_side():
    logp, old, adv, mask = _case()
    loss, _ = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert loss[0, 1].item() == pytest.approx(-1.2)


def test_policy_loss_dual_clip():
    # A < 0 with a huge ratio: plain PPO loss -A * r = 2 * 5 = 10, dual clip bounds it at -A * c = 6
    logp = torch.tensor([[math.log(5.0), 0.0]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 2), torch.tensor([-2.0]), torch.ones(1, 2), clip_c=3.0)
    torch.testing.assert_close(loss.detach(), torch.tensor([[6.0, 2.0]]))
    assert stats["clipfrac_dual"].item() == pytest.approx(0.5)
    loss.sum().backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() != 0.0


def test_policy_loss_gradients_zero_exactly_where_clipped_or_masked():
    logp, old, adv, mask = _case()
    loss, _ = policy_loss(logp, old, adv, mask)
    loss.sum().backward()
    g = logp.grad
    assert g[0, 1].item() == 0.0  # ratio 1.5 > 1.28, A > 0: clipped
    assert g[1, 1].item() == 0.0  # ratio 0.7 < 0.8, A < 0: clipped
    assert g[1, 2].item() == 0.0  # masked
    # unclipped tokens: d(-A r)/d logp = -A r
    assert g[0, 0].item() == pytest.approx(-1.0)
    assert g[0, 2].item() == pytest.approx(-0.5)  # ratio 0.5 with A > 0 is not clipped (pessimistic side)
    assert g[1, 0].item() == pytest.approx(2.2)


def test_policy_loss_per_token_advantages_and_shape_checks():
    logp = torch.zeros(2, 3, requires_grad=True)
    adv_bt = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.0]])
    loss, _ = policy_loss(logp, torch.zeros(2, 3), adv_bt, torch.ones(2, 3))
    torch.testing.assert_close(loss.detach(), -adv_bt)
    with pytest.raises(AssertionError):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


def test_policy_loss_extreme_log_ratio_is_finite():
    logp = torch.tensor([[80.0, -80.0]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2))
    assert torch.isfinite(loss).all() and torch.isfinite(stats["approx_kl"])
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()


# ---------------------------------------------------------------- aggregation


def test_aggregate_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((6 / 3 + 4 / 3) / 2)
    assert aggregate_loss(loss, mask, "token-mean", num_tokens=8).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(loss, mask, "sample-mean")


def test_token_mean_weighs_long_responses_by_length():
    # a 1-token response and a 3-token response, all tokens loss 1 vs 0: token-mean counts tokens
    loss = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(1 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(1 / 2)


def _mini_batch(seed=0, B=16, T=7):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=gen) * 0.1 - 2
    logp0 = old + torch.randn(B, T, generator=gen) * 0.2
    adv = torch.randn(B, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return logp0, old, adv, mask


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_gradient_invariant_to_micro_batching(mode):
    logp0, old, adv, mask = _mini_batch()
    num_tokens, num_seqs = mask.sum().item(), (mask.sum(1) > 0).sum().item()

    def grad(n_micro):
        logp = logp0.clone().requires_grad_(True)
        for idx in torch.arange(logp.shape[0]).chunk(n_micro):
            lt, _ = policy_loss(logp[idx], old[idx], adv[idx], mask[idx])
            aggregate_loss(lt, mask[idx], mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=7).backward()
        return logp.grad

    whole = grad(1)
    for n in (2, 4, 8):
        torch.testing.assert_close(grad(n), whole, atol=1e-6, rtol=0)


def test_token_mean_without_global_denominator_is_not_invariant():
    # the reason the denominator is explicit: local means over uneven micro-batches give another gradient
    logp0, old, adv, mask = _mini_batch(seed=3)
    logp = logp0.clone().requires_grad_(True)
    lt, _ = policy_loss(logp, old, adv, mask)
    aggregate_loss(lt, mask).backward()
    whole = logp.grad.clone()
    logp.grad = None
    for idx in torch.arange(16).chunk(4):
        lt, _ = policy_loss(logp[idx], old[idx], adv[idx], mask[idx])
        (aggregate_loss(lt, mask[idx]) / 4).backward()
    assert (logp.grad - whole).abs().max() > 1e-4


# ---------------------------------------------------------------- overlong, KL, entropy


def test_overlong_penalty_eq13():
    # L_max 20, L_cache 4: threshold 16; 17 -> -0.25, 19 -> -0.75, 20 -> -1
    pen = overlong_penalty(torch.tensor([0, 16, 17, 19, 20, 30]), max_len=20, cache_len=4, factor=0.5)
    torch.testing.assert_close(pen, 0.5 * torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), max_len=4, cache_len=4)


def test_kl_estimators_hand_computed():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    k1 = kl_penalty(logp, ref, "k1")
    torch.testing.assert_close(k1, torch.tensor([[math.log(2), math.log(0.5)]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * k1**2)
    # k3 = ref/p - 1 - log(ref/p): 0.5 - 1 + log 2 ; 2 - 1 - log 2
    torch.testing.assert_close(
        kl_penalty(logp, ref, "k3"), torch.tensor([[0.5 - 1 + math.log(2), 1 - math.log(2)]])
    )
    assert (kl_penalty(torch.randn(4, 5), torch.randn(4, 5), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k4")


def test_kl_k3_is_unbiased_estimate_of_true_kl():
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum()
    gen = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    est = kl_penalty(p.log()[idx], q.log()[idx], "k3").mean()
    assert est.item() == pytest.approx(true_kl.item(), abs=0.01)


def test_token_entropy_matches_softmax_and_is_stable():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=gen) * 3
    p = torch.softmax(logits, -1)
    direct = -(p * p.log()).sum(-1)
    torch.testing.assert_close(token_entropy(logits), direct)
    torch.testing.assert_close(token_entropy(logits, chunk=2), direct)
    big = torch.tensor([[[1e4, 1e4, -1e4]]])
    torch.testing.assert_close(token_entropy(big), torch.tensor([[math.log(2)]]))
    uniform = torch.zeros(1, 1, 7, dtype=torch.bfloat16)
    assert token_entropy(uniform).dtype == torch.float32
    assert token_entropy(uniform).item() == pytest.approx(math.log(7), rel=1e-5)


def test_token_logprobs_chunked_matches_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 13, generator=gen)
    labels = torch.randint(0, 13, (3, 5), generator=gen)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels, chunk=4), ref)
    logits.requires_grad_(True)
    token_logprobs(logits, labels, chunk=4).sum().backward()
    assert logits.grad is not None
