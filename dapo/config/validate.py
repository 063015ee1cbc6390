"""Checks of a whole config: each error names the key and says what would be valid."""
from __future__ import annotations

from dapo.config.errors import ConfigError
from dapo.config.sections import Config


def _bad(key: str, msg: str):
    raise ConfigError(f"{key}: {msg}")


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(valid)}")


def _at_least(c: Config, minimum: float, *keys: str) -> None:
    for key in keys:
        head, _, tail = key.partition(".")
        v = getattr(getattr(c, head), tail)
        if v < minimum:
            _bad(key, f"must be >= {minimum:g}, got {v}")


def validate(c: Config) -> Config:
    from dapo.algo.losses import AGG_MODES, KL_KINDS  # local: config must stay importable without torch work

    _algo(c, AGG_MODES, KL_KINDS)
    _rollout_and_optim(c)
    _data_reward_eval_log(c)
    _dist(c)
    _env(c)
    _lora(c)
    return c


def _algo(c: Config, agg_modes: tuple[str, ...], kl_kinds: tuple[str, ...]) -> None:
    a, r = c.algo, c.rollout
    from dapo.algo import ADV_ESTIMATORS, POLICY_LOSSES

    _one_of("algo.policy_loss", a.policy_loss, tuple(POLICY_LOSSES))
    _one_of("algo.adv_estimator", a.adv_estimator, ADV_ESTIMATORS)
    _one_of("algo.rollout_is", a.rollout_is, ("none", "token", "sequence"))
    if a.eps_low < 0 or (a.eps_low >= 1 and a.policy_loss != "cispo"):
        _bad("algo.eps_low", f"must be in [0, 1) (>= 1 = no lower bound, cispo only), got {a.eps_low}")
    if a.clip_c is not None and a.policy_loss != "ppo":
        _bad("algo.clip_c", f"the dual clip is the ppo loss's; algo.policy_loss={a.policy_loss} takes none")
    if a.rollout_is_cap <= 0:
        _bad("algo.rollout_is_cap", f"must be > 0, got {a.rollout_is_cap}")
    if not 0 < a.rollout_mask_low <= 1:
        _bad("algo.rollout_mask_low", f"must be in (0, 1], got {a.rollout_mask_low}")
    if a.rollout_mask_high < 1:
        _bad("algo.rollout_mask_high", f"must be >= 1, got {a.rollout_mask_high}")
    if a.eps_high < 0:
        _bad("algo.eps_high", f"must be >= 0, got {a.eps_high}")
    if a.clip_c is not None and a.clip_c <= 1:
        _bad("algo.clip_c", f"must be > 1 (or none), got {a.clip_c}")
    _one_of("algo.loss_agg", a.loss_agg, agg_modes)
    _one_of("algo.kl_kind", a.kl_kind, kl_kinds)
    _one_of("algo.filter_metric", a.filter_metric, ("acc", "reward"))
    _one_of("algo.refill", a.refill, ("batch", "adaptive"))
    _one_of("algo.on_gen_cap", a.on_gen_cap, ("train", "error"))
    _at_least(c, 1, "algo.max_gen_rounds")
    _at_least(c, 0, "algo.max_idle_steps", "algo.kl_coef")
    if a.soft_overlong and not 0 < a.overlong_cache_len < r.max_new_tokens:
        _bad("algo.overlong_cache_len",
             f"L_cache must be > 0 and < L_max (rollout.max_new_tokens={r.max_new_tokens}), got {a.overlong_cache_len}")


