"""Loss variants (GSPO, CISPO, Dr. GRPO, RLOO) and the sampler-trainer mismatch correction, checked
against hand-computed values, gradients, slow loop references and micro-batch invariance."""
import doctest
import math

import pytest
import torch

import dapo.algo.losses
import dapo.algo.mismatch
from dapo.algo import (
    AGG_MODES,
    POLICY_LOSSES,
    aggregate_loss,
    cispo_loss,
    get_policy_loss,
    group_advantages,
    gspo_loss,
    mismatch_stats,
    policy_loss,
    rollout_is_weights,
    rollout_sequence_mask,
)


def test_docstring_examples_run():
    for mod in (dapo.algo.losses, dapo.algo.mismatch):
        assert doctest.testmod(mod).failed == 0


# ---------------------------------------------------------------- mismatch: stats


def test_mismatch_stats_hand_computed():
    # token 0 agrees; token 1: old - sampler = 0.5; token 2 is masked with a huge ratio e^5 that must not count
    old = torch.tensor([[0.0, -1.0, 0.0]])
    smp = torch.tensor([[0.0, -1.5, -5.0]])
    st = mismatch_stats(old, smp, torch.tensor([[1.0, 1.0, 0.0]]))
    assert st["logp_abs_diff"].item() == pytest.approx(0.25)
    # k3 of KL(sampler || trainer): r - 1 - log r with r = pi_t / pi_s = e^0.5, averaged with the exact token's 0
    assert st["kl"].item() == pytest.approx((math.exp(0.5) - 1 - 0.5) / 2)
    assert st["ratio_max"].item() == pytest.approx(math.exp(0.5))
    assert all(not v.requires_grad for v in st.values())


def test_mismatch_kl_is_sampler_to_trainer_direction():
    # tokens drawn from the sampler q; the estimate must approach KL(q || p), not KL(p || q)
    q = torch.tensor([0.9, 0.09, 0.01])  # sampler
    p = torch.tensor([0.4, 0.3, 0.3])  # trainer: KL(q || p) = 0.59, KL(p || q) = 1.06
    kl_qp = (q * (q / p).log()).sum().item()
    kl_pq = (p * (p / q).log()).sum().item()
    assert abs(kl_qp - kl_pq) > 0.4
    gen = torch.Generator().manual_seed(0)
    idx = torch.multinomial(q, 200_000, replacement=True, generator=gen)[None]  # (1, N)
    st = mismatch_stats(p.log()[idx], q.log()[idx], torch.ones_like(idx, dtype=torch.float32))
    assert st["kl"].item() == pytest.approx(kl_qp, abs=0.02)


def _pair(seed=0, B=12, T=6, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    smp = torch.randn(B, T, generator=gen) - 2
    old = smp + torch.randn(B, T, generator=gen) * scale
    lengths = torch.randint(0, T + 1, (B,), generator=gen)  # includes empty responses
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return old, smp, mask


def test_mismatch_stats_combine_exactly_across_micro_batches():
    old, smp, mask = _pair()
    whole = mismatch_stats(old, smp, mask)
    sums, count, rmax = {"logp_abs_diff": 0.0, "kl": 0.0}, 0.0, 0.0
    for idx in torch.arange(old.shape[0]).chunk(5):
        st = mismatch_stats(old[idx], smp[idx], mask[idx])
        n = mask[idx].sum().item()  # the documented weight: this call's valid tokens
        for k in sums:
            sums[k] += st[k].item() * n
        count += n
        rmax = max(rmax, st["ratio_max"].item())
    for k in sums:
        assert sums[k] / count == pytest.approx(whole[k].item(), rel=1e-6)
    assert rmax == whole["ratio_max"].item()


def test_mismatch_stats_empty_mask_is_zero():
    st = mismatch_stats(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert {k: v.item() for k, v in st.items()} == {"logp_abs_diff": 0.0, "kl": 0.0, "ratio_max": 0.0}
    with pytest.raises(AssertionError, match="sampler_logp"):
        mismatch_stats(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


# ---------------------------------------------------------------- mismatch: TIS weights and sequence mask


def test_rollout_is_weights_truncate_above_and_zero_masked():
    old = torch.tensor([[0.0, 1.0, -1.0, 3.0]], requires_grad=True)
    smp = torch.tensor([[0.5, 0.0, -1.0, 0.0]])
    w, st = rollout_is_weights(old, smp, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(-0.5), 2.0, 1.0, 0.0]]))  # e^1 capped at 2
    assert not w.requires_grad
    assert st["is_clipfrac"].item() == pytest.approx(1 / 3)
    assert st["is_weight_mean"].item() == pytest.approx((math.exp(-0.5) + 2 + 1) / 3)
    with pytest.raises(ValueError, match="cap"):
        rollout_is_weights(old, smp, torch.ones(1, 4), cap=0.0)


