"""Configuration: frozen dataclasses, one per concern, with presets for DAPO, GRPO and each Table-1 row.

A run's config is built as: defaults <- preset <- YAML file <- ``key=value`` overrides, then validated.
Keys are dotted (``algo.eps_high=0.28``); an unknown key is an error that names the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dapo.fsutil import write_atomic


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """HF model directory or hub id; empty = the built-in demo model for ``data.task`` (made by ``dapo sft``)."""
    tokenizer: str = ""
    """Tokenizer directory or hub id; empty = same as ``path``."""
    dtype: str = "auto"
    """Training dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    trust_remote_code: bool = False
    """Run a model repository's own Python code. Off unless you trust the repository."""
    allow_unsafe_weights: bool = False
    """Allow pickle-based weight files (pytorch_model.bin); by default only safetensors load."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager, flash_attention_2."""


@dataclass(frozen=True)
class DataConfig:
    task: str = "addition"
    """Built-in synthetic task used when ``path`` is empty (see ``dapo.data.tasks``)."""
    path: str = ""
    """Prompt file (JSONL, Parquet, CSV) or HF dataset; empty = the built-in task."""
    eval_path: str = ""
    """Held-out prompts; empty = ``eval_size`` prompts of the built-in task kept apart from training."""
    prompt_key: str = "prompt"
    """Column holding the prompt (a string, or chat messages as in DAPO-Math-17k)."""
    answer_key: str = "reward_model.ground_truth"
    """Column holding the ground truth; dotted for nested fields. Falls back to ``answer`` if absent."""
    template: str = "auto"
    """Prompt template: auto (the task's own, or dapo_math for files), none, dapo_math, boxed, chat, dapo_math+chat, boxed+chat."""
    max_prompt_len: int = 1024
    """Prompts longer than this many tokens are handled by ``long_prompts``."""
    long_prompts: str = "drop"
    """drop (and count) or truncate (keep the last tokens)."""
    bad_rows: str = "error"
    """error (name the file and row) or skip (and count) for rows with a missing prompt or answer."""
    dedup: bool = False
    """Drop repeated prompts (DAPO-Math-17k repeats each about 100 times) and report how many."""
    eval_size: int = 256
    """Number of held-out prompts evaluated before and after training."""
    eval_seed: int | None = None
    """Seed that draws the held-out prompts (built-in task, or the slice held out of ``path``); None = ``seed``.
    Fix it to compare runs of different seeds on the same prompts."""
    reward: str = "auto"
    """Verifier: auto (the built-in task's own, or math for files), math (DAPO math scoring), or module:function."""
    reward_workers: int = 0
    """Processes scoring rewards in parallel; 0 = in the trainer process."""
    reward_timeout_s: float = 5.0
    """Time limit per response for the verifier; a timeout scores as wrong and is counted."""
    reward_memory_mb: int = 0
    """Address-space limit (setrlimit) of each reward worker, in MB; a call that exceeds it scores as wrong and
    is counted. 0 = none. Needs ``reward_workers`` > 0: user code in the trainer process cannot be limited."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by ``seed`` and the epoch)."""


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "hf"
    """Rollout engine: hf (transformers, CPU or one GPU) or vllm (when installed)."""
    group_size: int = 8
    """G, responses sampled per prompt (paper: 16)."""
    max_new_tokens: int = 24
    """L_max, the longest response in tokens (paper: 20480)."""
    temperature: float = 1.0
    """Sampling temperature; training log-probs use the same temperature so ratios stay consistent."""
    top_p: float = 1.0
    """Nucleus sampling during training (paper: 1.0)."""
    top_k: int = 0
    """Top-k sampling; 0 = off."""
    eval_temperature: float = 1.0
    """Temperature for held-out evaluation."""
    eval_top_p: float = 1.0
    """Top-p for held-out evaluation (the paper evaluates AIME with 0.7)."""
    use_engine_logprobs: bool = False
    """Take old log-probs from the rollout engine instead of recomputing them with the training model."""
    batch_size: int = 256
    """Most sequences the engine decodes at once."""
    gpu_memory_utilization: float = 0.5
    """vLLM only: fraction of the GPU's memory vLLM may take (weights + KV cache); the rest is left to training."""


