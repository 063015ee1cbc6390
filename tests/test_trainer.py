"""The training loop end to end on a tiny real model: dynamic sampling, metrics, checkpoints, resume."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import TINY_RUN
from dapo.cli import main as cli_main
from dapo.config import load_config
from dapo.data.example import Example
from dapo.rollout import HFEngine, SamplingParams
from dapo.items import PromptItem
from dapo.problems import ResponseDecoder, text_score_ids
from dapo.rewards import RewardBatch
from dapo.trainer.loop import train
from dapo.trainer.sampler import DynamicSampler, GenCapReached


class _Prompts:
    """A real prompt stream over fixed token ids, with a cursor."""

    def __init__(self):
        self.cursor = 0

    def take(self, n):
        out = [PromptItem(self.cursor + k, Example(f"p{self.cursor + k}", "x"), [5 + (self.cursor + k) % 20, 6])
               for k in range(n)]
        self.cursor += n
        return out

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, s):
        self.cursor = s["cursor"]


def _verdicts(ok):
    return RewardBatch([1.0 if c else -1.0 for c in ok], list(ok), {})


def _parity_score(texts, examples):
    """Correct iff the response's first character code is even: mixed groups for some prompts, not all."""
    return _verdicts([bool(t) and ord(t[0]) % 2 == 0 for t in texts])


_SAMPLER_KEYS = {"group_size": "rollout.group_size", "train_batch_size": "optim.train_batch_size",
                 "gen_batch_size": "rollout.gen_batch_size", "max_gen_rounds": "algo.max_gen_rounds",
                 "on_gen_cap": "algo.on_gen_cap", "refill": "algo.refill", "carry_over": "algo.carry_over",
                 "dynamic_sampling": "algo.dynamic_sampling"}


def _sampler(tiny_model_dir, score=_parity_score, **kw):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eng = HFEngine(model, tok.pad_token_id, [tok.eos_token_id])
    settings = dict(group_size=4, train_batch_size=6, gen_batch_size=4, max_gen_rounds=6)
    settings.update(kw)
    cfg = load_config(overrides=[f"{_SAMPLER_KEYS[k]}={v}" for k, v in settings.items()]
                      + ["rollout.max_new_tokens=3", "algo.soft_overlong=false", "optim.mini_batch_size=1"])
    return DynamicSampler(cfg, eng, _Prompts(), text_score_ids(score, ResponseDecoder(tok)))


def test_dynamic_sampling_keeps_only_mixed_groups(tiny_model_dir):
    s = _sampler(tiny_model_dir)
    groups, m = s.collect(step=1)
    assert len(groups) == 6
    for g in groups:
        assert 0 < sum(g.correct) < 4  # mixed outcomes only
    assert m["batch/gen_rounds"] >= 2  # 4 prompts a round cannot fill 6 mixed groups in one
    assert m["batch/samples_total"] == m["batch/gen_rounds"] * 16
    assert 0 < m["batch/kept_frac"] <= 1


def test_dynamic_sampling_stops_at_the_cap(tiny_model_dir):
    def all_wrong(texts, examples):
        return _verdicts([False] * len(texts))

    s = _sampler(tiny_model_dir, score=all_wrong, max_gen_rounds=3)
    groups, m = s.collect(step=1)
    assert groups == [] and m["batch/gen_rounds"] == 3 and m["batch/capped"] == 1.0
    s = _sampler(tiny_model_dir, score=all_wrong, max_gen_rounds=2, on_gen_cap="error")
    with pytest.raises(GenCapReached, match="max_gen_rounds"):
        s.collect(step=1)