def test_rollout_is_weights_scale_each_token_loss_and_gradient():
    gen = torch.Generator().manual_seed(4)
    old = torch.randn(3, 5, generator=gen) * 0.1
    logp0 = old + torch.randn(3, 5, generator=gen) * 0.1
    adv, mask = torch.randn(3, generator=gen), torch.ones(3, 5)
    w, _ = rollout_is_weights(old, old + torch.randn(3, 5, generator=gen) * 0.5, mask)
    for name in POLICY_LOSSES:
        fn = get_policy_loss(name)
        a, b = logp0.clone().requires_grad_(True), logp0.clone().requires_grad_(True)
        plain, _ = fn(a, old, adv, mask, 0.2, 0.28)
        weighted, _ = fn(b, old, adv, mask, 0.2, 0.28, is_weights=w)
        torch.testing.assert_close(weighted, plain * w)
        plain.sum().backward()
        weighted.sum().backward()
        torch.testing.assert_close(b.grad, a.grad * w)


def test_rollout_sequence_mask_geometric_mean_over_valid_tokens():
    # log-ratios old - sampler per row: mean 0 (keep); mean 0.3 (e^0.3 = 1.35 > 1.2, drop);
    # 0.0 valid then 9.0 masked (the masked token must not count: keep); mean -0.3 (0.74 < 0.8, drop); empty row
    lr = torch.tensor([[0.1, -0.1], [0.3, 0.3], [0.0, 9.0], [-0.3, -0.3], [5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    keep, st = rollout_sequence_mask(lr, torch.zeros(5, 2), mask, low=0.8, high=1.2)
    assert keep.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]  # the empty row is kept: it has no loss anyway
    assert st["masked_frac"].item() == pytest.approx(2 / 4)  # of the 4 rows with a valid token
    expected_geo = (1.0 + math.exp(0.3) + 1.0 + math.exp(-0.3)) / 4
    assert st["geo_ratio_mean"].item() == pytest.approx(expected_geo, rel=1e-6)
    with pytest.raises(ValueError, match="low"):
        rollout_sequence_mask(lr, torch.zeros(5, 2), mask, low=1.1, high=1.2)


def test_rollout_sequence_mask_defaults_are_tight():
    # verl's geometric band [0.999, 1.001]: a mean log-ratio of 0.002 is already out
    old = torch.tensor([[0.002, 0.002], [0.0005, 0.0005]])
    keep, _ = rollout_sequence_mask(old, torch.zeros(2, 2), torch.ones(2, 2))
    assert keep.tolist() == [0.0, 1.0]


# ---------------------------------------------------------------- GSPO


def test_gspo_hand_computed_and_gradient():
    d = torch.tensor([  # logp - old_logp per token; the 5.0 entries are masked
        [0.2, 0.0, 5.0],  # A=+1, s = e^0.1 = 1.105 > 1 + 4e-4: clipped, -1.0004
        [0.0, 0.0, 0.0],  # A=-2, s = 1: 2
        [-0.1, -0.1, -0.1],  # A=-1, s = e^-0.1 < 1 - 3e-4: clipped, 0.9997
        [0.0003, 0.0001, 5.0],  # A=+1, s = e^0.0002 inside the range: -s
        [-0.1, -0.1, -0.1],  # A=+1, s = e^-0.1: the pessimistic side is unclipped, -s
    ], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    old = torch.full_like(d, -1.0)
    logp = (old + d).requires_grad_(True)
    loss, st = gspo_loss(logp, old, adv, mask)
    s3, s4 = math.exp(0.0002), math.exp(-0.1)
    per_seq = torch.tensor([-1.0004, 2.0, 0.9997, -s3, -s4], dtype=torch.float64)
    torch.testing.assert_close(loss, per_seq[:, None] * mask)
    assert st["clipfrac_high"].item() == pytest.approx(2 / 13)
    assert st["clipfrac_low"].item() == pytest.approx(3 / 13)
    assert st["clipfrac_dual"].item() == 0.0
    loss.sum().backward()
    # GSPO-token gradient of each token: -A * s_i (its own log-prob only); clipped responses: exactly 0
    grad_seq = torch.tensor([0.0, 2.0, 0.0, -s3, -s4], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, grad_seq[:, None] * mask)


def _seq_batch(seed=0, B=10, T=6, spread=0.05, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=gen, dtype=dtype) * 0.1 - 2
    logp0 = old + torch.randn(B, T, generator=gen, dtype=dtype) * spread
    adv = torch.randn(B, generator=gen, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(dtype)
    return logp0, old, adv, mask


def _paper_gspo_objective(logp, old, adv, mask, eps_low, eps_high):
    """Reference: GSPO's objective (§4.1) written per response in a loop, -(1/G) sum_i min(s_i A_i, clip(s_i) A_i)."""
    total = 0.0
    for i in range(logp.shape[0]):
        valid = mask[i] > 0
        s = torch.exp((logp[i][valid] - old[i][valid]).mean())
        total = total + torch.minimum(s * adv[i], s.clamp(1 - eps_low, 1 + eps_high) * adv[i])
    return -total / logp.shape[0]


def test_gspo_seq_mean_token_mean_is_the_papers_sequence_objective():
    logp0, old, adv, mask = _seq_batch(spread=0.05)
    eps_low, eps_high = 0.01, 0.015  # wide enough that some responses are clipped and some are not
    a, b = logp0.clone().requires_grad_(True), logp0.clone().requires_grad_(True)
    lt, st = gspo_loss(a, old, adv, mask, eps_low, eps_high)
    ours = aggregate_loss(lt, mask, "seq-mean-token-mean")
    ref = _paper_gspo_objective(b, old, adv, mask, eps_low, eps_high)
    assert 0 < st["clipfrac_low"].item() + st["clipfrac_high"].item() < 1
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_gspo_with_one_token_responses_is_token_ppo():
    # a one-token response's sequence ratio is its token ratio: GSPO and the PPO surrogate coincide
    gen = torch.Generator().manual_seed(2)
    old = torch.randn(8, 3, generator=gen)
    logp = old + torch.randn(8, 3, generator=gen) * 0.3
    mask = torch.zeros(8, 3)
    mask[:, 0] = 1.0
    adv = torch.randn(8, generator=gen)
    g, gst = gspo_loss(logp, old, adv, mask, 0.2, 0.28)
    p, pst = policy_loss(logp, old, adv, mask, 0.2, 0.28)
    torch.testing.assert_close(g, p)
    assert {k: round(v.item(), 6) for k, v in gst.items()} == {k: round(v.item(), 6) for k, v in pst.items()}


def test_gspo_split_along_time_is_not_the_same_loss():
    # why micro-batches must hold whole responses: half a response has another sequence ratio
    logp0, old, adv, mask = _seq_batch(seed=5, spread=0.2)
    n = mask.sum().item()

    def grad(col_chunks):
        logp = logp0.clone().requires_grad_(True)
        for cols in col_chunks:
            lt, _ = gspo_loss(logp[:, cols], old[:, cols], adv, mask[:, cols], 10.0, 10.0)
            aggregate_loss(lt, mask[:, cols], "token-mean", num_tokens=n).backward()
        return logp.grad

    assert (grad([torch.arange(3), torch.arange(3, 6)]) - grad([torch.arange(6)])).abs().max() > 1e-3


# ---------------------------------------------------------------- CISPO


def _ratio_case():
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 2.0]])
    logp = ratios.log().requires_grad_(True)
    return logp, torch.zeros(2, 3), torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_cispo_hand_computed_and_gradient_keeps_clipped_tokens():
    logp, old, adv, mask = _ratio_case()
    loss_tok, st = cispo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # weights clip(r, 0.8, 1.28): [1.0, 1.28, 0.8], [1.1, 0.8, -]; loss = -A * w * logp
    w = torch.tensor([[1.0, 1.28, 0.8], [1.1, 0.8, 0.0]])
    a = torch.tensor([[1.0], [-2.0]])
    torch.testing.assert_close(loss_tok.detach(), -a * w * logp.detach() * mask)
    assert st["clipfrac_high"].item() == pytest.approx(1 / 5)  # r = 1.5 (2.0 is masked)
    assert st["clipfrac_low"].item() == pytest.approx(2 / 5)  # r = 0.5 and 0.7, whatever the sign of A
    aggregate_loss(loss_tok, mask, "token-mean").backward()
    # d loss / d logp_t = -clip(r_t) * A / N exactly, also where PPO's gradient is 0 (tokens (0,1) and (1,1))
    torch.testing.assert_close(logp.grad, -a * w * mask / 5)
    assert logp.grad[0, 1].item() != 0.0 and logp.grad[1, 1].item() != 0.0
    ppo_logp = logp.detach().clone().requires_grad_(True)
    aggregate_loss(policy_loss(ppo_logp, old, adv, mask)[0], mask).backward()
    assert ppo_logp.grad[0, 1].item() == 0.0 and ppo_logp.grad[1, 1].item() == 0.0


def test_cispo_default_has_no_lower_bound():
    # MiniMax-M1: no lower bound on the weight, only the upper one
    logp = torch.tensor([[math.log(0.1), math.log(3.0)]], requires_grad=True)
    loss_tok, st = cispo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2))
    loss_tok.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.1, -1.28]]))
    assert st["clipfrac_low"].item() == 0.0 and st["clipfrac_high"].item() == 0.5