@dataclass(frozen=True)
class AlgoConfig:
    eps_low: float = 0.2
    """Lower clip: ratio >= 1 - eps_low for negative advantages (paper: 0.2)."""
    eps_high: float = 0.28
    """Upper clip: ratio <= 1 + eps_high for positive advantages. Clip-Higher: 0.28; symmetric PPO: 0.2."""
    clip_c: float | None = None
    """Dual-clip constant (> 1) bounding the loss of negative-advantage tokens; None = off."""
    loss_agg: str = "token-mean"
    """token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO)."""
    norm_adv_std: bool = True
    """Divide advantages by the group std (GRPO, DAPO); False = Dr. GRPO's R - mean."""
    dynamic_sampling: bool = True
    """Drop groups whose ``filter_metric`` is all equal and sample more prompts to refill (DAPO §3.2)."""
    filter_metric: str = "acc"
    """What must vary within a kept group: acc (correctness) or reward (shaped score)."""
    max_gen_rounds: int = 8
    """Most generation rounds per step while refilling the batch (verl: max_num_gen_batches)."""
    on_gen_cap: str = "train"
    """When ``max_gen_rounds`` runs out: train (on the groups kept, and log it) or error."""
    refill: str = "batch"
    """How many prompts a refill round samples: batch (``gen_batch_size`` every round, as the paper and
    verl; the surplus is discarded) or adaptive (the first round ``gen_batch_size``, later rounds only
    what this step's keep rate says is missing, x1.25: fewer samples thrown away, same kept groups)."""
    carry_over: bool = False
    """Keep surplus mixed groups for the next step (with their behaviour log-probs) instead of discarding (paper)."""
    overlong_filter: bool = True
    """Mask truncated responses out of the loss (DAPO §3.4)."""
    soft_overlong: bool = True
    """Add the Soft Overlong Punishment (Eq. 13) to the reward."""
    overlong_cache_len: int = 4
    """L_cache, the length of the linear penalty window before L_max (paper: 4096 of 20480)."""
    overlong_factor: float = 1.0
    """Penalty at L_max (paper: 1.0)."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the initial policy; DAPO uses none (0)."""
    kl_kind: str = "k3"
    """KL estimator when ``kl_coef`` > 0: k1, k2, k3."""


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 120
    """RL steps (one rollout batch each); the demo's 120 take about two minutes on 2 CPU cores."""
    max_samples: int = 0
    """Also stop once this many responses have been generated (an equal budget across presets); 0 = no limit."""
    train_batch_size: int = 16
    """Prompt groups per RL step (paper: 512)."""
    gen_batch_size: int = 0
    """Prompts sampled per generation round; 0 = ``train_batch_size`` (paper: 3x with dynamic sampling)."""
    mini_batch_size: int = 4
    """Prompt groups per optimiser step; train_batch_size / mini_batch_size updates per RL step (paper: 16)."""
    micro_batch_size: int = 64
    """Responses per forward/backward; gradients accumulate over micro-batches (exact token-mean)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    skip_zero_adv: bool = True
    """No backward pass for responses whose advantage is exactly 0 (all-equal groups without dynamic
    sampling) when they are at least a quarter of a mini-batch: their gradient is zero, so the update is
    the same for less work; they still get a forward pass for the metrics. Off with a KL term."""
    lr: float = 1e-4
    """AdamW learning rate (paper: 1e-6 for 32B)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0.1)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimiser steps (paper: 20 rollout steps)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = off."""
    max_bad_steps: int = 3
    """Stop after this many consecutive updates with a non-finite loss or gradient (each is skipped)."""


@dataclass(frozen=True)
class LogConfig:
    out_dir: str = "runs"
    """Parent directory of run directories."""
    run_name: str = ""
    """Run directory name; empty = <preset>-<task>-<timestamp>."""
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed."""
    wandb: bool = False
    """Log to Weights & Biases (needs wandb installed and a login)."""
    wandb_project: str = "dapo"
    """W&B project."""
    progress: str = "auto"
    """auto (a live line on a terminal, plain lines otherwise), bar, plain, none."""
    eval_every: int = 0
    """Evaluate on held-out prompts every N steps (0 = only before and after)."""
    eval_k: int = 1
    """Samples per held-out prompt: the before/after accuracy is their mean (avg@k); the periodic evaluation
    also logs eval/pass@k and eval/maj@k (paper: 32)."""
    samples_every: int = 10
    """Save a few decoded responses every N steps to samples.jsonl."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest N checkpoints."""
    resume: str = ""
    """Run directory (or checkpoint directory) to continue from."""
    save_final: bool = True
    """Save a checkpoint after the last step."""