def test_carry_over_keeps_surplus_groups_with_behaviour_logprobs(tiny_model_dir):
    s = _sampler(tiny_model_dir, train_batch_size=2, gen_batch_size=8, carry_over=True)
    groups, m = s.collect(step=1)
    assert len(groups) == 2 and m["batch/carried"] == len(s.carried) > 0
    carried = list(s.carried)
    groups2, _ = s.collect(step=2)
    assert groups2[: len(carried)] == carried[:2]
    assert all(g.step == 1 and len(g.completions[0].logprobs) == len(g.completions[0].token_ids) for g in groups2[:1])
    assert all(c.token_ids.dtype == torch.long and c.logprobs.dtype == torch.float32 for g in groups2 for c in g.completions)
    s2 = _sampler(tiny_model_dir, train_batch_size=2, gen_batch_size=8)
    s2.collect(step=1)
    assert s2.carried == []  # the paper's default: surplus discarded


def _half_mixed(texts, examples):
    """Even prompt numbers: alternately right and wrong (a mixed group); odd ones: all wrong. Keep rate 1/2."""
    return _verdicts([int(e.prompt[1:]) % 2 == 0 and i % 2 == 0 for i, e in enumerate(examples)])


def test_adaptive_refill_samples_only_what_the_keep_rate_needs(tiny_model_dir):
    batch = _sampler(tiny_model_dir, score=_half_mixed, gen_batch_size=8)
    adaptive = _sampler(tiny_model_dir, score=_half_mixed, gen_batch_size=8, refill="adaptive")
    gb, mb = batch.collect(step=1)
    ga, ma = adaptive.collect(step=1)
    # round 1: prompts 0-7, 4 kept; round 2: the paper's rule takes 8 more, adaptive ceil(1.25 x 2 / (4/8)) = 5
    assert (mb["batch/samples_total"], ma["batch/samples_total"]) == (16 * 4, 13 * 4)
    assert mb["batch/gen_rounds"] == ma["batch/gen_rounds"] == 2
    assert (mb["batch/kept_frac"], mb["batch/mixed_frac"]) == (6 / 16, 8 / 16)  # 8 mixed, 2 of them surplus
    assert (ma["batch/kept_frac"], ma["batch/mixed_frac"]) == (6 / 13, 7 / 13)
    assert [g.item.uid for g in ga] == [g.item.uid for g in gb] == [0, 2, 4, 6, 8, 10]  # the same groups ...
    assert [c.token_ids.tolist() for g in ga for c in g.completions] == [c.token_ids.tolist() for g in gb for c in g.completions]
    _, ma2 = adaptive.collect(step=2)  # ... and every step starts with a whole round (prompts 13-20, then 21-25)
    assert ma2["batch/samples_total"] - ma["batch/samples_total"] == (8 + 5) * 4


def test_no_dynamic_sampling_trains_on_every_group(tiny_model_dir):
    s = _sampler(tiny_model_dir, dynamic_sampling=False, train_batch_size=5)
    groups, m = s.collect(step=1)
    assert len(groups) == 5 and m["batch/gen_rounds"] == 1


REQUIRED_METRICS = [
    "rollout/acc", "rollout/reward", "response/len_mean", "response/len_max", "response/truncated_frac",
    "actor/entropy", "actor/clipfrac_low", "actor/clipfrac_high", "actor/clipfrac_dual", "actor/approx_kl",
    "actor/grad_norm", "actor/lr", "batch/kept_frac", "batch/mixed_frac", "batch/gen_rounds", "batch/samples_total",
    "time/gen", "time/reward", "time/old_logp", "time/update", "perf/tokens_per_s",
]