# ---------------------------------------------------------------- the registry and micro-batch invariance


def test_registry_names_signature_and_errors():
    with pytest.raises(ValueError, match="ppo, gspo, cispo"):
        get_policy_loss("grpo")
    logp, old, adv, mask = _ratio_case()
    keys = set(policy_loss(logp, old, adv, mask)[1])
    for name in POLICY_LOSSES:
        _, st = get_policy_loss(name)(logp, old, adv, mask, 0.2, 0.28, None, None)  # one positional signature
        assert set(st) == keys
    for name in ("gspo", "cispo"):
        with pytest.raises(ValueError, match="clip_c"):
            get_policy_loss(name)(logp, old, adv, mask, 0.2, 0.28, clip_c=3.0)
    with pytest.raises(AssertionError, match="advantages"):
        gspo_loss(logp, old, torch.zeros(3), mask)
    with pytest.raises(AssertionError, match="is_weights"):
        policy_loss(logp, old, adv, mask, is_weights=torch.ones(2, 4))
    for name in POLICY_LOSSES:  # the one range check, shared by every registered loss
        with pytest.raises(ValueError, match="clip ranges must be >= 0"):
            get_policy_loss(name)(logp, old, adv, mask, 0.2, -0.1)


def test_a_loss_registered_where_it_is_defined_is_one_the_config_and_the_learner_take():
    from dapo.algo import register_policy_loss
    from dapo.config import ConfigError, load_config
    from dapo.learner.loss import LossSpec

    with pytest.raises(ConfigError, match="algo.policy_loss"):
        load_config(overrides=["algo.policy_loss=halved"])

    @register_policy_loss("halved")
    def halved(logp, old_logp, advantages, mask, eps_low, eps_high, clip_c=None, is_weights=None):
        loss, st = policy_loss(logp, old_logp, advantages, mask, eps_low, eps_high, clip_c, is_weights)
        return 0.5 * loss, st

    try:
        spec = LossSpec.of(load_config(overrides=["algo.policy_loss=halved"]))
        logp, old, adv, mask = _ratio_case()
        full, _ = policy_loss(logp, old, adv, mask)
        half, _ = spec.policy_loss(logp, old, adv, mask, spec.eps_low, spec.eps_high)
        torch.testing.assert_close(half, 0.5 * full)
    finally:
        del POLICY_LOSSES["halved"]


