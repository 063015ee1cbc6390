"""Scaling out on a real local Ray cluster (127.0.0.1 only): 2 rollout workers and 2 trainer ranks
(gloo, CPU) train the tiny-model task; ranks stay in step, their summed gradient is the single-process
gradient, workers sample with the latest weights, and a killed worker is replaced or reported.

One cluster and one 2+2 run serve the module (actors take seconds each to start on a small machine);
the FSDP2 ranks and the colocated run with a resume are marked slow: they run in the whole suite too,
and alone with pytest -m slow.
"""
import os
from dataclasses import replace
import signal
import time
from types import SimpleNamespace

import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import TINY_RUN  # noqa: E402
from dapo.algo import group_advantages  # noqa: E402
from dapo.config import ConfigError, load_config  # noqa: E402
from dapo.distributed import Cluster, DistError, RankGroup, split_evenly, start_local_ray  # noqa: E402
from dapo.rollout import HFEngine, SamplingParams  # noqa: E402
from dapo.model import load_model, make_optimizer  # noqa: E402
from dapo.trainer.build import build_run  # noqa: E402
from dapo.trainer.loop import train  # noqa: E402
from dapo.trainer.run import resolve_run_dir  # noqa: E402
from dapo.learner import LocalLearner, TrainBatch, whole_tensor  # noqa: E402

STEPS = 3
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15], [16, 17, 18]]


def _cfg(tiny_model_dir, out_dir, name, *extra):
    return load_config(overrides=[*TINY_RUN, f"model.path={tiny_model_dir}", f"log.out_dir={out_dir}",
                                  f"log.run_name={name}", "algo.filter_metric=reward", "optim.lr=1e-2",
                                  "dist.timeout_s=600", *extra])


@pytest.fixture(scope="module")
def cluster():
    assert not ray.is_initialized()
    start_local_ray(num_cpus=8)  # logical CPUs: room for the run's 4 actors and 2 more
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run(cluster, tiny_model_dir, tmp_path_factory):
    """A 3-step 2+2 run whose workers and ranks stay up for the tests below (closed at the end)."""
    cfg = _cfg(tiny_model_dir, tmp_path_factory.mktemp("dist"), "r", f"optim.steps={STEPS}",
               "dist.rollout_workers=2", "dist.trainer_ranks=2", "dist.worker_restarts=1")
    built = build_run(cfg, *resolve_run_dir(cfg))
    history = []
    try:
        result = train(cfg, on_step=lambda step, m: history.append(dict(m)), run=built)
        yield SimpleNamespace(cfg=cfg, run=built, result=result, history=history)
    finally:
        built.close()


def _batch(engine, cfg, n_prompts=4):
    """A real rollout from ``engine`` laid out as the update reads it; one response masked out."""
    G = cfg.rollout.group_size
    comps = engine.generate(PROMPTS[:n_prompts], SamplingParams(n=G, max_new_tokens=8), [101 + i for i in range(n_prompts)])
    rewards = torch.tensor([1.0 if (len(c.token_ids) + k) % 3 else -1.0 for k, c in enumerate(comps)])
    keep = torch.ones(len(comps))
    keep[1] = 0.0
    return comps, TrainBatch.of([PROMPTS[c.prompt_index] for c in comps], [c.token_ids for c in comps],
                                [c.logprobs for c in comps], [True] * len(comps), group_advantages(rewards, G), keep)


def _local(cfg, tiny_model_dir, state):
    """The single-process side: the same weights in this process, rank 0 of 1."""
    model = load_model(cfg.model, str(tiny_model_dir), torch.device("cpu"))
    model.load_state_dict(state)
    opt, sched = make_optimizer(cfg.optim, model)
    return LocalLearner(cfg, model, opt, sched, pad_id=0, device=torch.device("cpu"))


def _ranks_gradient(group, batch, old, idx, cfg=None):
    """The summed gradient of one mini-batch (``idx``: all ranks' responses) as the ranks hold it after
    their all-reduce, whole, from rank 0: run on each rank actor with Ray's ``__ray_call__`` (with ``cfg``
    in place of the ranks' own config for the call, when given)."""

    def on_rank(rank, batch, old, idx, cfg):
        lr = rank.learner
        own, lr.cfg = lr.cfg, cfg or lr.cfg
        lr.optimizer.zero_grad(set_to_none=True)
        lr.model.train()
        lr.minibatch_backward(batch, old, idx)
        lr.dp.reduce_grads(lr.model)
        grads = {n: whole_tensor(q.grad).detach().cpu().clone() for n, q in lr.model.named_parameters()
                 if q.grad is not None}
        lr.optimizer.zero_grad(set_to_none=True)
        lr.cfg = own
        return grads

    return ray.get([a.__ray_call__.remote(on_rank, batch, old, idx, cfg) for a in group.actors])[0]


def test_cluster_binds_to_loopback_and_splits_prompts_evenly(cluster):
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert split_evenly(5, 2) == [(0, 3), (3, 5)] and split_evenly(1, 3) == [(0, 1), (1, 1), (1, 1)]


