"""The sampler/trainer mismatch measured on real runs, its corrections, and the loss variants as presets:
one process with one dtype is on-policy to float rounding; a bf16 sampler against the fp32 trainer is not,
and the metrics, the token weights and the sequence mask show it."""
import json
from dataclasses import replace

import pytest
import torch

from conftest import TINY_RUN
from dapo.config import load_config
from dapo.trainer.build import build_run
from dapo.trainer.loop import train, train_step
from dapo.trainer.batch import rollout_correction
from dapo.trainer.batch import flatten_groups

COMMON = [*TINY_RUN, "algo.filter_metric=reward", "optim.lr=1e-2", "log.report=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_process_one_dtype_is_on_policy_at_step_1(tiny_model_dir, tmp_path):
    """No recompute is needed: the engine sampled with the trained model itself in float32. The metrics read
    0 (a ratio of 1), and the first update's ratio is 1 to float rounding, nothing clipped."""
    cfg = load_config(overrides=[*COMMON, f"model.path={tiny_model_dir}", "optim.mini_batch_size=4",
                                 f"log.out_dir={tmp_path}", "log.run_name=r", "optim.steps=1"])
    train(cfg)
    m = _rows(tmp_path / "r")[0]
    assert m["mismatch/logp_abs_diff"] == 0.0 and m["mismatch/kl"] == 0.0 and m["mismatch/ratio_max"] == 1.0
    assert m["actor/updates"] == 1  # one mini-batch: the policy has not moved yet when the ratio is taken
    assert m["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["actor/clipfrac_low"] == m["actor/clipfrac_high"] == 0.0


def _step_batch(tiny_model_dir, tmp_path, *extra):
    cfg = load_config(overrides=[*COMMON, f"model.path={tiny_model_dir}", *extra])
    run = build_run(cfg, tmp_path, None, log=lambda s: None)
    groups, _ = run.sampler.collect(1)
    batch = flatten_groups(groups, cfg, 1)
    return run, batch, run.learner.old_logp(batch)


def test_a_float32_copy_recomputes_to_rounding_and_a_bf16_sampler_does_not(tiny_model_dir, tmp_path):
    run, batch, old = _step_batch(tiny_model_dir, tmp_path / "a", "rollout.dtype=float32")
    _, fp32 = rollout_correction(batch, old, run.cfg.algo)
    assert fp32["mismatch/logp_abs_diff"] < 1e-5 and abs(fp32["mismatch/ratio_max"] - 1.0) < 1e-4
    run, batch, old = _step_batch(tiny_model_dir, tmp_path / "b", "rollout.dtype=bfloat16")
    assert {p.dtype for p in run.engine.model.parameters()} == {torch.bfloat16}  # the sampler's own bf16 copy
    assert {p.dtype for p in run.learner.model.parameters()} == {torch.float32}
    w, m = rollout_correction(batch, old, run.cfg.algo)
    assert m["mismatch/logp_abs_diff"] > max(1e-4, 20 * fp32["mismatch/logp_abs_diff"])
    assert m["mismatch/kl"] > 0 and m["mismatch/ratio_max"] > 1.0
    assert m["mismatch/masked_frac"] == 0.0 and w is None  # measured, not corrected (none)


def test_token_weights_and_the_sequence_mask_follow_the_ratio(tiny_model_dir, tmp_path):
    run, batch, old = _step_batch(tiny_model_dir, tmp_path / "t", "rollout.dtype=bfloat16", "algo.rollout_is=token",
                                  "algo.rollout_is_cap=1.0")
    weights, m = rollout_correction(batch, old, run.cfg.algo)
    for w, o, s in zip(weights.tolist(), old.tolist(), batch.behaviour_logp.tolist()):  # min(ratio, cap)
        for wi, oi, si in zip(w, o, s):
            assert wi == pytest.approx(min(float(torch.tensor(oi - si).exp()), 1.0), rel=1e-5)
    assert 0 < m["mismatch/is_clipfrac"] < 1
    run, batch, old = _step_batch(tiny_model_dir, tmp_path / "s", "rollout.dtype=bfloat16", "algo.rollout_is=sequence")
    before = batch.loss_mask.clone()
    weights, m = rollout_correction(batch, old, run.cfg.algo)
    after = batch.weighted(weights).trainable()
    dropped = [i for i in range(len(before)) if before[i] and len(batch.responses[i]) and not after[i]]
    for i in range(len(before)):
        if before[i] and len(batch.responses[i]):
            geo = float((old[i] - batch.behaviour_logp[i]).mean().exp())
            assert (i in dropped) == (not 0.999 <= geo <= 1.001), (i, geo)
    assert m["mismatch/masked_frac"] == pytest.approx(len(dropped) / sum(1 for i in range(len(before))
                                                                           if before[i] and len(batch.responses[i])))


@pytest.mark.parametrize("preset", ["gspo", "cispo", "drgrpo", "rloo"])
def test_each_variant_preset_trains_and_is_micro_batch_invariant(preset, tiny_model_dir, tmp_path):
    # the random model is never right: the length penalty is what gives its groups different rewards
    cfg = load_config(preset, overrides=[*COMMON, f"model.path={tiny_model_dir}", "algo.dynamic_sampling=false",
                                         "algo.soft_overlong=true"])
    run = build_run(cfg, tmp_path, None, log=lambda s: None)
    groups, _ = run.sampler.collect(1)
    batch = flatten_groups(groups, cfg, 1)
    # ratios != 1, and inside even GSPO's clip range (4e-4 on the sequence ratio)
    old = batch.behaviour_logp.like(batch.behaviour_logp.values - 1e-4 * (torch.arange(len(batch.behaviour_logp.values)) % 3))
    idx = list(range(len(batch.responses)))
    grads = []
    for size in (16, 3):  # one micro-batch, then six
        run.learner.cfg = replace(cfg, optim=replace(cfg.optim, micro_batch_size=size))
        run.learner.model.zero_grad(set_to_none=True)
        loss, _ = run.learner.minibatch_backward(batch, old, idx)
        grads.append((loss, {n: p.grad.clone() for n, p in run.learner.model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = grads
    assert abs(l1 - l2) < 1e-6 and g1.keys() == g2.keys()
    assert max(g.abs().max() for g in g1.values()) > 1e-4
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-5)
    run.learner.cfg = cfg
    _, m = train_step(run, 1)
    assert m["actor/updates"] >= 1 and all(torch.isfinite(p).all() for p in run.learner.model.parameters())
    run.close()