EPS = {"ppo": (0.2, 0.28), "gspo": (0.01, 0.015), "cispo": (0.2, 0.28)}


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_gradient_invariant_to_micro_batching(name, mode):
    # micro-batches are lists of whole responses (rows), with the step's global denominators
    logp0, old, adv, mask = _seq_batch(seed=1, B=16, T=7, spread=0.05)
    w, _ = rollout_is_weights(old, old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(9),
                                                           dtype=old.dtype), mask)
    num_tokens, num_seqs = mask.sum().item(), (mask.sum(1) > 0).sum().item()
    fn, (lo, hi) = get_policy_loss(name), EPS[name]

    def run(n_micro):
        logp = logp0.clone().requires_grad_(True)
        total = 0.0
        for idx in torch.arange(logp.shape[0]).chunk(n_micro):
            lt, _ = fn(logp[idx], old[idx], adv[idx], mask[idx], lo, hi, is_weights=w[idx])
            loss = aggregate_loss(lt, mask[idx], mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=7)
            loss.backward()
            total += loss.item()
        return total, logp.grad

    whole_loss, whole_grad = run(1)
    assert whole_grad.abs().max() > 0
    for n in (2, 4, 16):
        loss, grad = run(n)
        assert loss == pytest.approx(whole_loss, abs=1e-12)
        torch.testing.assert_close(grad, whole_grad, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- Dr. GRPO and RLOO


def test_dr_grpo_pinned_numbers():
    # Dr. GRPO = advantages without the std + each response's token SUM over a constant L_max, mean over responses
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    adv = group_advantages(rewards, group_size=3, norm_std=False)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3]))
    lengths = torch.tensor([1, 2, 3, 4, 2, 1])
    mask = (torch.arange(4)[None] < lengths[:, None]).float()
    old = torch.full((6, 4), -1.0)
    logp = old.clone().requires_grad_(True)  # on-policy: ratio 1, loss_tok = -A
    lt, _ = policy_loss(logp, old, adv, mask)
    loss = aggregate_loss(lt, mask, "seq-mean-token-sum-norm", max_len=4)
    # -(1/6) * sum_i A_i * |o_i| / 4 = -(1/6) * (1/3) / 4
    assert loss.item() == pytest.approx(-1 / 72)
    loss.backward()
    # every token's gradient is -A_i / (G * L_max) = -A_i / 24, whatever its response's length
    torch.testing.assert_close(logp.grad, -adv[:, None] / 24 * mask)