def test_ranks_stay_identical_and_workers_use_the_latest_weights(run, tiny_model_dir):
    from safetensors.torch import load_file

    assert len(run.history) == STEPS
    pushes = 0
    for step, m in enumerate(run.history, 1):
        assert m["batch/groups"] > 0, f"step {step} trained on nothing"
        assert m["dist/param_sync_err"] == 0.0, (step, m["dist/param_sync_err"])  # bit-identical replicas
        assert m["rollout/weight_version"] == pushes, step  # sampled by the weights of the previous update
        pushes += 1
    engine = run.run.engine
    assert engine.weight_version == pushes
    assert [ray.get(w.info.remote())["version"] for w in engine.workers] == [pushes, pushes]
    # the workers hold exactly the trained weights: an in-process engine on them samples the same tokens
    state = run.run.learner.full_state_dict()
    local = _local(run.cfg, tiny_model_dir, state).model
    params = SamplingParams(n=4, max_new_tokens=8)
    seeds = [7, 8, 9, 10, 11]
    remote = engine.generate(PROMPTS, params, seeds)
    here = HFEngine(local, 0, [1]).generate(PROMPTS, params, seeds)
    assert [c.token_ids.tolist() for c in remote] == [c.token_ids.tolist() for c in here]
    assert {c.weight_version for c in remote} == {pushes}
    # training moved the weights, and rank 0 wrote them as the final checkpoint
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert sum(not torch.equal(base[k], state[k]) for k in base) > len(base) // 2
    saved = load_file(str(run.result.run_dir / f"step_{STEPS}" / "model.safetensors"))
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert "accuracy" in run.result.after


def _same_optimizer_state(a, b):
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, st in a["state"].items():
        assert st.keys() == b["state"][i].keys()
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k])), (i, k)


def test_rank_checkpoint_keeps_the_optimizer_out_of_the_driver_and_loads_anywhere(run, tiny_model_dir):
    """Rank 0 writes the AdamW state into the checkpoint itself (optimizer.pt, the single-process layout),
    not through the driver's trainer_state.pt; the ranks load it back from the file, and so does a run of
    one process (a resume with another number of ranks)."""
    from dapo.learner.state import OPTIMIZER_FILE
    from dapo.trainer.checkpoint import is_complete, load_trainer_state

    ckpt = run.result.run_dir / f"step_{STEPS}"
    raw = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert "optimizer" not in raw and raw["optimizer_file"] == OPTIMIZER_FILE
    assert is_complete(ckpt, verify=True)  # the manifest covers the optimiser file too
    saved = torch.load(ckpt / OPTIMIZER_FILE, weights_only=True)
    on_rank = ray.get(run.run.learner.actors[0].__ray_call__.remote(lambda r: r.learner.optimizer.state_dict()))
    _same_optimizer_state(saved, on_rank)
    assert len(saved["state"]) == len(list(load_model(run.cfg.model, str(tiny_model_dir), torch.device("cpu")).parameters()))
    # the ranks restore from the file: scribble on their moments first, then load
    scribble = lambda r: [s.__setitem__("exp_avg", s["exp_avg"] + 1) for s in r.learner.optimizer.state.values()]  # noqa: E731
    ray.get([a.__ray_call__.remote(scribble) for a in run.run.learner.actors])
    state = load_trainer_state(ckpt)
    run.run.learner.load_state_dict(state)
    for a in run.run.learner.actors:
        _same_optimizer_state(saved, ray.get(a.__ray_call__.remote(lambda r: r.learner.optimizer.state_dict())))
    # and one process takes it as its own
    one = _local(run.cfg, tiny_model_dir, run.run.learner.full_state_dict())
    one.load_state_dict(state)
    _same_optimizer_state(saved, one.optimizer.state_dict())
    # a missing optimiser file is named, not a KeyError deep in a resume
    (ckpt / OPTIMIZER_FILE).rename(ckpt / "moved.pt")
    try:
        with pytest.raises(ValueError, match="optimizer.pt.*does not exist"):
            load_trainer_state(ckpt)
    finally:
        (ckpt / "moved.pt").rename(ckpt / OPTIMIZER_FILE)