def test_cli_three_steps_changes_parameters_and_writes_metrics(tiny_model_dir, tmp_path, capsys):
    # filter on the shaped reward: a random model is never right, but its lengths (and so penalties) vary
    rc = cli_main(["train", "--model", str(tiny_model_dir), "optim.steps=3", f"log.out_dir={tmp_path}",
                   "log.run_name=r", "algo.filter_metric=reward", "optim.lr=1e-2", *TINY_RUN])
    assert rc == 0
    run = tmp_path / "r"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        missing = [k for k in REQUIRED_METRICS if k not in r]
        assert not missing, missing
        assert r["actor/updates"] == -(-r["batch/groups"] // 2)  # one update per mini-batch of 2 groups
    assert sum(r["actor/updates"] for r in rows) >= 2
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(run / "step_3" / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["before"]["accuracy"] <= 1 and "accuracy" in summary["after"]
    assert (run / "config.yaml").exists()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["run_dir"] == str(run)


def test_stop_and_resume_continues_with_the_same_data_order(tiny_model_dir, tmp_path):
    common = ["algo.filter_metric=reward", "optim.lr=1e-2", "ckpt.every=2", "ckpt.keep_last=5", *TINY_RUN,
              f"model.path={tiny_model_dir}", f"log.out_dir={tmp_path}"]
    train(load_config(overrides=common + ["optim.steps=4", "log.run_name=full"]))
    part = train(load_config(overrides=common + ["optim.steps=2", "log.run_name=part"]))
    assert part.steps == 2 and (tmp_path / "part" / "step_2" / "manifest.json").exists()
    resumed = train(load_config(overrides=common + ["optim.steps=4", f"ckpt.resume={tmp_path / 'part'}"]))
    assert resumed.run_dir == tmp_path / "part" and resumed.steps == 4
    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("full", "part")}
    assert [r["step"] for r in rows["part"]] == [1, 2, 3, 4]
    for a, b in zip(rows["full"], rows["part"]):  # same prompts, same samples, same updates
        for k in ("rollout/reward", "response/len_mean", "batch/samples_total", "actor/pg_loss", "actor/grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    st = torch.load(tmp_path / "part" / "step_4" / "trainer_state.pt", weights_only=True)
    st_full = torch.load(tmp_path / "full" / "step_4" / "trainer_state.pt", weights_only=True)
    assert st["data"] == st_full["data"] and st["step"] == 4
    # the wall time goes on from the checkpoint's: steps 1-2's session is counted, not only the last one's
    st2 = torch.load(tmp_path / "part" / "step_2" / "trainer_state.pt", weights_only=True)
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert 0 < st2["wall_s"] < rows["part"][2]["time/wall"] < st["wall_s"] <= summary["wall_s"] <= resumed.wall_s
    a = load_file(str(tmp_path / "full" / "step_4" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "step_4" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_a_run_stopped_mid_way_says_which_checkpoint_it_keeps(tiny_model_dir, tmp_path):
    """A second Ctrl-C (KeyboardInterrupt out of the loop, after step 3 is logged, before its checkpoint): the
    run is kept and the command line is told its newest complete checkpoint and how to continue."""
    def stop_at_3(step, m):
        if step == 3:
            raise KeyboardInterrupt

    cfg = load_config(overrides=["ckpt.every=2", "ckpt.keep_last=5", *TINY_RUN, "optim.steps=4",
                                 f"model.path={tiny_model_dir}", f"log.out_dir={tmp_path}", "log.run_name=r"])
    with pytest.raises(KeyboardInterrupt) as info:
        train(cfg, on_step=stop_at_3)
    run = tmp_path / "r"
    assert info.value.dapo_hint == (f"{run} keeps its last complete checkpoint, step_2; continue with: dapo train "
                                    f"--resume {run}")
    assert (run / "step_2" / "manifest.json").exists() and not (run / "step_3").exists()


def test_resume_from_an_older_checkpoint_branches_and_never_overwrites_the_newer_ones(tiny_model_dir, tmp_path, capsys):
    from dapo.model import SetupError

    common = ["algo.filter_metric=reward", "optim.lr=1e-2", "ckpt.every=2", "ckpt.keep_last=5", *TINY_RUN,
              f"model.path={tiny_model_dir}", f"log.out_dir={tmp_path}", "optim.steps=4"]
    train(load_config(overrides=common + ["log.run_name=src"]))
    src = tmp_path / "src"

    def snapshot():
        return {str(q.relative_to(src)): q.read_bytes() for q in sorted(src.rglob("*")) if q.is_file()}

    before = snapshot()
    assert "step_4/model.safetensors" in before and "step_2/model.safetensors" in before
    with pytest.raises(SetupError, match=r"newer checkpoints \(step_4\).*log.run_name="):
        train(load_config(overrides=common + [f"ckpt.resume={src / 'step_2'}"]))
    assert snapshot() == before
    res = train(load_config(overrides=common + [f"ckpt.resume={src / 'step_2'}", "log.run_name=branch"]))
    assert res.run_dir == tmp_path / "branch" and res.steps == 4
    assert snapshot() == before  # the source run is untouched, byte for byte
    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("src", "branch")}
    assert [r["step"] for r in rows["branch"]] == [1, 2, 3, 4]
    assert rows["branch"][:2] == rows["src"][:2]  # the source's lines up to the checkpoint, copied
    for a, b in zip(rows["src"][2:], rows["branch"][2:]):  # then the same steps again, from the same state
        for k in ("rollout/reward", "batch/samples_total", "actor/pg_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert sorted(q.name for q in (tmp_path / "branch").glob("step_*")) == ["step_4"]
    with pytest.raises(SetupError, match="already exists and is not empty"):  # a branch never reuses a directory
        train(load_config(overrides=common + [f"ckpt.resume={src / 'step_2'}", "log.run_name=branch"]))
    # from the command line, on a run moved elsewhere (its saved config still names tmp_path/src): the saved
    # run name does not count as naming another run, so an older checkpoint is refused; a new name branches
    import shutil

    from dapo.cli import main as cli_main

    moved = tmp_path / "elsewhere" / "src"
    shutil.copytree(src, moved)
    moved_files = {str(q.relative_to(moved)): q.read_bytes() for q in sorted(moved.rglob("*")) if q.is_file()}
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(moved / "step_2")]) == 2
    assert "newer checkpoints (step_4)" in capsys.readouterr().err
    assert cli_main(["train", "--resume", str(moved / "step_2"), "log.run_name=cli_branch"]) == 0
    assert {str(q.relative_to(moved)): q.read_bytes() for q in sorted(moved.rglob("*")) if q.is_file()} == moved_files
    assert [json.loads(x)["step"] for x in (tmp_path / "cli_branch" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_existing_run_dir_is_never_overwritten(tiny_model_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc = cli_main(["train", "--model", str(tiny_model_dir), f"log.out_dir={tmp_path}", "log.run_name=mine", *TINY_RUN])
    assert rc == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_contention_warning_only_when_threads_would_spin_on_a_busy_cpu():
    from dapo.cpu import contention_warning

    def never():
        raise AssertionError("the idle fraction is sampled only when spinning is possible")

    busy = contention_warning(threads=2, cores=2, idle=lambda: 0.4, env={})  # 1.2 cores busy elsewhere
    assert busy and "OMP_WAIT_POLICY=PASSIVE" in busy and "1.2 of 2 cores" in busy
    assert contention_warning(threads=2, cores=2, idle=lambda: 0.9, env={}) is None  # idle machine
    assert contention_warning(threads=1, cores=2, idle=never, env={}) is None  # one thread cannot spin
    assert contention_warning(threads=2, cores=2, idle=never, env={"OMP_WAIT_POLICY": "PASSIVE"}) is None  # user chose


def _zero_adv_batch(tiny_model_dir, tmp_path, *extra):
    from dapo.trainer.build import build_run
    from dapo.learner import TrainBatch

    cfg = load_config(overrides=[*TINY_RUN, f"model.path={tiny_model_dir}", "optim.micro_batch_size=3", *extra])
    run = build_run(cfg, tmp_path, None, log=lambda s: None)
    G, P = cfg.rollout.group_size, 4
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13]]
    comps = run.engine.generate(prompts, SamplingParams(n=G, max_new_tokens=6), list(range(P)))
    adv = torch.randn(P * G, generator=torch.Generator().manual_seed(0))
    adv[:G] = 0.0  # an all-equal group
    adv[2 * G + 1] = 0.0  # one response at its group's mean
    keep = torch.ones(P * G)
    keep[3] = 0.0  # a zero-advantage response that is also masked out (overlong)
    fb = TrainBatch.of([prompts[c.prompt_index] for c in comps], [c.token_ids for c in comps], [c.logprobs for c in comps],
                       [True] * len(comps), adv, keep)
    old = fb.responses.like(torch.cat([c.logprobs - 0.1 * ((i + torch.arange(len(c.logprobs))) % 3)
                                       for i, c in enumerate(comps)]))  # ratio != 1
    return cfg, run.learner, fb, old


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_zero_advantage_responses_skip_the_backward_with_the_same_gradient_and_metrics(tiny_model_dir, tmp_path, agg):
    from dataclasses import replace

    cfg, learner, fb, old = _zero_adv_batch(tiny_model_dir, tmp_path, f"algo.loss_agg={agg}")
    calls = []  # (rows, autograd on) per forward
    forward = learner.policy.forward
    learner.policy.forward = lambda sb, *a: calls.append((sb.input_ids.shape[0], torch.is_grad_enabled())) or forward(sb, *a)
    idx = list(range(len(fb.responses)))  # one mini-batch of every response
    out = {}
    for skip in (False, True):
        learner.cfg = replace(cfg, optim=replace(cfg.optim, skip_zero_adv=skip))
        learner.model.zero_grad(set_to_none=True)
        calls.clear()
        loss, sums = learner.minibatch_backward(fb, old, idx, with_entropy=True)
        grads = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
        out[skip] = (loss, sums, grads, list(calls))
    (l0, s0, g0, c0), (l1, s1, g1, c1) = out[False], out[True]
    assert [r for r, grad in c0 if grad] and not [r for r, grad in c0 if not grad]
    assert sum(r for r, grad in c1 if not grad) == 4 and sum(r for r, grad in c1 if grad) == 11  # 16 - 5 zero - 1 masked
    assert abs(l0 - l1) < 1e-6
    assert s0.keys() == s1.keys() and {"entropy", "approx_kl", "ratio_mean", "clipfrac_high"} <= s0.keys()
    for k in s0:  # the metrics count the skipped responses' tokens as before
        assert s1[k] == pytest.approx(s0[k], rel=1e-5, abs=1e-6), k
    assert s0["approx_kl"] > 1e-3
    assert max(g.abs().max() for g in g0.values()) > 1e-3
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)


def test_zero_advantage_skip_is_off_with_kl_and_when_the_whole_mini_batch_is_zero(tiny_model_dir, tmp_path):
    from dapo.learner.learner import zero_advantage_rows

    cfg, learner, fb, old = _zero_adv_batch(tiny_model_dir, tmp_path)
    rows = list(range(len(fb.responses)))
    assert zero_advantage_rows(fb, rows, cfg) == [0, 1, 2, 3, 9]
    cfg_kl, *_ = _zero_adv_batch(tiny_model_dir, tmp_path / "kl", "algo.kl_coef=0.1")
    assert zero_advantage_rows(fb, rows, cfg_kl) == []  # the KL term gives them a gradient
    assert zero_advantage_rows(fb, rows[:4], cfg) == []  # all zero: run as usual
    assert zero_advantage_rows(fb, rows[8:12], cfg) == [9] and zero_advantage_rows(fb, rows[8:13], cfg) == []  # < 1/4
    # a mini-batch of nothing but zero advantages still takes its optimiser step, on a zero gradient
    fb.advantages[:] = 0.0
    m = learner.update(fb, old, step=1)
    assert m["actor/updates"] == 2 and m["actor/grad_norm"] == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in learner.model.parameters())


def test_held_out_accuracy_averages_eval_k_samples_of_each_prompt(tiny_model_dir, tmp_path):
    from dapo.eval import headline
    from dapo.trainer.build import build_run
    from dapo.trainer.loop import held_out_eval

    cfg = load_config(overrides=[*TINY_RUN, f"model.path={tiny_model_dir}", "eval.k=3", "eval.seed=11"])
    run = build_run(cfg, tmp_path, None, log=lambda s: None)
    other = build_run(load_config(overrides=[*TINY_RUN, f"model.path={tiny_model_dir}", "eval.seed=11", "seed=9"]),
                      tmp_path / "b", None, log=lambda s: None)
    items = run.problems.eval_items
    assert [it.example for it in other.problems.eval_items] == [it.example for it in items]  # eval.seed, not seed
    seen = []

    def score(texts, exs):  # "correct" = the example is one of the first three held-out prompts
        seen.extend(exs)
        return _verdicts([e in [it.example for it in items[:3]] for e in exs])

    run.problems.score_fn = score
    res = headline(held_out_eval(run))
    assert (res["n"], res["k"]) == (8, 3) and len(seen) == 24
    assert all(seen.count(it.example) == 3 for it in items)  # each prompt's own k responses
    assert res["accuracy"] == pytest.approx(9 / 24)


def test_tensorboard_hides_the_steps_a_resume_logs_again(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dapo.trainer.logger import RunLogger

    from dapo.config import LogConfig

    quiet = LogConfig(progress="none")
    first = RunLogger(tmp_path, 5, quiet)
    for step in range(1, 6):  # the run got to step 5; its newest checkpoint is step 3
        first.log(step, {"rollout/acc": float(step)})
    first.close()
    again = RunLogger(tmp_path, 5, quiet, start_step=3, resumed=True)
    for step in (4, 5):
        again.log(step, {"rollout/acc": 100.0 + step})
    again.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("rollout/acc")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0)]