@dataclass(frozen=True)
class DistConfig:
    rollout_workers: int = 0
    """Ray rollout actors, each with its own engine and model copy; prompts are split across them
    (a prompt's G samples stay on one worker). 0 = an in-process engine."""
    trainer_ranks: int = 1
    """Data-parallel trainer ranks; > 1 runs them as Ray actors in a torch.distributed group (gloo on CPU,
    NCCL on GPU), each training on its share of every mini-batch with the global token-mean denominator."""
    ray_address: str = ""
    """Ray cluster address (``ray start --head`` prints it, or ``auto``); empty = start a local,
    loopback-only cluster when workers or ranks are asked for, and shut it down at the end."""
    fsdp: bool = False
    """Shard parameters, gradients and optimiser state across trainer ranks with FSDP2 (fully_shard)."""
    colocate: bool = False
    """Rollout worker i and trainer rank i share one device (half a GPU each, one placement group)."""
    rollout_on_ranks: bool = False
    """The trainer ranks sample too, each its slice of the prompts with an engine on the very model it
    trains (verl's hybrid engine): no rollout workers, no weight transfer, and no old log-prob recompute
    (the sampler's log-probs are the old policy's). HF engine, replicated ranks (not FSDP)."""
    timeout_s: float = 3600.0
    """Longest wait for any worker or rank call (generate, update, weight sync) before the run stops
    with an error naming who did not answer. A dead actor is reported at once, not after this."""
    worker_restarts: int = 0
    """Replace a dead rollout worker (with the latest weights) up to this many times in the run;
    0 = stop with an error naming it. Keeping the latest weights costs one model copy in the object store."""
    weight_chunk_mb: int = 512
    """Weights travel from the trainer to the rollout workers in chunks of about this many MB, one at a time
    in each process's memory."""