@pytest.mark.parametrize("preset", ["dapo", "gspo", "cispo", "drgrpo", "rloo"])
def test_two_rank_gradient_equals_single_process_gradient(run, tiny_model_dir, preset):
    """Each loss variant's gradient summed over two ranks is the single-process gradient (the global
    denominators: tokens for token-mean, responses for the seq-mean modes)."""
    from dataclasses import replace

    cfg = load_config(preset)
    cfg = replace(run.cfg, preset=preset, algo=cfg.algo)
    local = _local(cfg, tiny_model_dir, run.run.learner.full_state_dict())
    _, fb = _batch(run.run.engine, cfg)
    old = local.old_logp(fb)
    old_dist = run.run.learner.old_logp(fb)
    assert torch.equal(old.offsets, fb.responses.offsets) and torch.equal(old_dist.offsets, fb.responses.offsets)
    assert (old.values - old_dist.values).abs().max() < 1e-5
    idx = list(range(len(fb.responses)))  # one optimiser step over every response: 8 per rank
    g_dist = _ranks_gradient(run.run.learner, fb, old, idx, cfg)
    local.minibatch_backward(fb, old, idx)
    g_one = {n: p.grad for n, p in local.model.named_parameters() if p.grad is not None}
    assert g_dist.keys() == g_one.keys() and len(g_one) > 10
    for k in g_one:
        torch.testing.assert_close(g_dist[k], g_one[k], atol=1e-5, rtol=0)
    assert max(g.abs().max() for g in g_one.values()) > 1e-3  # a real gradient, not zeros on both sides


def test_ranks_that_sample_themselves_use_their_own_weights_and_no_recompute(cluster, tiny_model_dir, tmp_path):
    """dist.rollout_on_ranks: no rollout workers and no weights in the driver; the ranks sample with the
    weights they train (the same tokens as an engine on the gathered weights), and their log-probs are the
    old policy's, so the old log-prob pass returns them unchanged."""
    from dapo.distributed.ranks import RankEngine

    cfg = _cfg(tiny_model_dir, tmp_path, "h", f"optim.steps={STEPS}", "dist.trainer_ranks=2", "dist.rollout_on_ranks=true")
    built = build_run(cfg, *resolve_run_dir(cfg))
    history = []
    try:
        train(cfg, on_step=lambda step, m: history.append(dict(m)), run=built)
        assert isinstance(built.engine, RankEngine) and isinstance(built.learner, RankGroup)  # no model here
        assert [m["rollout/weight_version"] for m in history] == list(range(STEPS))
        assert all(m["dist/param_sync_err"] == 0.0 and m["batch/groups"] > 0 for m in history)
        assert built.engine.weight_version == STEPS
        local = _local(cfg, tiny_model_dir, built.learner.full_state_dict())
        params, seeds = SamplingParams(n=4, max_new_tokens=8), [7, 8, 9, 10, 11]
        remote = built.engine.generate(PROMPTS, params, seeds)  # 3 prompts on rank 0, 2 on rank 1
        here = HFEngine(local.model, 0, [1]).generate(PROMPTS, params, seeds)
        assert [c.token_ids.tolist() for c in remote] == [c.token_ids.tolist() for c in here]
        assert [c.prompt_index for c in remote] == [c.prompt_index for c in here]
        assert {c.weight_version for c in remote} == {STEPS}
        _, fb = _batch(built.engine, cfg)
        assert torch.equal(built.learner.old_logp(fb).values, fb.behaviour_logp.values)  # not recomputed ...
        recomputed = local.old_logp(fb)  # ... and what a recompute would give, to rounding
        assert (recomputed.values - fb.behaviour_logp.values).abs().max() < 1e-5
    finally:
        built.close()


def test_a_nan_rollout_with_ranks_does_not_block_later_checkpoints(cluster, tiny_model_dir, tmp_path, capsys):
    """The loop counts rollouts with NaN log-probs, the ranks count non-finite updates: a NaN rollout at
    step 2 skips that step's update and checkpoint, and the checkpoints after it are written again."""
    cfg = _cfg(tiny_model_dir, tmp_path, "n", "optim.steps=4", "dist.trainer_ranks=2", "ckpt.every=1",
               "ckpt.keep_last=5")
    built = build_run(cfg, *resolve_run_dir(cfg))
    generate, calls = built.engine.generate, []

    def nan_on_step_2(prompts, params, seeds):
        comps = generate(prompts, params, seeds)
        calls.append(len(comps))
        if len(calls) == 2:  # the second generation round is step 2's (TINY_RUN refills at most once per step)
            for c in comps:
                c.logprobs = torch.full_like(c.logprobs, float("nan"))
        return comps

    built.engine.generate = nan_on_step_2
    history = []
    try:
        train(cfg, on_step=lambda step, m: history.append(dict(m)), run=built)
        # the weights a checkpoint would save are checked on the ranks, where they are
        assert built.learner.nonfinite_params() == []

        def spoil(rank):
            with torch.no_grad():
                rank.learner.model.model.norm.weight[0] = float("nan")

        ray.get(built.learner.actors[1].__ray_call__.remote(spoil))
        assert built.learner.nonfinite_params() == ["model.norm.weight"]
    finally:
        built.close()
    from dapo.trainer.checkpoint import list_checkpoints

    nan_steps = [i + 1 for i, m in enumerate(history) if m["rollout/nan_logprob_frac"]]
    assert nan_steps and nan_steps[0] < 4
    saved = [s for s, _ in list_checkpoints(tmp_path / "n")]
    assert nan_steps[0] not in saved and saved[-1] == 4 and all(s in saved for s in range(nan_steps[0] + 1, 5))


