"""A run's parts, built from its config: problems, tokenizer, the learner (here or on Ray ranks), the rollout
engine (here, on Ray workers, or on the ranks), and the dynamic sampler that feeds the loop."""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dapo.config import Config
from dapo.model import (
    SetupError, check_context, compute_dtype, eos_ids, generation_config_of, load_policy, load_tokenizer,
    make_optimizer, new_tokens, reference_model, resolve_device, same_base, sampler_dtype,
)
from dapo.memory import check_device_memory
from dapo.problems import Problems, load_problems
from dapo.rollout.base import RolloutEngine
from dapo.rollout.hf import HFEngine
from dapo.rollout.multiturn import from_config as multiturn_from_config
from dapo.trainer.sampler import DynamicSampler, Rollouts
from dapo.learner import Learner, LocalLearner


@dataclass
class Run:
    """Everything the loop works with. ``learner`` is a ``LocalLearner`` in this process or a
    ``dapo.distributed.RankGroup`` over Ray ranks; ``engine`` samples here, on Ray workers, or on the ranks."""

    cfg: Config
    run_dir: Path
    resume_from: Path | None
    tokenizer: Any
    problems: Problems
    learner: Learner
    engine: RolloutEngine
    sampler: DynamicSampler
    device: torch.device
    closers: list[Callable[[], None]] = field(default_factory=list)
    rollouts: Rollouts | None = None
    """Each step's rollout, collected now or one step ahead (``dist.async_steps``); made from ``sampler``."""

    def __post_init__(self):
        if self.rollouts is None:
            self.rollouts = Rollouts(self.sampler)
            self.closers.append(self.rollouts.close)

    def decode(self, ids: list[int], special: bool = False) -> str:
        """Text of ``ids``; ``special``: with the special tokens (a chat template's markers) left in."""
        return self.tokenizer.decode(ids, skip_special_tokens=not special)

    def close(self) -> None:
        """Run every closer (reward pool, Ray workers and ranks, the cluster), even if one fails."""
        errors = []
        for close in reversed(self.closers):
            try:
                close()
            except Exception as e:  # noqa: BLE001  keep closing the rest; report the first below
                errors.append(e)
        self.closers = []
        if errors:
            raise errors[0]


def initial_model_path(cfg: Config, log: Callable[[str], None] = print) -> str:
    """The model a run starts from: ``model.path``, or the built-in task's base model (prepared if not cached)."""
    if cfg.model.path:
        return cfg.model.path
    from dapo.warmup import prepare_base_model

    return str(prepare_base_model(cfg.data.task, log=log))


def _adapter_on_named_base(cfg: Config, ckpt: Path, run_dir: Path, log: Callable[[str], None]) -> Path | None:
    """A LoRA checkpoint resumed with ``model.path`` naming a base other than the one it records (the base was
    moved): a copy of the adapter that names ``model.path`` as its base, once the weights there are checked to be
    the ones it was trained on (its recorded fingerprint). None when there is nothing to redirect."""
    from dapo import lora

    named = cfg.model.path
    if not lora.is_lora_checkpoint(ckpt) or not named or not Path(named).expanduser().is_dir() or \
            lora.is_lora_checkpoint(named):  # a run started from an adapter: its model.path is not the base
        return None
    recorded = lora.lora_base_path(ckpt) or ""
    if Path(recorded).expanduser().exists() and Path(recorded).resolve() == Path(named).resolve():
        return None
    if not same_base(ckpt, named):
        raise SetupError(f"model.path={named}: not the base model {ckpt} was trained on (the weights there differ "
                         f"from the fingerprint in {ckpt / lora.BASE_FINGERPRINT}); name that base ({recorded}) "
                         f"or a copy of it")
    copy = run_dir / ".adapter-on-model-path"  # in the run directory: every rank and worker reads it there
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for f in ckpt.iterdir():  # the adapter, tokenizer and template; the optimiser state is read from ckpt
        if f.is_file() and f.name not in ("trainer_state.pt", "optimizer.pt", "manifest.json"):
            shutil.copy2(f, copy / f.name)
    adapter = json.loads((copy / lora.ADAPTER_CONFIG).read_text(encoding="utf-8"))
    adapter["base_model_name_or_path"] = named
    (copy / lora.ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2), encoding="utf-8")
    checked = "the same weights (fingerprint checked)" if lora.recorded_fingerprint(ckpt) else \
        "no fingerprint recorded to check its weights against"
    log(f"LoRA: {ckpt.name}'s adapter was trained on the base {recorded}; resuming it on model.path={named}: {checked}")
    return copy