def test_kl_reference_after_a_resume_is_the_initial_model(tiny_model_dir, tmp_path):
    import shutil

    from dapo.model import SetupError
    from dapo.trainer.build import build_run

    init = tmp_path / "init"
    shutil.copytree(tiny_model_dir, init)
    common = [*TINY_RUN, f"model.path={init}", "algo.kl_coef=0.1", "algo.filter_metric=reward", "optim.lr=1e-2",
              "ckpt.every=2", f"log.out_dir={tmp_path}", "log.run_name=r"]
    train(load_config(overrides=common + ["optim.steps=2"]))
    cfg = load_config(overrides=common + ["optim.steps=4"])
    run = build_run(cfg, tmp_path / "r", tmp_path / "r" / "step_2", log=lambda s: None)
    first, ckpt = load_file(str(init / "model.safetensors")), load_file(str(tmp_path / "r" / "step_2" / "model.safetensors"))
    ref, policy = run.learner.ref_model.state_dict(), run.learner.model.state_dict()
    moved = [k for k in first if not torch.equal(first[k], ckpt[k])]
    assert len(moved) > len(first) // 2  # training moved the policy away from its start ...
    assert all(torch.equal(ref[k], first[k]) for k in first)  # ... the reference stays at the start
    assert all(torch.equal(policy[k], ckpt[k]) for k in ckpt)
    shutil.rmtree(init)
    with pytest.raises(SetupError, match="KL reference is the run's initial model"):
        build_run(cfg, tmp_path / "r", tmp_path / "r" / "step_2", log=lambda s: None)


def test_the_last_periodic_eval_equals_the_summarys_after(tiny_model_dir, tmp_path):
    """One evaluator, one seed derivation: the same weights measured at the last step (eval.every) and after
    training give the same number, and the before/after use the same k and prompts."""
    cfg = load_config(overrides=[*TINY_RUN, f"model.path={tiny_model_dir}", "algo.filter_metric=reward", "optim.lr=1e-2",
                                 "optim.steps=4", "eval.every=2", "eval.k=3", f"log.out_dir={tmp_path}",
                                 "log.run_name=r", "log.report=false"])
    res = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [("eval/acc" in r) for r in rows] == [False, True, False, True]
    assert rows[-1]["eval/acc"] == res.after["accuracy"] and rows[-1]["eval/avg@3"] == res.after["accuracy"]
    assert res.before["k"] == res.after["k"] == 3 and res.before["n"] == res.after["n"] == 8
    assert {"eval/pass@3", "eval/maj@3", "eval/len_mean"} <= set(rows[-1])