@pytest.mark.slow
def test_fsdp_ranks_shard_and_match_the_single_process_step(run, tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, "unused", "fsdp", "dist.trainer_ranks=2", "dist.fsdp=true", "optim.micro_batch_size=3")
    cl = Cluster(cfg.dist)
    ranks = RankGroup(cfg, str(tiny_model_dir), 0, cl)
    try:
        local = _local(cfg, tiny_model_dir, ranks.full_state_dict())
        _, fb = _batch(run.run.engine, cfg)
        old = local.old_logp(fb)
        idx = list(range(len(fb.responses)))
        g_dist = _ranks_gradient(ranks, fb, old, idx)
        local.minibatch_backward(fb, old, idx)
        for n, p in local.model.named_parameters():
            torch.testing.assert_close(g_dist[n], p.grad, atol=1e-5, rtol=0)
        # with observation tokens masked out (a multi-turn batch): the global token count is of the model's tokens
        g = torch.Generator().manual_seed(3)
        fm = replace(fb, token_mask=fb.responses.like((torch.rand(len(fb.responses.values), generator=g) < 0.6).float()))
        assert 0 < fm.token_mask.values.sum() < len(fm.token_mask.values)
        g_whole, g_dist = g_dist, _ranks_gradient(ranks, fm, old, idx)
        assert max((g_dist[n] - g_whole[n]).abs().max() for n in g_dist) > 1e-3  # the mask changes the gradient
        local.optimizer.zero_grad(set_to_none=True)
        local.minibatch_backward(fm, old, idx)
        for n, p in local.model.named_parameters():
            torch.testing.assert_close(g_dist[n], p.grad, atol=1e-5, rtol=0)
        local.optimizer.zero_grad(set_to_none=True)
        # a whole update (2 optimiser steps, sharded AdamW state) lands on the same weights
        local.optimizer.zero_grad(set_to_none=True)
        m_one = local.update(fb, old, step=1)
        m_dist = ranks.update(fb, old, step=1)
        assert m_dist["actor/updates"] == m_one["actor/updates"] == 2
        assert m_dist["actor/loss_tokens"] == m_one["actor/loss_tokens"]
        sharded = ranks.full_state_dict()
        for k, v in local.model.state_dict().items():  # AdamW divides by sqrt(v): where a gradient is ~0,
            torch.testing.assert_close(sharded[k], v, atol=1e-2 * cfg.optim.lr, rtol=0)  # 1e-8 noise moves ~lr
        # the sharded AdamW state, gathered by rank 0 into the checkpoint's file, is the single-process one;
        # the ranks load it back into their shards
        from dapo.learner.state import OPTIMIZER_FILE

        ckpt = tmp_path / "step_1"
        ckpt.mkdir()
        ranks.save_pretrained(ckpt)
        from safetensors import safe_open

        from dapo.model import save_model

        save_model(local.model, tmp_path / "one")  # the model file has the tensors a single process writes
        with safe_open(str(ckpt / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as b:
            assert set(a.keys()) == set(b.keys())
        saved = torch.load(ckpt / OPTIMIZER_FILE, weights_only=True)
        mine = local.optimizer.state_dict()
        assert saved["state"].keys() == mine["state"].keys()
        for i, st in mine["state"].items():
            torch.testing.assert_close(saved["state"][i]["exp_avg"], st["exp_avg"], atol=1e-6, rtol=1e-4)
        ranks.load_state_dict({**ranks.state_dict(), "optimizer_file": str(ckpt / OPTIMIZER_FILE)})
        (ckpt / OPTIMIZER_FILE).unlink()
        ranks.save_pretrained(ckpt)
        again = torch.load(ckpt / OPTIMIZER_FILE, weights_only=True)
        for i, st in saved["state"].items():
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(again["state"][i][k])) for k, v in st.items())
    finally:
        ranks.close()
        cl.close()


def _prompt_pattern_batch(pattern: str, n=16, T=5):
    """``n`` responses of equal length (so micro-batches keep index order) whose prompts make the strided
    rank shares differ: rank 0 (even rows) always has one prompt; rank 1 (odd rows) has a distinct prompt per
    row ("diverging": one rank would share the prompt prefill, the other not) or also one ("shared")."""
    g = torch.Generator().manual_seed(11)
    prompts = [[5, 6, 7] if i % 2 == 0 or pattern == "shared" else [8 + i, 9, 10 + i] for i in range(n)]
    resps = [torch.randint(4, 60, (T,), generator=g) for _ in range(n)]
    beh = [-2.0 - torch.rand(T, generator=g) for _ in range(n)]
    return TrainBatch.of(prompts, resps, beh, [True] * n, torch.randn(n, generator=g), torch.ones(n))


