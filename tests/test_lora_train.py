"""LoRA in training (model.lora_*): only adapters train and are checkpointed, the KL reference is the base
with the adapters off, pushes carry adapters only, a LoRA checkpoint resumes, exports and loads as a model,
and Ray workers sample what the in-process engine samples on the same adapters."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from conftest import TINY_RUN  # noqa: E402
from dapo.cli import main as cli_main  # noqa: E402
from dapo.config import ConfigError, load_config  # noqa: E402
from dapo.lora import (  # noqa: E402
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, adapters_disabled, has_lora, load_adapter_state, lora_param_count,
    save_lora_checkpoint,
)
from dapo.model import SetupError, load_model, load_policy, make_optimizer  # noqa: E402
from dapo.rollout import HFEngine, SamplingParams  # noqa: E402
from dapo.trainer.build import build_run  # noqa: E402
from dapo.learner.loss import micro_inputs, micro_loss  # noqa: E402
from dapo.learner.plan import MicroBatch  # noqa: E402
from dapo.learner.policy import make_seq_batch, response_logprobs  # noqa: E402
from dapo.learner import LocalLearner, TrainBatch  # noqa: E402

CPU = torch.device("cpu")
LORA = ["model.lora_rank=4", "model.lora_alpha=8"]
N_ADAPTER = 2 * (4 * 4 * (64 + 64) + 3 * 4 * (64 + 128))  # rank 4 on q,k,v,o (64->64), gate/up, down; 2 layers
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15], [16, 17, 18]]


def _cfg(tiny_model_dir, tmp_path, *extra):
    return load_config(overrides=[*TINY_RUN, *LORA, f"model.path={tiny_model_dir}", f"log.out_dir={tmp_path}",
                                  "log.run_name=r", "algo.filter_metric=reward", "optim.lr=1e-2", *extra])


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A 3-step LoRA run with a KL term, checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("lora")
    rc = cli_main(["train", "--model", str(tiny_model_dir), "optim.steps=3", f"log.out_dir={out}", "log.run_name=r",
                   "algo.filter_metric=reward", "optim.lr=1e-2", "algo.kl_coef=0.1", "ckpt.every=2", "ckpt.keep_last=5",
                   "log.report=false", *LORA, *TINY_RUN])
    assert rc == 0
    return out / "r"


def test_a_lora_run_trains_and_checkpoints_only_the_adapters(lora_run, tiny_model_dir):
    ckpt = lora_run / "step_3"
    files = {p.name for p in ckpt.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "trainer_state.pt", "manifest.json", "prompt_template.json"} <= files
    assert not files & {"model.safetensors", "config.json"}  # no base weights in a LoRA checkpoint
    adapter = load_file(str(ckpt / ADAPTER_WEIGHTS))
    assert sum(t.numel() for t in adapter.values()) == N_ADAPTER and len(adapter) == 28
    assert sum(p.stat().st_size for p in ckpt.iterdir()) < (tiny_model_dir / "model.safetensors").stat().st_size
    config = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at 0: training moved it
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    moments = state["optimizer"]["state"]  # AdamW state of the adapters, and of nothing else
    assert len(moments) == 28 and sum(s["exp_avg"].numel() for s in moments.values()) == N_ADAPTER
    rows = [json.loads(x) for x in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and sum(r["actor/updates"] for r in rows) >= 2
    assert rows[-1]["actor/kl_ref"] > 0  # the adapters moved the policy away from the base


def test_the_learner_holds_one_model_trains_fp32_adapters_on_a_frozen_base(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "algo.kl_coef=0.1", "model.dtype=bfloat16")
    run = build_run(cfg, tmp_path / "r", None, log=lambda s: None)
    try:
        lr = run.learner
        assert lr.ref_model is None  # the KL reference is the same model with its adapters off: no copy
        assert run.engine.model is lr.model  # the in-process engine samples the adapted model as it is
        trainable = [p for p in lr.model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in trainable) == N_ADAPTER and all(p.dtype == torch.float32 for p in trainable)
        frozen = [p for p in lr.model.parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # the base in the compute dtype
        opt_params = [p for g in lr.optimizer.param_groups for p in g["params"]]
        assert sum(p.numel() for p in opt_params) == N_ADAPTER
    finally:
        run.close()


def test_kl_reference_of_a_lora_learner_is_the_base_model(tiny_model_dir, tmp_path):
    """The adapters-off path gives the loss and KL that a separately loaded base as ref_model gives."""
    cfg = _cfg(tiny_model_dir, tmp_path, "algo.kl_coef=0.1")
    model = load_policy(cfg.model, str(tiny_model_dir), CPU)
    _randomise(model, seed=4)
    base = load_model(cfg.model, str(tiny_model_dir), CPU).eval()
    prompts = [p for p in PROMPTS[:4] for _ in range(2)]
    responses = [[20 + k, 21, 22 + k % 3][: 1 + k % 3] for k in range(8)]
    with torch.no_grad():
        sb = make_seq_batch(prompts, responses, 0)
        old = [lp[: len(r)].tolist() for lp, r in zip(response_logprobs(model, sb)[0], responses)]
    batch = TrainBatch.of(prompts, responses, old, [True] * 8, torch.linspace(-1, 1, 8), torch.ones(8))
    old = batch.behaviour_logp
    out = {}
    for name, ref in (("lora", None), ("copy", base)):
        opt, sched = make_optimizer(cfg.optim, model)
        learner = LocalLearner(cfg, model, opt, sched, 0, CPU, ref_model=ref)
        model.zero_grad(set_to_none=True)
        x = micro_inputs(learner.plan, batch, old, MicroBatch(list(range(8))))
        loss, sums = micro_loss(learner.policy, x, learner.loss_spec, 12.0, 8.0, ref_logp=learner._ref_logp)
        loss.backward()
        out[name] = (loss.item(), sums["kl_ref"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert out["lora"][1] > 0 and out["lora"][1] == pytest.approx(out["copy"][1], rel=1e-6)
    assert out["lora"][0] == pytest.approx(out["copy"][0], rel=1e-6)
    grads_lora, grads_copy = out["lora"][2], out["copy"][2]
    assert grads_lora.keys() == grads_copy.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.allclose(grads_lora[n], grads_copy[n], atol=1e-7) for n in grads_lora)


def test_a_sampler_with_its_own_copy_receives_only_adapter_tensors(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "rollout.dtype=bfloat16")
    run = build_run(cfg, tmp_path / "r", None, log=lambda s: None)
    try:
        sampler, trained = run.engine.model, run.learner.model
        assert sampler is not trained and has_lora(sampler)
        _randomise(trained, seed=5)
        sent = {}
        real = run.engine.load_weights
        run.engine.load_weights = lambda sd, v: (sent.update(sd), real(sd, v))
        run.learner.push_weights(run.engine, 1)
        assert sent.keys() == adapter_state_dict(trained).keys()  # megabytes, not the model
        got, want = adapter_state_dict(sampler), adapter_state_dict(trained)
        assert all(torch.equal(got[k], want[k]) for k in want) and run.engine.weight_version == 1
    finally:
        run.close()


def test_after_each_step_the_merged_sampler_holds_the_new_adapters_and_matches_the_trainer(tiny_model_dir, tmp_path):
    """Two steps in one process: after each push the sampler's merged weights are W + (alpha/r) B A of the adapters
    just trained (alpha/r = 2); with the recompute forced, the trainer's log-probs of what it sampled match the
    sampler's (``mismatch/*`` ~0 in float32); the trained base and optimiser see adapters only."""
    from dapo.trainer.loop import train
    from dapo.trainer.run import resolve_run_dir

    cfg = _cfg(tiny_model_dir, tmp_path, "optim.steps=2", "log.report=false")
    run = build_run(cfg, *resolve_run_dir(cfg), log=lambda s: None)
    try:
        engine, model = run.engine, run.learner.model
        assert engine.model is model and engine.merged is not None and not has_lora(engine.merged.model)
        run.learner.samples_the_policy = False  # recompute the old log-probs, so mismatch/* measures the sampler
        seen = []

        def check(step, m):
            mods = dict(model.named_modules())
            merged = {n: lin.weight.clone() for n, lin in engine.merged.model.named_modules()
                      if isinstance(lin, torch.nn.Linear) and hasattr(mods.get(n), "lora_A")}
            assert len(merged) == 14
            for n, w in merged.items():
                layer = mods[n]
                want = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                torch.testing.assert_close(w, want, atol=1e-6, rtol=0)
            assert m["actor/updates"] > 0 and m["mismatch/logp_abs_diff"] < 1e-5 and m["mismatch/kl"] < 1e-6
            seen.append(merged)

        train(cfg, on_step=check, run=run)
        assert len(seen) == 2 and any(not torch.equal(seen[0][n], seen[1][n]) for n in seen[0])  # step 2 moved them
        base = load_model(cfg.model, str(tiny_model_dir), CPU).state_dict()
        own = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        assert own.keys() == base.keys() and all(torch.equal(own[k], base[k]) for k in base)  # the base never moved
        opt = {id(p) for g in run.learner.optimizer.param_groups for p in g["params"]}
        assert opt == {id(p) for p in model.parameters() if p.requires_grad} and len(opt) == 28
    finally:
        run.close()


