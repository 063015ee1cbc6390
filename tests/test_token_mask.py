"""The per-token mask (multi-turn: observation tokens are in the sequence but not the model's): they shape the
context of later tokens, and nothing else: no loss, no gradient, no entropy, not counted in the token mean, not
measured by the mismatch correction."""
from dataclasses import replace

import pytest
import torch

from conftest import TINY_RUN
from dapo.config import load_config
from dapo.learner import LocalLearner, TrainBatch
from dapo.model import load_model, make_optimizer
from dapo.trainer.batch import rollout_correction

CPU = torch.device("cpu")


def _learner(tiny_model_dir, *extra):
    cfg = load_config(overrides=[*TINY_RUN, f"model.path={tiny_model_dir}", "optim.micro_batch_size=3", *extra])
    model = load_model(cfg.model, str(tiny_model_dir), CPU)
    opt, sched = make_optimizer(cfg.optim, model)
    return LocalLearner(cfg, model, opt, sched, pad_id=0, device=CPU)


def _batch(with_mask: bool, n=8):
    g = torch.Generator().manual_seed(7)
    lens = [int(x) for x in torch.randint(4, 12, (n,), generator=g)]
    prompts = [[5 + i % 3, 6, 7] for i in range(n)]
    resps = [torch.randint(4, 60, (k,), generator=g) for k in lens]
    beh = [-2.0 - torch.rand(k, generator=g) for k in lens]
    # tokens 1..2 of every response are an observation (a tool's answer between two model turns)
    masks = [torch.tensor([0.0 if 1 <= t <= 2 else 1.0 for t in range(k)]) for k in lens] if with_mask else None
    return TrainBatch.of(prompts, resps, beh, [True] * n, torch.randn(n, generator=g), torch.ones(n), masks)


def _obs_positions(batch):
    return (batch.token_mask.values == 0).nonzero().squeeze(1)


def _backward(learner, batch, old):
    learner.model.zero_grad(set_to_none=True)
    loss, sums = learner.minibatch_backward(batch, old, list(range(len(batch.responses))), with_entropy=True)
    return loss, sums, {n: p.grad.clone() for n, p in learner.model.named_parameters()}


@pytest.mark.parametrize("layout", ["optim.micro_batch_tokens=0", "optim.micro_batch_tokens=40"])
def test_observation_tokens_carry_no_loss_gradient_or_count(tiny_model_dir, layout):
    learner = _learner(tiny_model_dir, layout)
    plain, masked = _batch(False), _batch(True)
    # an all-ones mask is no mask: the same loss, sums and gradient, bit for bit
    ones = replace(plain, token_mask=plain.responses.like(torch.ones(len(plain.responses.values))))
    a, b = _backward(learner, plain, plain.behaviour_logp), _backward(learner, ones, ones.behaviour_logp)
    assert a[0] == b[0] and a[1] == b[1] and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    # the denominators count the model's tokens only
    n_obs = len(_obs_positions(masked))
    assert float(masked.loss_tokens().sum()) == len(masked.responses.values) - n_obs
    loss, sums, grads = _backward(learner, masked, masked.behaviour_logp)
    assert sums["tokens"] == sums["entropy_tokens"] == len(masked.responses.values) - n_obs
    # whatever the old log-probs and advantages say at an observation token, nothing changes
    wild = masked.behaviour_logp.clone()
    wild.values[_obs_positions(masked)] = 30.0  # ratio exp(-30..): would dominate the loss if it counted
    loss2, sums2, grads2 = _backward(learner, masked, wild)
    assert loss2 == loss and sums2 == sums and all(torch.equal(grads[k], grads2[k]) for k in grads)
    # ... while the same change at a model token does change it (the check above can fail)
    moved = masked.behaviour_logp.clone()
    moved.values[int(masked.responses.offsets[1])] = -30.0  # row 1 (A > 0), token 0: ratio clipped at 1.28
    assert _backward(learner, masked, moved)[0] != loss


def test_the_mismatch_correction_measures_and_weights_only_the_models_tokens():
    cfg = load_config(overrides=["algo.rollout_is=token"])
    b = _batch(True)
    old = b.behaviour_logp.like(b.behaviour_logp.values + 0.01)
    weights, m = rollout_correction(b, old, cfg.algo)
    wild = old.clone()
    wild.values[_obs_positions(b)] = 5.0
    weights2, m2 = rollout_correction(b, wild, cfg.algo)
    assert m == m2 and torch.equal(weights.values, weights2.values)
    assert m["mismatch/logp_abs_diff"] == pytest.approx(0.01, rel=1e-4)
    assert torch.equal(weights.values[_obs_positions(b)], torch.ones(len(_obs_positions(b))))  # untouched: 1