@pytest.mark.slow
def test_fsdp_ranks_issue_the_same_collectives_when_their_prompts_differ(cluster, tiny_model_dir):
    """The shared-prompt prefill runs the decoder twice; decided per rank, FSDP ranks whose micro-batches differ
    would issue different all-gathers (mixed blocks, then a hang). The plan decides for all ranks at once: the
    2-rank old log-probs and gradients equal one process's at micro-batches of 2-4."""
    cfg = _cfg(tiny_model_dir, "unused", "fsdp-div", "dist.trainer_ranks=2", "dist.fsdp=true", "dist.timeout_s=90",
               "optim.micro_batch_size=2")
    cl = Cluster(cfg.dist)
    ranks = RankGroup(cfg, str(tiny_model_dir), 0, cl)
    try:
        local = _local(cfg, tiny_model_dir, ranks.full_state_dict())
        for pattern in ("diverging", "shared"):
            fb = _prompt_pattern_batch(pattern)
            idx = list(range(len(fb.responses)))
            for size in (2, 3, 4):
                c = replace(cfg, optim=replace(cfg.optim, micro_batch_size=size))
                local.cfg = c
                old = local.old_logp(fb)
                if size == 2:  # the ranks' own config: their old log-probs are one process's
                    torch.testing.assert_close(ranks.old_logp(fb).values, old.values, atol=1e-5, rtol=0)
                g_dist = _ranks_gradient(ranks, fb, old, idx, c)
                local.model.zero_grad(set_to_none=True)
                local.minibatch_backward(fb, old, idx)
                for n, p in local.model.named_parameters():
                    torch.testing.assert_close(g_dist[n], p.grad, atol=1e-5, rtol=0, msg=f"{pattern}, {size}: {n}")
        # the batch crosses to the ranks once a step: the update after old log-probs sends only the
        # correction's weights, which the ranks apply to the batch they kept (here: 4 responses dropped)
        old = ranks.old_logp(fb)
        w = fb.responses.like((torch.arange(len(fb.responses.values)) >= int(fb.responses.offsets[4])).float())
        m_dist = ranks.update(fb.weighted(w), old, step=1)
        assert ray.get(ranks.actors[1].__ray_call__.remote(lambda r: r._batch)) is None  # not kept past the step
        local.cfg = cfg
        m_one = local.update(fb.weighted(w), old, step=1)
        assert m_dist["actor/loss_tokens"] == m_one["actor/loss_tokens"] == float(fb.loss_tokens().sum()) - 4 * 5
    finally:
        ranks.close()
        cl.close()