@dataclass(frozen=True)
class Config:
    preset: str = "dapo"
    """Name of the preset this config started from (recorded, not re-applied)."""
    seed: int = 0
    """Run seed; every sampling seed is derived from (seed, step, prompt)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> "Config":
        _validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# presets: the paper's Table 1 rows are progressive; each adds one technique to the row above

_GRPO = {
    "algo.eps_low": 0.2,
    "algo.eps_high": 0.2,
    "algo.loss_agg": "seq-mean-token-mean",
    "algo.dynamic_sampling": False,
    "algo.overlong_filter": False,
    "algo.soft_overlong": False,
}
ABLATION_ROWS = ("grpo", "+overlong_filter", "+clip_higher", "+soft_overlong", "+token_loss", "dapo")
_ROW_ADDS = {
    "+overlong_filter": {"algo.overlong_filter": True},
    "+clip_higher": {"algo.eps_high": 0.28},
    "+soft_overlong": {"algo.soft_overlong": True},
    "+token_loss": {"algo.loss_agg": "token-mean"},
    "dapo": {"algo.dynamic_sampling": True},
}


def _build_presets() -> dict[str, dict[str, Any]]:
    presets = {"grpo": dict(_GRPO)}
    acc = dict(_GRPO)
    for row in ABLATION_ROWS[1:]:
        acc = {**acc, **_ROW_ADDS[row]}
        presets[row] = dict(acc)
    assert presets["dapo"]["algo.eps_high"] == 0.28
    return presets


PRESETS: dict[str, dict[str, Any]] = _build_presets()
PRESET_DOCS = {
    "grpo": "naive GRPO: symmetric clip 0.2, seq-mean-token-mean, no dynamic sampling, no overlong shaping",
    "+overlong_filter": "grpo + overlong filtering (Table 1 row 2)",
    "+clip_higher": "row 2 + Clip-Higher eps_high=0.28 (row 3)",
    "+soft_overlong": "row 3 + soft overlong punishment (row 4)",
    "+token_loss": "row 4 + token-level loss (row 5)",
    "dapo": "full DAPO: row 5 + dynamic sampling (paper §4.1)",
}


# --------------------------------------------------------------------------------------------------
# building a config from presets, YAML and key=value overrides


def valid_keys() -> list[str]:
    keys = []
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += [f"{f.name}.{g.name}" for g in fields(t)]
        else:
            keys.append(f.name)
    return keys


def _unknown_key(key: str, where: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if not close:  # a bare field name without its section, e.g. eps_high -> algo.eps_high
        close = [k for k in valid_keys() if k.split(".")[-1] == key.split(".")[-1]][:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's type, or raise naming the key."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, args[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(typ)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported type {typ}")


def _apply(cfg: Config, flat: dict[str, Any], where: str = "") -> Config:
    hints = typing.get_type_hints(Config)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, tail = key.partition(".")
        if head not in hints:
            raise _unknown_key(key, where)
        sec_type = hints[head]
        if dataclasses.is_dataclass(sec_type):
            sub_hints = typing.get_type_hints(sec_type)
            if not tail or tail not in sub_hints:
                raise _unknown_key(key, where)
            sections.setdefault(head, {})[tail] = _coerce(key, value, sub_hints[tail])
        else:
            if tail:
                raise _unknown_key(key, where)
            top[head] = _coerce(key, value, sec_type)
    for head, kv in sections.items():
        top[head] = replace(getattr(cfg, head), **kv)
    return replace(cfg, **top)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.count("."):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. algo.eps_high=0.28)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    base: Config | None = None,
) -> Config:
    """defaults (or ``base``) <- preset <- YAML file <- overrides, validated."""
    cfg = base or Config()
    file_flat: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections to keys")
        file_flat = _flatten(data)
    over = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    name = preset or over.pop("preset", None) or file_flat.pop("preset", None) or cfg.preset
    over.pop("preset", None)
    file_flat.pop("preset", None)
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (valid: {', '.join(PRESETS)})")
    cfg = _apply(cfg, PRESETS[name], " in preset")
    cfg = replace(cfg, preset=name)
    if file_flat:
        cfg = _apply(cfg, file_flat, f" in {file}")
    if over:
        cfg = _apply(cfg, over)
    return cfg.validate()


def _validate(c: Config) -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}")

    a, r, o, d = c.algo, c.rollout, c.optim, c.data
    if a.eps_low < 0 or a.eps_low >= 1:
        bad("algo.eps_low", f"must be in [0, 1), got {a.eps_low}")
    if a.eps_high < 0:
        bad("algo.eps_high", f"must be >= 0, got {a.eps_high}")
    if a.clip_c is not None and a.clip_c <= 1:
        bad("algo.clip_c", f"must be > 1 (or none), got {a.clip_c}")
    from dapo.algo.losses import AGG_MODES, KL_KINDS  # local: config must stay importable without torch work

    if a.loss_agg not in AGG_MODES:
        bad("algo.loss_agg", f"{a.loss_agg!r} is not one of {', '.join(AGG_MODES)}")
    if a.kl_kind not in KL_KINDS:
        bad("algo.kl_kind", f"{a.kl_kind!r} is not one of {', '.join(KL_KINDS)}")
    if a.filter_metric not in ("acc", "reward"):
        bad("algo.filter_metric", f"must be acc or reward, got {a.filter_metric!r}")
    if a.refill not in ("batch", "adaptive"):
        bad("algo.refill", f"must be batch or adaptive, got {a.refill!r}")
    if a.on_gen_cap not in ("train", "error"):
        bad("algo.on_gen_cap", f"must be train or error, got {a.on_gen_cap!r}")
    if a.max_gen_rounds < 1:
        bad("algo.max_gen_rounds", f"must be >= 1, got {a.max_gen_rounds}")
    if a.soft_overlong and not 0 < a.overlong_cache_len < r.max_new_tokens:
        bad(
            "algo.overlong_cache_len",
            f"L_cache must be > 0 and < L_max (rollout.max_new_tokens={r.max_new_tokens}), got {a.overlong_cache_len}",
        )
    if a.kl_coef < 0:
        bad("algo.kl_coef", f"must be >= 0, got {a.kl_coef}")
    if r.group_size < 2:
        bad("rollout.group_size", f"G must be >= 2 for group-relative advantages, got {r.group_size}")
    if r.max_new_tokens < 1:
        bad("rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    if r.temperature <= 0 or r.eval_temperature <= 0:
        bad("rollout.temperature", "temperatures must be > 0 (use a small value for near-greedy)")
    if not 0 < r.top_p <= 1 or not 0 < r.eval_top_p <= 1:
        bad("rollout.top_p", f"must be in (0, 1], got {r.top_p} / eval {r.eval_top_p}")
    if r.top_k < 0:
        bad("rollout.top_k", f"must be >= 0, got {r.top_k}")
    if r.engine not in ("hf", "vllm"):
        bad("rollout.engine", f"must be hf or vllm, got {r.engine!r}")
    if o.steps < 0:
        bad("optim.steps", f"must be >= 0, got {o.steps}")
    for key in ("train_batch_size", "mini_batch_size", "micro_batch_size", "epochs"):
        if getattr(o, key) < 1:
            bad(f"optim.{key}", f"must be >= 1, got {getattr(o, key)}")
    if o.train_batch_size % o.mini_batch_size:
        bad(
            "optim.mini_batch_size",
            f"train_batch_size ({o.train_batch_size}) must be divisible by mini_batch_size ({o.mini_batch_size})",
        )
    if o.max_samples < 0:
        bad("optim.max_samples", f"must be >= 0, got {o.max_samples}")
    if o.gen_batch_size < 0:
        bad("optim.gen_batch_size", f"must be >= 0, got {o.gen_batch_size}")
    if o.lr <= 0:
        bad("optim.lr", f"must be > 0, got {o.lr}")
    if o.grad_clip < 0:
        bad("optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
    if o.max_bad_steps < 1:
        bad("optim.max_bad_steps", f"must be >= 1, got {o.max_bad_steps}")
    if d.long_prompts not in ("drop", "truncate"):
        bad("data.long_prompts", f"must be drop or truncate, got {d.long_prompts!r}")
    if d.bad_rows not in ("error", "skip"):
        bad("data.bad_rows", f"must be error or skip, got {d.bad_rows!r}")
    if d.max_prompt_len < 1:
        bad("data.max_prompt_len", f"must be >= 1, got {d.max_prompt_len}")
    if d.reward_workers < 0:
        bad("data.reward_workers", f"must be >= 0, got {d.reward_workers}")
    if d.reward_timeout_s <= 0:
        bad("data.reward_timeout_s", f"must be > 0, got {d.reward_timeout_s}")
    if d.reward_memory_mb < 0 or (d.reward_memory_mb and not d.reward_workers):
        bad("data.reward_memory_mb", f"must be >= 0, and limits worker processes: set data.reward_workers >= 1 "
            f"(got reward_memory_mb={d.reward_memory_mb}, reward_workers={d.reward_workers})")
    if d.reward != "auto" and not d.path:
        bad("data.reward", f"{d.reward!r} scores prompt files (data.path); the built-in task "
            f"{d.task!r} uses its own verifier: pass --data FILE, or leave data.reward=auto")
    if d.eval_size < 0:
        bad("data.eval_size", f"must be >= 0, got {d.eval_size}")
    if c.log.progress not in ("auto", "bar", "plain", "none"):
        bad("log.progress", f"must be auto, bar, plain or none, got {c.log.progress!r}")
    if c.log.eval_k < 1:
        bad("log.eval_k", f"must be >= 1, got {c.log.eval_k}")
    if c.ckpt.keep_last < 1:
        bad("ckpt.keep_last", f"must be >= 1, got {c.ckpt.keep_last}")
    if c.dist.rollout_workers < 0 or c.dist.trainer_ranks < 1:
        bad("dist.trainer_ranks", "rollout_workers must be >= 0 and trainer_ranks >= 1")
    if c.dist.timeout_s <= 0:
        bad("dist.timeout_s", f"must be > 0, got {c.dist.timeout_s}")
    if c.dist.worker_restarts < 0:
        bad("dist.worker_restarts", f"must be >= 0, got {c.dist.worker_restarts}")
    if c.dist.weight_chunk_mb < 1:
        bad("dist.weight_chunk_mb", f"must be >= 1, got {c.dist.weight_chunk_mb}")
    if c.dist.fsdp and c.dist.trainer_ranks < 2:
        bad("dist.fsdp", "shards over trainer ranks: set dist.trainer_ranks >= 2 (one process trains unsharded)")
    if c.dist.colocate and not (c.dist.rollout_workers and c.dist.trainer_ranks > 1):
        bad("dist.colocate", "shares devices between Ray rollout workers and trainer ranks: set "
                             "dist.rollout_workers >= 1 and dist.trainer_ranks >= 2")
    if c.dist.rollout_on_ranks and (c.dist.trainer_ranks < 2 or c.dist.rollout_workers or c.dist.fsdp
                                    or r.engine != "hf"):
        bad("dist.rollout_on_ranks", "samples on replicated trainer ranks with the HF engine: set "
                                     "dist.trainer_ranks >= 2, dist.rollout_workers=0, dist.fsdp=false, rollout.engine=hf")
    if not 0 < r.gpu_memory_utilization <= 1:
        bad("rollout.gpu_memory_utilization", f"must be in (0, 1], got {r.gpu_memory_utilization}")
    if c.dist.trainer_ranks > 1 and o.mini_batch_size * r.group_size % c.dist.trainer_ranks:
        bad(
            "dist.trainer_ranks",
            f"each optimiser step's {o.mini_batch_size * r.group_size} responses must split evenly over "
            f"{c.dist.trainer_ranks} ranks",
        )


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a run's config.yaml)."""
    d = dict(d)
    preset = d.pop("preset", "dapo")
    flat = _flatten(d)
    cfg = _apply(Config(), flat, " in saved config")
    return replace(cfg, preset=preset).validate()


def save_config(cfg: Config, path: str | Path) -> None:
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return list(x)
        return x

    # write then rename: a kill mid-write must not leave a truncated config.yaml, which would still parse
    # (with fewer keys, silently defaulted) when the run is resumed
    write_atomic(path, yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False))


def describe() -> str:
    """Every key with its default and docstring, for ``dapo train --help-config``."""
    import ast
    import inspect

    lines = []
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        t = hints[f.name]
        if not dataclasses.is_dataclass(t):
            continue
        docs = _field_docs(t, ast, inspect)
        lines.append(f"[{f.name}]")
        for g in fields(t):
            lines.append(f"  {f.name}.{g.name} = {getattr(t(), g.name)!r}")
            if g.name in docs:
                lines.append(f"      {docs[g.name]}")
    return "\n".join(lines)


def _field_docs(cls: type, ast: Any, inspect: Any) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = str(node.value.value)
    return docs