def _rollout_and_optim(c: Config) -> None:
    r, o, e = c.rollout, c.optim, c.eval
    if r.group_size < 2:
        _bad("rollout.group_size", f"G must be >= 2 for group-relative advantages, got {r.group_size}")
    _at_least(c, 1, "rollout.max_new_tokens", "rollout.batch_size")
    _at_least(c, 0, "rollout.top_k", "rollout.gen_batch_size")
    for key, t in (("rollout.temperature", r.temperature), ("eval.temperature", e.temperature)):
        if t <= 0:
            _bad(key, f"must be > 0 (use a small value for near-greedy), got {t}")
    for key, p in (("rollout.top_p", r.top_p), ("eval.top_p", e.top_p)):
        if not 0 < p <= 1:
            _bad(key, f"must be in (0, 1], got {p}")
    _one_of("rollout.engine", r.engine, ("hf", "vllm"))
    _one_of("rollout.dtype", r.dtype, ("auto", "float32", "bfloat16"))
    _at_least(c, 0, "rollout.max_logp_diff")
    if r.gpu_memory_utilization is not None and not 0 < r.gpu_memory_utilization <= 1:
        _bad("rollout.gpu_memory_utilization", f"must be in (0, 1], got {r.gpu_memory_utilization}")
    _at_least(c, 0, "optim.steps", "optim.max_samples")
    _at_least(c, -1, "optim.micro_batch_tokens")
    _at_least(c, 1, "optim.train_batch_size", "optim.mini_batch_size", "optim.micro_batch_size", "optim.epochs",
              "optim.max_bad_steps")
    if o.train_batch_size % o.mini_batch_size:
        _bad("optim.mini_batch_size",
             f"train_batch_size ({o.train_batch_size}) must be divisible by mini_batch_size ({o.mini_batch_size})")
    if o.lr <= 0:
        _bad("optim.lr", f"must be > 0, got {o.lr}")
    _at_least(c, 0, "optim.grad_clip")
    _one_of("model.dtype", c.model.dtype, ("auto", "float32", "bfloat16", "float16"))
    if c.model.dtype == "float16":
        _bad("model.dtype", "float16 compute needs loss scaling, which dapo does not do: use bfloat16 (the "
                            "default on CUDA) or float32")


def _data_reward_eval_log(c: Config) -> None:
    d, rw = c.data, c.reward
    _one_of("data.long_prompts", d.long_prompts, ("drop", "truncate"))
    _one_of("data.bad_rows", d.bad_rows, ("error", "skip"))
    _at_least(c, 1, "data.max_prompt_len")
    _at_least(c, 0, "reward.workers", "reward.memory_mb", "eval.size", "eval.every")
    if rw.timeout_s <= 0:
        _bad("reward.timeout_s", f"must be > 0, got {rw.timeout_s}")
    if rw.memory_mb and not rw.workers:
        _bad("reward.memory_mb", f"limits worker processes: set reward.workers >= 1 (got memory_mb={rw.memory_mb}, "
                                 f"workers={rw.workers})")
    if rw.fn != "auto" and not d.path:
        _bad("reward.fn", f"{rw.fn!r} scores prompt files (data.path); the built-in task {d.task!r} uses its own "
                          f"verifier: pass --data FILE, or leave reward.fn=auto")
    _at_least(c, 1, "eval.k", "ckpt.keep_last")
    _one_of("log.progress", c.log.progress, ("auto", "bar", "plain", "none"))
    _one_of("log.tensorboard", c.log.tensorboard, ("auto", "true", "false"))