def _slow_rloo(r, g):
    out = []
    for p in range(len(r) // g):
        grp = [float(x) for x in r[p * g : (p + 1) * g]]
        out += [x - (sum(grp) - x) / (g - 1) for x in grp]
    return torch.tensor(out)


def test_rloo_matches_leave_one_out_loop():
    gen = torch.Generator().manual_seed(0)
    for g in (2, 3, 8):
        r = torch.randn(4 * g, generator=gen)
        rloo = group_advantages(r, g, norm_std=False, estimator="rloo")
        torch.testing.assert_close(rloo, _slow_rloo(r, g), rtol=1e-5, atol=1e-6)
        # G/(G-1) times the Dr. GRPO advantage; with the std, G/(G-1) times GRPO's
        torch.testing.assert_close(rloo, g / (g - 1) * group_advantages(r, g, norm_std=False))
        torch.testing.assert_close(group_advantages(r, g, estimator="rloo"), g / (g - 1) * group_advantages(r, g))


def test_rloo_equal_groups_exactly_zero_and_errors():
    r = torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 1.0])
    adv = group_advantages(r, 3, norm_std=False, estimator="rloo")
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(adv[3:], torch.tensor([0.5, -1.0, 0.5]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.ones(3), 1, estimator="rloo")
    with pytest.raises(ValueError, match="grpo, rloo"):
        group_advantages(torch.ones(4), 2, estimator="loo")