def build_run(cfg: Config, run_dir: Path, resume_from: Path | None, log: Callable[[str], None] = print) -> Run:
    """Build the run. ``dist.rollout_workers`` > 0 puts rollout on Ray workers (``dapo.distributed.RayEngine``),
    ``dist.trainer_ranks`` > 1 puts training on Ray ranks (``dapo.distributed.RankGroup``); the loop is the same."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = resolve_device(cfg.model.device)
    dtype = compute_dtype(cfg.model.dtype, device)
    init = initial_model_path(cfg, log) if resume_from is None or cfg.algo.kl_coef > 0 else None
    path = str(resume_from) if resume_from is not None else init
    # the KL reference is the run's initial policy, also after a resume (not the checkpoint resumed from)
    ref_path = init if cfg.algo.kl_coef > 0 else None
    d = cfg.dist
    if d.ray_address and not (d.rollout_workers or d.trainer_ranks > 1):
        log(f"dist.ray_address={d.ray_address} is set but dist.rollout_workers=0 and dist.trainer_ranks=1: "
            f"everything runs in this process")
    moved = _adapter_on_named_base(cfg, resume_from, run_dir, log) if resume_from is not None else None
    path = str(moved or path)
    try:
        tokenizer = load_tokenizer(cfg.model, path)
        problems = load_problems(cfg, tokenizer, log, model_path=path)
    except BaseException:
        if moved is not None:
            shutil.rmtree(moved, ignore_errors=True)
        raise
    closers: list[Callable[[], None]] = [problems.close]
    if moved is not None:  # closed last: a restarted rollout worker loads it again
        closers.insert(0, lambda: shutil.rmtree(moved, ignore_errors=True))
    try:
        multiturn_total = (cfg.env.path or cfg.env.tools) and cfg.rollout.max_total_tokens
        check_context(path, problems.prompt_lengths(), *new_tokens(cfg), log=log,
                      first_turn=cfg.rollout.max_new_tokens if multiturn_total else None)
        learner, engine = _learner_and_engine(cfg, path, ref_path, tokenizer, device, dtype, closers, log)
    except BaseException as e:
        for close in reversed(closers):
            close()
        if isinstance(e, ImportError):
            raise SetupError(str(e)) from None
        raise
    try:
        multiturn = multiturn_from_config(cfg, engine, tokenizer, problems.template, closers, path, log)
    except BaseException:
        for close in reversed(closers):
            close()
        raise
    sampler = DynamicSampler(cfg, engine, problems.stream, problems.score_ids, multiturn=multiturn)
    return Run(cfg, run_dir, resume_from, tokenizer, problems, learner, engine, sampler, device, closers)


def _learner_and_engine(cfg: Config, path: str, ref_path: str | None, tokenizer: Any, device: torch.device,
                        dtype: torch.dtype, closers: list, log: Callable[[str], None]) -> tuple[Learner, RolloutEngine]:
    d = cfg.dist
    remote_rollout, remote_train = d.rollout_workers > 0, d.trainer_ranks > 1
    pad_id = int(tokenizer.pad_token_id)
    if not remote_train:  # refused before anything is allocated (the ranks check their own devices)
        check_device_memory(cfg, path, device)
    # the driver holds a model only when it trains (and then may sample with it) here
    model = None if remote_train else load_policy(cfg.model, path, device)  # float32, or a compute-dtype base + fp32 adapters
    eos = eos_ids(model if model is not None else generation_config_of(path), tokenizer)
    cluster = None
    if remote_rollout or remote_train:
        from dapo.distributed import Cluster

        cluster = Cluster(d, want_gpu=cfg.model.device != "cpu", log=log)
        closers.append(cluster.close)  # closed last: after the workers and ranks are gone
    if remote_train:
        from dapo.distributed import RankEngine, RankGroup

        group = RankGroup(cfg, path, pad_id, cluster, log=log, ref_path=ref_path, eos=eos)
        closers.append(group.close)
        if d.rollout_on_ranks:  # the ranks sample with the models they train
            return group, RankEngine(group)
        return group, _engine(cfg, path, pad_id, eos, device, dtype, None, cluster, closers, log)
    engine = _engine(cfg, path, pad_id, eos, device, dtype, model, cluster, closers, log)
    optimizer, scheduler = make_optimizer(cfg.optim, model)
    ref = reference_model(cfg.model, model, path, ref_path, device) if ref_path is not None else None
    shares = getattr(engine, "model", None) is model
    return LocalLearner(cfg, model, optimizer, scheduler, pad_id, device, dtype, ref, sampler_shares_model=shares), engine


def _engine(cfg: Config, path: str, pad_id: int, eos: list[int], device: torch.device, dtype: torch.dtype,
            model: torch.nn.Module | None, cluster: Any, closers: list, log: Callable[[str], None]) -> RolloutEngine:
    """The rollout engine: Ray workers, vLLM, an HF engine on its own copy of the weights, or on ``model`` itself
    (the trained model, in this process, sampling in the compute dtype; under LoRA from its merged layers)."""
    if cfg.dist.rollout_workers > 0:
        from dapo.distributed import RayEngine

        engine = RayEngine(cfg, path, pad_id, eos, cluster, log=log)
        closers.append(engine.close)
        return engine
    if cfg.rollout.engine == "vllm":
        from dapo.rollout.vllm import VLLMEngine

        return VLLMEngine(path, pad_id, eos, cfg, colocated=model is not None)  # training here shares the GPU
    if model is None or cfg.rollout.dtype != "auto":  # the sampler's own copy of the weights
        own = load_policy(cfg.model, path, device, sampler_dtype(cfg, device)).eval().requires_grad_(False)
        return HFEngine(own, pad_id, eos, max_batch=cfg.rollout.batch_size, merge_lora=cfg.rollout.lora_merge)
    return HFEngine(model, pad_id, eos, max_batch=cfg.rollout.batch_size, compute_dtype=dtype,
                    merge_lora=cfg.rollout.lora_merge)