def _dist(c: Config) -> None:
    d, r, o = c.dist, c.rollout, c.optim
    _at_least(c, 0, "dist.rollout_workers")
    _at_least(c, 1, "dist.trainer_ranks")
    if d.timeout_s <= 0:
        _bad("dist.timeout_s", f"must be > 0, got {d.timeout_s}")
    _at_least(c, 0, "dist.worker_restarts")
    _at_least(c, 1, "dist.weight_chunk_mb")
    if d.fsdp and d.trainer_ranks < 2:
        _bad("dist.fsdp", "shards over trainer ranks: set dist.trainer_ranks >= 2 (one process trains unsharded)")
    if d.colocate and not (d.rollout_workers and d.trainer_ranks > 1):
        _bad("dist.colocate", "shares devices between Ray rollout workers and trainer ranks: set "
                              "dist.rollout_workers >= 1 and dist.trainer_ranks >= 2")
    if d.rollout_on_ranks and (d.trainer_ranks < 2 or d.rollout_workers or d.fsdp or r.engine != "hf"):
        _bad("dist.rollout_on_ranks", "samples on replicated trainer ranks with the HF engine: set "
                                      "dist.trainer_ranks >= 2, dist.rollout_workers=0, dist.fsdp=false, rollout.engine=hf")
    if d.async_steps not in (0, 1):
        _bad("dist.async_steps", f"must be 0 (synchronous) or 1 (one step off), got {d.async_steps}")
    if d.async_steps and (not d.rollout_workers or d.rollout_on_ranks):
        _bad("dist.async_steps", "samples the next step while the trainer updates, on a sampler of its own: set "
                                 "dist.rollout_workers >= 1 (and dist.rollout_on_ranks=false)")
    if d.async_steps and c.data.path and not c.reward.workers:
        _bad("reward.workers", "with dist.async_steps=1 the rollout is scored in a background thread, where a reward "
                               "function cannot be given a time limit: set reward.workers >= 1")
    if d.colocate and d.async_steps:
        _bad("dist.async_steps", "with dist.colocate a rollout worker would sample on the device its trainer rank is "
                                 "updating on: set dist.async_steps=0, or dist.colocate=false (workers on devices of "
                                 "their own)")
    if d.trainer_ranks > 1 and not d.rollout_workers and not d.rollout_on_ranks and _on_cuda(c.model.device):
        _bad("dist.rollout_workers", f"with dist.trainer_ranks={d.trainer_ranks} and no rollout workers the rollout "
                                     f"engine would run in the driver process on cuda:0, behind Ray's back (the GPU "
                                     f"it lent trainer rank 0): set dist.rollout_workers >= 1 (or "
                                     f"dist.rollout_on_ranks=true with the HF engine), or model.device=cpu")
    if d.trainer_ranks > 1 and o.mini_batch_size * r.group_size % d.trainer_ranks:
        n = o.mini_batch_size * r.group_size
        fits = [k for k in range(d.trainer_ranks - 1, 0, -1) if n % k == 0][0]
        _bad("dist.trainer_ranks", f"each optimiser step's {n} responses (optim.mini_batch_size={o.mini_batch_size} "
                                   f"prompts x rollout.group_size={r.group_size}) must split evenly over "
                                   f"{d.trainer_ranks} ranks: set dist.trainer_ranks={fits}, or an "
                                   f"optim.mini_batch_size or rollout.group_size whose product is a multiple of "
                                   f"{d.trainer_ranks}")


def _on_cuda(device: str) -> bool:
    """Whether ``model.device`` puts this process's model on a GPU (auto: when one is visible here)."""
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def _env(c: Config) -> None:
    e = c.env
    _at_least(c, 1, "rollout.max_turns", "env.workers", "env.max_output_chars")
    _at_least(c, 0, "rollout.max_total_tokens", "env.memory_mb")
    if e.timeout_s <= 0:
        _bad("env.timeout_s", f"must be > 0, got {e.timeout_s}")
    if e.step_timeout_s < 0:
        _bad("env.step_timeout_s", f"must be >= 0 (0: no limit), got {e.step_timeout_s}")
    if not (e.path or e.tools):
        return
    if e.path and e.tools:
        _bad("env.tools", "an environment (env.path) answers the model itself: set env.path or env.tools, not both")
    # Ray rollout workers, the trainer ranks (dist.rollout_on_ranks), async rollout and vLLM: the turns run here,
    # each a generate call to the engine on the trajectories so far (dapo.rollout.multiturn)
    if c.rollout.max_total_tokens and c.rollout.max_total_tokens < c.rollout.max_new_tokens:
        _bad("rollout.max_total_tokens", f"counts the model's tokens too: must be 0 or >= rollout.max_new_tokens "
                                         f"({c.rollout.max_new_tokens}), got {c.rollout.max_total_tokens}")


def _lora(c: Config) -> None:
    m = c.model
    _at_least(c, 0, "model.lora_rank")
    if not m.lora_rank:
        return
    if not m.lora_alpha > 0:
        _bad("model.lora_alpha", f"must be > 0, got {m.lora_alpha}")
    if not 0 <= m.lora_dropout < 1:
        _bad("model.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}")
    if any(not t.strip() for t in m.lora_targets):
        _bad("model.lora_targets", f"has an empty name: {list(m.lora_targets)}")
    if c.dist.fsdp:
        _bad("model.lora_rank", "LoRA with dist.fsdp is not supported: the adapters are small enough to replicate; "
                                "set dist.fsdp=false (replicated trainer ranks train LoRA), or model.lora_rank=0")