def test_killed_rollout_worker_is_replaced_then_reported(run):
    """Runs last on the module's run: it kills its workers."""
    engine = run.run.engine
    params = SamplingParams(n=4, max_new_tokens=8)
    want = engine.generate(PROMPTS, params, [1, 2, 3, 4, 5])
    os.kill(ray.get(engine.workers[1].info.remote())["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    got = engine.generate(PROMPTS, params, [1, 2, 3, 4, 5])  # worker 1 replaced, with the latest weights
    assert time.monotonic() - t0 < 90 and engine.restarts == 1
    assert [c.token_ids.tolist() for c in got] == [c.token_ids.tolist() for c in want]
    assert {c.weight_version for c in got} == {engine.weight_version}
    os.kill(ray.get(engine.workers[0].info.remote())["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(DistError, match=r"rollout worker 0 of 2 .*died.*dist.worker_restarts"):
        engine.generate(PROMPTS, params, [1, 2, 3, 4, 5])  # no restarts left: a clear error, not a hang
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_colocated_run_resumes_with_optimizer_state_and_weight_version(cluster, tiny_model_dir, tmp_path):
    common = ["dist.rollout_workers=2", "dist.trainer_ranks=2", "dist.colocate=true", "ckpt.every=1"]
    first = train(_cfg(tiny_model_dir, tmp_path, "c", "optim.steps=2", *common))
    assert first.steps == 2 and (tmp_path / "c" / "step_2" / "trainer_state.pt").exists()
    hist = []
    more = train(_cfg(tiny_model_dir, tmp_path, "c", "optim.steps=3", f"ckpt.resume={tmp_path / 'c'}", *common),
                 on_step=lambda s, m: hist.append(m))
    assert more.steps == 3 and len(hist) == 1
    assert hist[0]["rollout/weight_version"] == 2 and hist[0]["dist/param_sync_err"] == 0.0


def test_dist_settings_that_cannot_apply_are_rejected():
    with pytest.raises(ConfigError, match="dist.fsdp"):
        load_config(overrides=["dist.fsdp=true"])
    with pytest.raises(ConfigError, match="dist.colocate"):
        load_config(overrides=["dist.colocate=true", "dist.rollout_workers=2"])
    with pytest.raises(ConfigError, match="dist.timeout_s"):
        load_config(overrides=["dist.timeout_s=0"])
    with pytest.raises(ConfigError, match="dist.rollout_on_ranks"):
        load_config(overrides=["dist.rollout_on_ranks=true"])  # one rank: nothing to sample on
    with pytest.raises(ConfigError, match="dist.rollout_on_ranks"):
        load_config(overrides=["dist.rollout_on_ranks=true", "dist.trainer_ranks=2", "dist.fsdp=true"])


def test_vllm_engine_without_vllm_says_how_to_get_it(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    from dapo.cli import main as cli_main
    from dapo.rollout.vllm import VLLMEngine

    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMEngine(str(tiny_model_dir), 0, [1], load_config())
    rc = cli_main(["train", "--model", str(tiny_model_dir), f"log.out_dir={tmp_path}", "rollout.engine=vllm", *TINY_RUN])
    assert rc == 2 and "rollout.engine=vllm needs vLLM" in capsys.readouterr().err


def test_one_step_off_async_samples_with_the_previous_weights_and_resumes_exactly(cluster, tiny_model_dir, tmp_path):
    """dist.async_steps=1: step N+1 is sampled while step N updates, so its samples carry the weights that
    sampled step N (version N-1); a checkpoint between the two carries the rollout collected ahead, and the
    resumed run goes on exactly as the uninterrupted one."""
    common = ["dist.rollout_workers=1", "dist.async_steps=1", "ckpt.every=1", "ckpt.keep_last=5", "log.report=false"]
    hist = []
    train(_cfg(tiny_model_dir, tmp_path, "full", "optim.steps=4", *common), on_step=lambda s, m: hist.append(m))
    assert [m["rollout/weight_version"] for m in hist] == [0, 0, 1, 2]
    assert all(m["mismatch/logp_abs_diff"] == 0.0 for m in hist)  # the old policy is the sampler's own
    stop_at_2 = lambda s, m: s == 2 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731  (finish, save, stop)
    train(_cfg(tiny_model_dir, tmp_path, "part", "optim.steps=4", *common), on_step=stop_at_2)
    assert not (tmp_path / "part" / "step_3").exists()
    st = torch.load(tmp_path / "part" / "step_2" / "trainer_state.pt", weights_only=True)
    assert st["rollout_ahead"]["step"] == 3 and st["rollout_ahead"]["groups"]
    train(_cfg(tiny_model_dir, tmp_path, "part", "optim.steps=4", f"ckpt.resume={tmp_path / 'part'}", *common))
    import json

    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("full", "part")}
    assert [r["step"] for r in rows["part"]] == [1, 2, 3, 4]
    for a, b in zip(rows["full"], rows["part"]):
        for k in ("rollout/reward", "rollout/weight_version", "batch/samples_total", "actor/pg_loss", "actor/grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)


def test_async_needs_a_sampler_of_its_own():
    with pytest.raises(ConfigError, match="dist.async_steps"):
        load_config(overrides=["dist.async_steps=1"])
    with pytest.raises(ConfigError, match="dist.async_steps"):
        load_config(overrides=["dist.async_steps=2", "dist.rollout_workers=1"])
    with pytest.raises(ConfigError, match="reward.workers.*time limit"):  # a reward scored off the main thread
        load_config(overrides=["dist.async_steps=1", "dist.rollout_workers=1", "data.path=x.jsonl"])


def test_a_tool_rollout_on_a_ray_worker_is_the_in_process_one(cluster, tool_task, tmp_path):
    """Multi-turn on Ray rollout workers (#26): the turns run in the driver, each one generate call to the workers
    with the whole history re-prefilled there; the tools run in the driver's pool. Token for token the trajectories
    the in-process engine samples with its KV cache across turns."""
    from dapo.distributed import RayEngine
    from dapo.envs import ToolEnv, ToolRunner
    from dapo.items import PromptItem
    from dapo.data.example import Example
    from dapo.model import load_tokenizer
    from dapo.rollout import derive_seed
    from dapo.rollout.multiturn import MultiTurnRollout

    cfg = _cfg(tool_task.dir / "model", tmp_path, "w", *tool_task.args, "dist.rollout_workers=1")
    tok = load_tokenizer(cfg.model, cfg.model.path)
    items = [PromptItem(k, Example(f"{k}+{k + 30}=", "3"), tok(f"{k}+{k + 30}=")["input_ids"]) for k in (11, 24)]
    params = SamplingParams(n=3, max_new_tokens=40)
    seeds = [derive_seed(7, it.uid) for it in items]
    with ToolRunner(tool_task.dir / "tools.py", workers=1) as runner:
        engine = RayEngine(cfg, cfg.model.path, tok.pad_token_id, [tok.eos_token_id], Cluster(cfg.dist))
        try:
            _, remote = MultiTurnRollout(engine, tok, lambda: ToolEnv(runner), max_turns=3).run(items, params, seeds)
        finally:
            engine.close()
        here = HFEngine(load_model(cfg.model, cfg.model.path, torch.device("cpu")), tok.pad_token_id, [tok.eos_token_id])
        _, local = MultiTurnRollout(here, tok, lambda: ToolEnv(runner), max_turns=3).run(items, params, seeds)
    assert [t.turns for t in remote] == [t.turns for t in local] and max(t.turns for t in remote) >= 2
    assert [t.completion.token_ids.tolist() for t in remote] == [t.completion.token_ids.tolist() for t in local]
    assert [t.completion.mask.tolist() for t in remote] == [t.completion.mask.tolist() for t in local]
    assert any("<result>3</result>" in tok.decode(t.completion.token_ids[~t.completion.mask]) for t in remote)
    torch.testing.assert_close(torch.cat([t.completion.logprobs for t in remote]),
                               torch.cat([t.completion.logprobs for t in local]), atol=1e-5, rtol=0)


def test_a_tool_task_trains_with_the_ranks_sampling_its_turns(cluster, tool_task, tmp_path):
    """Multi-turn with dist.rollout_on_ranks: each turn is one generate call to the trainer ranks, a prompt's
    trajectories on one rank, the history re-prefilled there, the tools run in the driver's pool. The run trains
    (tool calls, observation tokens masked with log-prob 0, no recompute of the old log-probs), and after it the
    ranks' trajectories are token for token the in-process engine's (KV cache across turns) on the same weights."""
    from dapo.distributed.ranks import RankEngine
    from dapo.envs import ToolEnv, ToolRunner
    from dapo.items import PromptItem
    from dapo.data.example import Example
    from dapo.model import load_tokenizer
    from dapo.rollout import derive_seed
    from dapo.rollout.multiturn import MultiTurnRollout

    cfg = _cfg(tool_task.dir / "model", tmp_path, "k", *tool_task.args, "dist.trainer_ranks=2",
               "dist.rollout_on_ranks=true", "optim.steps=2", "optim.lr=1e-3", "log.report=false",
               "algo.dynamic_sampling=false", "eval.size=4")
    built = build_run(cfg, *resolve_run_dir(cfg))
    hist = []
    try:
        res = train(cfg, on_step=lambda s, m: hist.append(dict(m)), run=built)
        assert isinstance(built.engine, RankEngine)
        assert 0 <= res.after["accuracy"] <= 1 and res.after["turns_mean"] > 1  # the held-out turns ran there too
        assert [m["rollout/weight_version"] for m in hist] == [0, 1]
        assert all(m["tool/calls"] > 0 and m["env/turns_mean"] > 1 and m["env/obs_tokens"] > 0 for m in hist)
        assert all(m["mismatch/logp_abs_diff"] == 0.0 for m in hist)  # the ranks' log-probs are the old policy's
        obs = [c for g in built.rollouts.sampled for c in g.completions if not c.mask.all()]
        assert obs and all(c.logprobs[~c.mask].eq(0).all() for c in obs)
        tok = load_tokenizer(cfg.model, cfg.model.path)
        items = [PromptItem(k, Example(f"{k}+{k + 30}=", "3"), tok(f"{k}+{k + 30}=")["input_ids"]) for k in (11, 24, 37)]
        params = SamplingParams(n=3, max_new_tokens=40)
        seeds = [derive_seed(7, it.uid) for it in items]
        with ToolRunner(tool_task.dir / "tools.py", workers=1) as runner:
            _, remote = MultiTurnRollout(built.engine, tok, lambda: ToolEnv(runner), max_turns=3).run(items, params,
                                                                                                      seeds)
            local = _local(cfg, tool_task.dir / "model", built.learner.full_state_dict())
            here = HFEngine(local.model, tok.pad_token_id, [tok.eos_token_id])
            _, mine = MultiTurnRollout(here, tok, lambda: ToolEnv(runner), max_turns=3).run(items, params, seeds)
        assert [t.turns for t in remote] == [t.turns for t in mine] and max(t.turns for t in remote) >= 2
        assert [t.completion.token_ids.tolist() for t in remote] == [t.completion.token_ids.tolist() for t in mine]
        assert [t.completion.mask.tolist() for t in remote] == [t.completion.mask.tolist() for t in mine]
        # re-prefilled there, cached here: float32 rounding of two computations on trained weights (3e-5 seen)
        torch.testing.assert_close(torch.cat([t.completion.logprobs for t in remote]),
                                   torch.cat([t.completion.logprobs for t in mine]), atol=1e-4, rtol=0)
    finally:
        built.close()


@pytest.mark.parametrize("async_steps", [0, 1])
def test_a_tool_task_trains_on_a_ray_rollout_worker_in_step_and_one_step_off(cluster, tool_task, tmp_path, async_steps):
    """--tools with a Ray rollout worker: trajectories (turns, tool calls, observation tokens masked) are collected
    at each step, or with dist.async_steps=1 in the background thread while the update runs, from the weights one
    step behind, and a checkpoint between two steps carries those collected ahead with their masks. The trainer's
    recompute of the old log-probs matches the worker's at the model's tokens (the observations' log-probs, 0, are
    never compared)."""
    cfg = _cfg(tool_task.dir / "model", tmp_path, "a", *tool_task.args, "dist.rollout_workers=1",
               f"dist.async_steps={async_steps}", "reward.workers=1", "optim.steps=3", "optim.lr=1e-3", "log.report=false",
               "algo.dynamic_sampling=false", "ckpt.every=1", "ckpt.keep_last=3")
    built = build_run(cfg, *resolve_run_dir(cfg))
    hist = []
    try:
        train(cfg, on_step=lambda s, m: hist.append(dict(m)), run=built)
        comps = [c for g in built.rollouts.sampled for c in g.completions]
    finally:
        built.close()
    assert [m["rollout/weight_version"] for m in hist] == ([0, 0, 1] if async_steps else [0, 1, 2])
    assert all(m["tool/calls"] > 0 and m["env/turns_mean"] > 1 and m["env/obs_tokens"] > 0 for m in hist)
    if async_steps:
        assert all(m["mismatch/logp_abs_diff"] == 0.0 for m in hist)  # the old policy is the sampler's own
    else:
        assert all(0 < m["mismatch/logp_abs_diff"] < 1e-4 for m in hist)  # recomputed: float rounding only
    obs = [c for c in comps if not c.mask.all()]
    assert obs and all(c.logprobs[~c.mask].eq(0).all() for c in obs)
    ahead = torch.load(tmp_path / "a" / "step_2" / "trainer_state.pt", weights_only=True)["rollout_ahead"]
    if async_steps:  # step 3's trajectories, collected during step 2's update
        saved = [c for g in ahead["groups"] for c in g["completions"]]
        assert ahead["step"] == 3 and all("mask" in c for c in saved) and any(not c["mask"].all() for c in saved)
    else:
        assert ahead == {}


def test_pushes_to_bf16_samplers_leave_the_trainer_in_bf16_and_land_as_a_direct_cast(cluster, tiny_model_dir):
    from dapo.distributed.rollout import RolloutWorker, put_chunks
    from dapo.model import tied_copies

    cfg = load_config(overrides=[f"model.path={tiny_model_dir}", "rollout.dtype=bfloat16"])
    trained = load_model(cfg.model, str(tiny_model_dir), torch.device("cpu"))  # float32 master weights, moved
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = trained.state_dict()
    worker = RolloutWorker(cfg, str(tiny_model_dir), 0, [1], use_gpu=False)  # in this process: its engine is here
    dtype = worker.info()["weight_dtype"]
    assert dtype == torch.bfloat16
    fps = {}
    refs, n = put_chunks(sd.items(), 1 << 14, dtype, fps, tied_copies(trained))
    shipped = [ray.get(r) for r in refs]
    assert len(shipped) > 1 and all(t.dtype == torch.bfloat16 for c in shipped for t in c.values())  # half the bytes
    worker.load_weights(refs, n, 1)
    held = worker.engine.model.state_dict()
    assert all(torch.equal(held[k], sd[k].to(torch.bfloat16)) for k in sd)  # exactly a direct cast
    assert worker.weight_mismatch(fps) is None
    with torch.no_grad():
        held["model.layers.0.mlp.up_proj.weight"].mul_(-1)  # what a bad copy would leave
    assert "model.layers.0.mlp.up_proj.weight" in worker.weight_mismatch(fps)


@pytest.mark.slow
def test_a_failed_publish_on_fsdp_rank_0_stops_every_rank_at_once_and_the_group_stays_in_step(cluster, tiny_model_dir):
    """Rank 0 puts the gathered tensors into the object store; when that fails midway (here: on the third tensor)
    the other rank must not wait in the next all-gather until dist.timeout_s: it stops at the same tensor, the
    driver gets rank 0's own error, and a publish afterwards works (every rank issued the same collectives)."""
    cfg = _cfg(tiny_model_dir, "unused", "fsdp-put", "dist.trainer_ranks=2", "dist.fsdp=true", "dist.timeout_s=120")
    cl = Cluster(cfg.dist)
    ranks = RankGroup(cfg, str(tiny_model_dir), 0, cl)

    def arm(rank, on):
        import dapo.distributed.ranks as module

        if not on:
            module.put_chunks = module._real_put_chunks
            return
        module._real_put_chunks = real = module.put_chunks

        def failing(tensors, *args, **kwargs):
            def third_fails():
                for i, x in enumerate(tensors):
                    if i == 2:
                        raise RuntimeError("object store full (injected)")
                    yield x
            return real(third_fails(), *args, **kwargs)

        module.put_chunks = failing

    try:
        ray.get(ranks.actors[0].__ray_call__.remote(arm, True))
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="object store full"):
            ranks.full_state_dict()
        assert ray.get(ranks.actors[1].__ray_call__.remote(lambda r: r.rank), timeout=10) == 1  # not stuck
        assert time.monotonic() - t0 < 30  # not dist.timeout_s
        ray.get(ranks.actors[0].__ray_call__.remote(arm, False))
        sd = ranks.full_state_dict()  # the ranks are still in step: every tensor whole and the model's own
        want = load_model(cfg.model, str(tiny_model_dir), torch.device("cpu")).state_dict()
        assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)
    finally:
        ranks.close()
        cl.close()
