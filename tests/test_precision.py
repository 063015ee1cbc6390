"""Mixed precision as the real-model path needs it, exercised on a CPU: float32 master weights and AdamW
state under bfloat16 compute, float32 log-probs, and collectives whose tensors live on the rank's device.

The negative control stays in the file: training the bfloat16 weights themselves (what ``model.dtype=bfloat16``
used to do) loses every update smaller than half a bfloat16 step of the weight, so at the paper's lr of 1e-6
almost no weight moves.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RUN
from dapo.config import ConfigError, load_config
from dapo.model import SetupError, load_model, make_optimizer
from dapo.rollout import HFEngine, SamplingParams
from dapo.trainer.loop import train
from dapo.learner.policy import make_seq_batch, response_logprobs
from dapo.learner import DataParallel, LocalLearner, TrainBatch

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]]


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(model, G=4):
    comps = HFEngine(model, 0, [1]).generate(PROMPTS, SamplingParams(n=G, max_new_tokens=8), list(range(len(PROMPTS))))
    adv = torch.randn(len(comps), generator=torch.Generator().manual_seed(0))
    return TrainBatch.of([PROMPTS[c.prompt_index] for c in comps], [c.token_ids for c in comps],
                         [c.logprobs for c in comps], [True] * len(comps), adv, torch.ones(len(comps)))


def _learner(tiny_model_dir, weights, compute, lr=1e-6):
    cfg = load_config(overrides=[*TINY_RUN, f"optim.lr={lr}", "optim.mini_batch_size=1", "optim.train_batch_size=4"])
    model = load_model(cfg.model, str(tiny_model_dir), torch.device("cpu"), weights)
    if weights == torch.float32:
        opt, sched = make_optimizer(cfg.optim, model)
    else:  # the negative control: AdamW straight on bfloat16 weights (make_optimizer refuses this)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    return LocalLearner(cfg, model, opt, sched, pad_id=0, device=torch.device("cpu"), compute_dtype=compute)


def _changed_fraction(a: dict, b: dict) -> float:
    changed = sum(int((a[k].float() != b[k].float()).sum()) for k in a)
    return changed / sum(v.numel() for v in a.values())


def test_bf16_compute_at_lr_1e_6_moves_nearly_every_weight_and_pure_bf16_does_not(tiny_model_dir):
    out = {}
    for name, weights in (("mixed", torch.float32), ("pure bf16", torch.bfloat16)):
        lr = _learner(tiny_model_dir, weights, torch.bfloat16)
        batch = _batch(lr.model)
        start = {k: v.clone() for k, v in lr.model.state_dict().items()}
        for step in (1, 2, 3):
            m = lr.update(batch, lr.old_logp(batch), step)
            assert m["actor/updates"] == 4 and m["actor/skipped_updates"] == 0
        out[name] = _changed_fraction(start, lr.model.state_dict())
    assert out["mixed"] > 0.95, out
    assert out["pure bf16"] < 0.1, out  # the control: updates below half a bf16 ulp round away


def test_master_weights_and_adamw_state_stay_float32_under_bf16_compute(tiny_model_dir):
    lr = _learner(tiny_model_dir, torch.float32, torch.bfloat16)
    batch = _batch(lr.model)
    lr.update(batch, lr.old_logp(batch), 1)
    assert {p.dtype for p in lr.model.parameters()} == {torch.float32}
    states = [s for s in lr.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    bf16 = load_model(load_config().model, str(tiny_model_dir), torch.device("cpu"), torch.bfloat16)
    with pytest.raises(SetupError, match="float32 master weights"):
        make_optimizer(load_config().optim, bf16)


def test_log_probs_are_float32_and_the_head_is_computed_in_float32(tiny_model_dir):
    from dapo.learner.policy import response_hidden

    model = load_model(load_config().model, str(tiny_model_dir), torch.device("cpu"))
    sb = make_seq_batch(PROMPTS, [[20, 21, 22], [23], [24, 25], [26, 27, 28]], 0)
    lp16, ent16 = response_logprobs(model, sb, with_entropy=True, compute_dtype=torch.bfloat16)
    assert lp16.dtype == ent16.dtype == torch.float32
    labels, mask = sb.input_ids[:, -sb.n_resp :], sb.response_mask.bool()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = response_hidden(model, sb)  # the decoder in the compute dtype
            head16 = model.lm_head(h)  # what autocast alone would do with the head
        head32 = h.float() @ model.lm_head.weight.float().t()
    assert head16.dtype == torch.bfloat16

    def picked(logits):
        return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)

    torch.testing.assert_close(lp16[mask], picked(head32)[mask], atol=1e-5, rtol=0)  # head and softmax in fp32
    assert (picked(head16) - lp16)[mask].abs().max() > 1e-4  # a bf16 head would have rounded them


def test_a_bf16_run_tracks_the_fp32_run_and_resumes_exactly(tiny_model_dir, tmp_path):
    common = [*TINY_RUN, f"model.path={tiny_model_dir}", "algo.filter_metric=reward", "optim.lr=1e-2",
              f"log.out_dir={tmp_path}", "ckpt.every=2", "ckpt.keep_last=5", "log.report=false"]
    rows = {}
    for name, extra in (("fp32", []), ("bf16", ["model.dtype=bfloat16"]), ("part", ["model.dtype=bfloat16"])):
        steps = 2 if name == "part" else 4
        train(load_config(overrides=common + extra + [f"optim.steps={steps}", f"log.run_name={name}"]))
    train(load_config(overrides=common + ["model.dtype=bfloat16", "optim.steps=4", f"ckpt.resume={tmp_path / 'part'}"]))
    for name in ("fp32", "bf16", "part"):
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    # the same step 1 rollout up to bf16 sampling: the first update's loss and entropy track fp32's
    a, b = rows["fp32"][0], rows["bf16"][0]
    assert b["actor/entropy"] == pytest.approx(a["actor/entropy"], rel=0.05)
    assert abs(b["actor/pg_loss"] - a["actor/pg_loss"]) < 0.05
    assert b["mismatch/logp_abs_diff"] > 0  # the trainer recomputed old log-probs in its own numerics
    # a resume under bf16 compute continues exactly where the uninterrupted bf16 run went
    assert [r["step"] for r in rows["part"]] == [1, 2, 3, 4]
    for x, y in zip(rows["bf16"], rows["part"]):
        for k in ("rollout/reward", "batch/samples_total", "actor/pg_loss", "actor/grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    w, v = load_file(str(tmp_path / "bf16" / "step_4" / "model.safetensors")), load_file(str(tmp_path / "part" / "step_4" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in w.values())  # checkpoints hold the float32 master weights
    for k in w:
        torch.testing.assert_close(w[k], v[k], atol=1e-5, rtol=1e-4)


def test_float16_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="float16 compute needs loss scaling"):
        load_config(overrides=["model.dtype=float16"])


def test_every_collective_tensor_lives_on_the_ranks_device(monkeypatch, tiny_model_dir):
    """NCCL refuses CPU tensors: the loss, the touched-parameter flags and the gradient buckets must be
    created on the rank's device. Here the rank's 'device' is the CPU and each all-reduce is recorded."""
    seen = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: seen.append((t.device, t.dtype)))
    dp = DataParallel(rank=0, world=2, device=torch.device("cpu"))
    model = load_model(load_config().model, str(tiny_model_dir), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    dp.reduce_grads(model)
    dp.sum_scalar(1.5)
    assert len(seen) >= 3 and all(d == dp.device for d, _ in seen)
    assert (torch.device("cpu"), torch.float64) in seen  # the loss, in float64
    meta = DataParallel(rank=0, world=2, device=torch.device("meta"))
    with pytest.raises(AssertionError, match="collective tensor on cpu"):
        meta.all_reduce(torch.zeros(1))  # a tensor left on the CPU when the rank's device is elsewhere


def test_a_push_that_corrupts_a_tensor_stops_the_run_naming_it(tiny_model_dir, tmp_path, monkeypatch):
    from dapo.learner import TrainingError

    real = HFEngine.load_weights
    name = "model.layers.0.self_attn.v_proj.weight"

    def lossy(self, sd, version):  # a transport that zeroes one tensor
        real(self, {**sd, name: torch.zeros_like(sd[name])}, version)

    monkeypatch.setattr(HFEngine, "load_weights", lossy)
    common = [*TINY_RUN, f"model.path={tiny_model_dir}", "algo.filter_metric=reward", "rollout.dtype=bfloat16",
              "optim.steps=1", f"log.out_dir={tmp_path}", "log.report=false"]
    with pytest.raises(TrainingError, match=rf"step 1: weight sync v1 failed: .*{name}.*rollout\.verify_weights"):
        train(load_config(overrides=common + ["log.run_name=lossy"]))
    monkeypatch.setattr(HFEngine, "load_weights", real)
    assert train(load_config(overrides=common + ["log.run_name=good"])).steps == 1  # a faithful push passes


def test_a_sampler_far_from_the_trainer_stops_the_step_before_its_update(tiny_model_dir, tmp_path):
    from dapo.learner import TrainingError

    common = [*TINY_RUN, f"model.path={tiny_model_dir}", "algo.filter_metric=reward", "rollout.dtype=bfloat16",
              "optim.steps=1", f"log.out_dir={tmp_path}", "log.report=false"]
    r = train(load_config(overrides=common + ["log.run_name=ok"]))  # the default bound: bf16 rounding passes
    diff = r.history[0]["mismatch/logp_abs_diff"]
    assert 0 < diff < load_config().rollout.max_logp_diff
    with pytest.raises(TrainingError, match=r"step 1: mismatch/logp_abs_diff=.* > rollout\.max_logp_diff="):
        train(load_config(overrides=common + [f"rollout.max_logp_diff={diff / 2}", "log.run_name=far"]))


def test_head_tf32_is_allowed_inside_the_lm_head_only_forward_and_backward(tiny_model_dir, monkeypatch):
    from dapo.learner.policy import ResponseLogprobs

    model = load_model(load_config().model, str(tiny_model_dir), torch.device("cpu"))
    seqs = make_seq_batch([[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]], pad_id=0)
    matmul = torch.backends.cuda.matmul
    user = matmul.fp32_precision
    matmul.fp32_precision = "ieee"  # the user's global choice
    try:
        seen = []
        lse, addmm = torch.logsumexp, torch.Tensor.addmm_  # the head's forward and its weight-gradient matmul

        def spy(where, fn):
            return lambda *a, **k: (seen.append((where, matmul.fp32_precision)), fn(*a, **k))[1]

        monkeypatch.setattr(torch, "logsumexp", spy("forward", lse))
        monkeypatch.setattr(torch.Tensor, "addmm_", spy("backward", addmm))
        runs = {}
        for tf32 in (True, False):
            seen.clear()
            model.zero_grad()
            lp, _ = ResponseLogprobs(model, head_tf32=tf32)(seqs)
            assert matmul.fp32_precision == "ieee"
            lp.sum().backward()
            assert matmul.fp32_precision == "ieee"  # never changed outside the head
            assert {w for w, _ in seen} == {"forward", "backward"}
            assert {p for _, p in seen} == ({"tf32"} if tf32 else {"ieee"})
            runs[tf32] = lp.detach(), model.lm_head.weight.grad.clone()
        assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])  # CPU: no effect
    finally:
        matmul.fp32_precision = user