def test_export_merges_into_a_model_that_transformers_and_dapo_eval_load(lora_run, tmp_path, capsys):
    ckpt, out = lora_run / "step_3", tmp_path / "merged"
    assert cli_main(["export", str(ckpt), "--merge", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "prompt_template.json"} <= {p.name for p in out.iterdir()}
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()  # as trained, not re-made
    # transformers loads it with every weight in place, in a process where peft cannot even be imported
    code = ("import sys; sys.modules['peft'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m, info = AutoModelForCausalLM.from_pretrained({str(out)!r}, output_loading_info=True)\n"
            "assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    # the merged model is the trained policy
    cfg = load_config(overrides=[*LORA])
    policy, merged = load_policy(cfg.model, str(ckpt), CPU), load_model(cfg.model, str(out), CPU)
    sb = make_seq_batch(PROMPTS, [[20, 21, 22]] * 5, 0)
    with torch.no_grad():
        a, b = response_logprobs(policy, sb)[0], response_logprobs(merged, sb)[0]
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # dapo eval takes the checkpoint (base + adapter merged on load) and the export alike: the same samples
    results = []
    for model in (ckpt, out):
        assert cli_main(["eval", "--model", str(model), "--data", "task:addition", "--limit", "6", "--max-new-tokens",
                         "8", "--out", str(tmp_path / f"{model.name}.json"), "--progress", "none"]) == 0
        results.append(json.loads((tmp_path / f"{model.name}.json").read_text()))
    assert [s["response"] for s in results[0]["samples"]] == [s["response"] for s in results[1]["samples"]]
    assert results[0]["settings"]["template"] == results[1]["settings"]["template"]
    capsys.readouterr()
    assert cli_main(["export", str(ckpt), "--merge", str(out)]) == 2  # never over an existing directory
    assert "already exists" in capsys.readouterr().err


def test_a_lora_checkpoint_as_the_model_of_a_new_run(lora_run, tiny_model_dir, tmp_path):
    """model.lora_rank=0: the merged policy, every weight trainable; the same adapter settings: the adapter
    continues; other settings, or a KL term whose reference would be the base: refused with what to do."""
    ckpt = lora_run / "step_3"
    saved = load_file(str(ckpt / ADAPTER_WEIGHTS))
    common = [*TINY_RUN, f"model.path={ckpt}", f"log.out_dir={tmp_path}", "log.run_name=n"]
    run = build_run(load_config(overrides=common), tmp_path / "n", None, log=lambda s: None)
    try:
        m = run.learner.model
        assert not has_lora(m) and all(p.requires_grad for p in m.parameters())
        merged, base = load_model(load_config().model, str(ckpt), CPU).state_dict(), load_file(str(tiny_model_dir / "model.safetensors"))
        assert all(torch.equal(v, merged[k]) for k, v in m.state_dict().items())
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(merged[q], base[q])  # W + alpha/r B A, not the base
    finally:
        run.close()
    run = build_run(load_config(overrides=common + LORA), tmp_path / "n", None, log=lambda s: None)
    try:
        got = {f"base_model.model.{k.replace('.default', '')}": v for k, v in adapter_state_dict(run.learner.model).items()}
        assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    finally:
        run.close()
    with pytest.raises(SetupError, match=r"model.lora_rank / lora_alpha / lora_targets must match .* r=4 .* r=2"):
        build_run(load_config(overrides=common + ["model.lora_rank=2"]), tmp_path / "n", None, log=lambda s: None)
    with pytest.raises(SetupError, match=r"is itself an adapter.*dapo export .* --merge OUT"):
        build_run(load_config(overrides=common + LORA + ["algo.kl_coef=0.1"]), tmp_path / "n", None, log=lambda s: None)


def test_resume_restores_the_adapter_and_refuses_another_kind_of_run(lora_run, tiny_model_dir, tmp_path):
    from dapo.trainer.run import resolve_run_dir

    cfg = load_config(overrides=[*TINY_RUN, *LORA, f"model.path={tiny_model_dir}", f"ckpt.resume={lora_run / 'step_3'}",
                                 "optim.steps=4", "algo.kl_coef=0.1", "ckpt.keep_last=5"])
    run = build_run(cfg, lora_run, lora_run / "step_3", log=lambda s: None)
    try:
        saved = load_file(str(lora_run / "step_3" / ADAPTER_WEIGHTS))
        got = {f"base_model.model.{k.replace('.default', '')}": v for k, v in adapter_state_dict(run.learner.model).items()}
        assert all(torch.equal(got[k], saved[k]) for k in saved)
        assert run.learner.model.name_or_path == str(tiny_model_dir.resolve())  # the base the checkpoint names
    finally:
        run.close()
    full = load_config(overrides=[*TINY_RUN, f"ckpt.resume={lora_run / 'step_3'}"])
    with pytest.raises(SetupError, match=r"holds a LoRA adapter and its optimiser state, but model.lora_rank=0"):
        resolve_run_dir(full)


def test_a_lora_adapter_is_used_only_on_the_base_it_was_trained_on_wherever_that_base_is_now(tiny_model_dir, tmp_path,
                                                                                            capsys):
    """A LoRA checkpoint records its base's fingerprint: a base overwritten in place (a new sft --force) is refused
    by resume, eval and export instead of silently scoring another model (stop 41 saw 1.000 -> 0.000 without a
    word), and a base moved elsewhere is named on the resume with model.path (only the same weights are taken)."""
    from safetensors.torch import save_file

    from dapo.lora import BASE_FINGERPRINT
    from dapo.trainer.checkpoint import is_complete

    base, moved, run = tmp_path / "base", tmp_path / "moved", tmp_path / "runs" / "r"
    shutil.copytree(tiny_model_dir, base)
    common = [*TINY_RUN, *LORA, "algo.filter_metric=reward", "log.report=false", "ckpt.keep_last=5"]
    assert cli_main(["train", "--model", str(base), "optim.steps=1", f"log.out_dir={run.parent}", "log.run_name=r",
                     *common]) == 0
    record = json.loads((run / "step_1" / BASE_FINGERPRINT).read_text())
    assert record["base_model_name_or_path"] == str(base) and record["weights"].startswith("sha256:")
    assert is_complete(run / "step_1", verify=True)  # it is in the checkpoint's manifest
    base.rename(moved)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "optim.steps=2"]) == 2
    assert "resume its run with model.path=WHERE_IT_IS_NOW" in capsys.readouterr().err
    assert cli_main(["train", "--resume", str(run), f"model.path={moved}", "optim.steps=2"]) == 0
    err = capsys.readouterr().err
    assert f"resuming it on model.path={moved}: the same weights (fingerprint checked)" in err, err
    assert json.loads((run / "step_2" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(moved)
    assert not (run / ".adapter-on-model-path").exists()  # the redirected copy is gone with the run
    # the base overwritten with other weights of the same shapes: refused wherever the adapter is used
    weights = load_file(str(moved / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"] += 0.01
    save_file(weights, str(moved / "model.safetensors"), metadata={"format": "pt"})
    before = sorted(p.name for p in run.iterdir())
    for argv in (["eval", "--model", str(run / "step_2"), "--data", "task:addition", "--limit", "2", "--out",
                  str(tmp_path / "e.json")],
                 ["export", str(run / "step_2"), "--merge", str(tmp_path / "m")],
                 ["train", "--resume", str(run), "optim.steps=3"]):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"trained on the base model {moved}, whose weights have changed since" in err and "Traceback" not in err
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "m").exists()
    assert sorted(p.name for p in run.iterdir()) == before
    assert cli_main(["train", "--resume", str(run), f"model.path={tiny_model_dir}", "optim.steps=3"]) == 0  # a copy
    assert "the same weights (fingerprint checked)" in capsys.readouterr().err
    # merging on another base is the user's explicit choice: done, with a warning
    assert cli_main(["export", str(run / "step_3"), "--merge", str(tmp_path / "m"), "--base", str(moved)]) == 0
    assert "is not the base" in capsys.readouterr().err
    assert cli_main(["export", str(run), "--merge", str(tmp_path / "m2")]) == 2  # the run, not a step: its latest
    assert (f"{run}: a run directory, not a model: pass one of its checkpoints, e.g. {run / 'step_3'} (the latest)"
            in capsys.readouterr().err) and not (tmp_path / "m2").exists()


def test_bad_lora_settings_name_the_key(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.lora_rank: LoRA with dist.fsdp is not supported"):
        load_config(overrides=[*LORA, "dist.fsdp=true", "dist.trainer_ranks=2"])
    for bad, key in ((["model.lora_rank=-1"], "model.lora_rank"), (["model.lora_alpha=0"], "model.lora_alpha"),
                     (["model.lora_dropout=1"], "model.lora_dropout")):
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=["model.lora_rank=4", *bad])
    assert load_config(overrides=["model.lora_targets=q_proj, mlp.down_proj"]).model.lora_targets == ("q_proj", "mlp.down_proj")
    rc = cli_main(["train", "--model", str(tiny_model_dir), f"log.out_dir={tmp_path}", "log.run_name=t", *TINY_RUN,
                   *LORA, "model.lora_targets=q_proj,qkv"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.lora_targets=q_proj,qkv" in err and "['qkv'] match no Linear layer" in err
    assert "named: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err
    # an adapter whose base is gone says where it looked and what to do
    model = load_policy(load_config(overrides=LORA).model, str(tiny_model_dir), CPU)
    ckpt = save_lora_checkpoint(model, tmp_path / "step_1", base_model_path=str(tmp_path / "moved"))
    with pytest.raises(SetupError, match=r"base model .*moved, which is not there any more .*adapter_config.json.*--base"):
        load_policy(load_config(overrides=LORA).model, str(ckpt), CPU)


# ------------------------------------------------------------------------------------------------ Ray


def test_ray_ranks_and_workers_sync_adapters_only_and_sample_like_the_in_process_engine(tiny_model_dir, tmp_path):
    """One small run on a real local Ray cluster: 2 replicated trainer ranks, 1 rollout worker, LoRA."""
    ray = pytest.importorskip("ray")
    from dapo.distributed import start_local_ray
    from dapo.trainer.loop import train
    from dapo.trainer.run import resolve_run_dir

    assert not ray.is_initialized()
    start_local_ray(num_cpus=4)
    cfg = _cfg(tiny_model_dir, tmp_path, "optim.steps=2", "dist.rollout_workers=1", "dist.trainer_ranks=2",
               "dist.worker_restarts=1", "dist.timeout_s=600", "log.report=false")
    try:
        built = build_run(cfg, *resolve_run_dir(cfg))
        history = []
        try:
            train(cfg, on_step=lambda step, m: history.append(dict(m)), run=built)
            assert [m["rollout/weight_version"] for m in history] == [0, 1]
            assert all(m["dist/param_sync_err"] == 0.0 and m["batch/groups"] > 0 for m in history)
            refs, n = built.engine._latest  # the last push, as a replacement worker would load it
            pushed = {k: v for r in refs for k, v in ray.get(r).items()}
            assert n == len(pushed) == 28 and sum(t.numel() for t in pushed.values()) == N_ADAPTER
            state = built.learner.full_state_dict()  # the ranks' adapters
            assert state.keys() == pushed.keys() and all(torch.equal(state[k], pushed[k]) for k in state)
            local = load_policy(cfg.model, str(tiny_model_dir), CPU)
            load_adapter_state(local, state)
            params, seeds = SamplingParams(n=4, max_new_tokens=8), [7, 8, 9, 10, 11]
            remote = built.engine.generate(PROMPTS, params, seeds)
            here = HFEngine(local, 0, [1]).generate(PROMPTS, params, seeds)
            assert [c.token_ids.tolist() for c in remote] == [c.token_ids.tolist() for c in here]
            diff = max(abs(a - b) for x, y in zip(remote, here) for a, b in zip(x.logprobs, y.logprobs))
            assert diff < 1e-5  # the same policy; float sums differ in order with the actor's thread count
            with adapters_disabled(local):  # and not the base's: the trained adapters reached the worker
                base = HFEngine(local, 0, [1]).generate(PROMPTS, params, seeds)
            assert max(abs(a - b) for x, y in zip(base, here) for a, b in zip(x.logprobs, y.logprobs)) > 1e-3
            saved = load_file(str(tmp_path / "r" / "step_2" / ADAPTER_WEIGHTS))  # written by rank 0
            assert sum(t.numel() for t in saved.values()) == lora_param_count(local)
            assert not (tmp_path / "r" / "step_2" / "model.safetensors").exists()
        finally:
            built.close()
    finally:
        ray.shutdown()


def test_export_of_a_full_model_checkpoint_copies_it_without_the_trainer_state(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "step_5"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "trainer_state.pt").write_bytes(b"x")
    (ckpt / "manifest.json").write_text("{}")
    assert cli_main(["export", str(ckpt), "--merge", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())
    # --dtype bfloat16: the float32 master weights written as a bf16 model that transformers loads as such
    assert cli_main(["export", str(ckpt), "--merge", str(tmp_path / "out2"), "--dtype", "bfloat16"]) == 0
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    full, half = load_file(str(ckpt / "model.safetensors")), load_file(str(tmp_path / "out2" / "model.safetensors"))
    assert full.keys() == half.keys() and all(half[k].dtype == torch.bfloat16 for k in half)
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out2", dtype="auto").dtype == torch.bfloat16
    assert cli_main(["export", str(ckpt), "--merge", str(tmp_path / "out4"), "--base", str(tmp_path)]) == 2
    assert "is a full model, not a LoRA adapter" in capsys.readouterr().err and not (tmp_path / "out4").exists()
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "notes.txt").write_text("x")
    assert cli_main(["export", str(tmp_path / "neither"), "--merge", str(tmp_path / "out3")]) == 2
    assert "neither a LoRA adapter" in capsys.readouterr().err and not (tmp_path / "out3").exists()
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind
