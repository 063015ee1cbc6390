"""Everything a run needs, built from its config: run directory, model, tokenizer, data, reward, engine,
optimiser. Kept apart from the loop so the loop reads as the algorithm."""
from __future__ import annotations

import copy
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dapo.config import Config
from dapo.data.example import Example
from dapo.rollout.base import RolloutEngine
from dapo.rollout.hf import HFEngine
from dapo.trainer.batch import PromptItem, ScoreFn
from dapo.trainer.checkpoint import is_complete, latest_checkpoint, newer_checkpoints
from dapo.trainer.policy import ResponseLogprobs
from dapo.trainer.prompts import ListPromptStream, TaskPromptStream, encode_prompts
from dapo.trainer.update import SINGLE, DataParallel, Learner, LocalLearner


class SetupError(ValueError):
    pass


@dataclass
class RunParts:
    """The run's pieces. In one process ``model``/``optimizer``/``scheduler`` are the trained ones and
    ``learner`` wraps them; with Ray trainer ranks they live on the ranks (None here, or ``model`` is
    the in-process engine's copy) and ``learner`` is a ``dapo.dist.RankGroup``."""

    model: torch.nn.Module | None
    tokenizer: Any
    engine: RolloutEngine
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    stream: Any
    eval_items: list[PromptItem]
    score_fn: ScoreFn
    decode: Callable[[list[int]], str]
    pad_id: int
    device: torch.device
    ref_model: torch.nn.Module | None = None
    bad_in_a_row: int = 0
    closers: list[Callable[[], None]] = field(default_factory=list)
    dp: DataParallel = SINGLE
    learner: Learner | None = None
    run_dir: Path | None = None
    resume_from: Path | None = None
    policy: ResponseLogprobs | None = None

    def __post_init__(self):
        if self.policy is None and self.model is not None:
            self.policy = ResponseLogprobs(self.model)
        if self.learner is None:
            self.learner = LocalLearner(self)

    def close(self) -> None:
        """Run every closer (reward pool, Ray workers and ranks, the cluster), even if one fails."""
        errors = []
        for c in self.closers:
            try:
                c()
            except Exception as e:  # noqa: BLE001  keep closing the rest; report the first below
                errors.append(e)
        if errors:
            raise errors[0]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"model.device={name}: CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise SetupError(f"model.dtype={name!r}: use auto, float32, bfloat16 or float16") from None


def resume_source(cfg: Config) -> tuple[Path, Path | None]:
    """(run directory, checkpoint) that ``ckpt.resume`` names, checked; no checkpoint only for a run killed
    before its first one. Changes nothing on disk."""
    p = Path(cfg.ckpt.resume)
    if not p.exists():
        raise SetupError(f"ckpt.resume={cfg.ckpt.resume}: no such directory")
    if (p / "trainer_state.pt").exists() or p.name.startswith("step_"):
        if not is_complete(p, verify=True):
            raise SetupError(f"ckpt.resume={cfg.ckpt.resume}: not a complete checkpoint (manifest missing, or a "
                             f"file missing or damaged); resume from the run directory to use its newest complete one")
        return p.parent, p
    ckpt = latest_checkpoint(p)
    if ckpt is None and not (p / "config.yaml").exists():
        raise SetupError(f"ckpt.resume={cfg.ckpt.resume}: no complete checkpoint (step_N/ with a manifest) in it")
    return p, ckpt  # None: a run killed before its first checkpoint, nothing to lose: it starts again


def resolve_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None). Never reuses a finished run's directory silently.

    A resume continues in the checkpoint's own run directory, dropping what was logged after the checkpoint
    (it is produced again). Continuing from a checkpoint older than the run's newest would overwrite the newer
    checkpoints and their metrics: that is refused. Naming another run (``log.run_name``, ``log.out_dir``:
    other than the resumed run's own) branches off instead: a new directory, which the loop starts with the
    source's metrics and samples up to the checkpoint, and the source is left untouched.
    """
    if cfg.ckpt.resume:
        source, ckpt = resume_source(cfg)
        if _names_another_run(cfg, source):
            branch = Path(cfg.log.out_dir) / cfg.log.run_name
            if branch.exists() and any(branch.iterdir()):
                raise SetupError(f"log.run_name: {branch} already exists and is not empty; a resume branches into a "
                                 f"new directory only (or leave log.run_name as it was to continue in {source})")
            branch.mkdir(parents=True, exist_ok=True)
            return branch, ckpt
        newer = [q.name for q in newer_checkpoints(ckpt)] if ckpt is not None else []
        if newer:
            raise SetupError(
                f"ckpt.resume={cfg.ckpt.resume}: {source} has newer checkpoints ({', '.join(newer)}); continuing from "
                f"{ckpt.name} there would overwrite them and the metrics after it. Branch into a new directory with "
                f"log.run_name=NEW_NAME, or resume the newest with ckpt.resume={source}"
            )
        return source, ckpt
    name = cfg.log.run_name or f"{cfg.preset.replace('+', 'plus_')}-{cfg.data.task if not cfg.data.path else Path(cfg.data.path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.log.out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SetupError(
            f"run directory {run_dir} already exists and is not empty; continue it with ckpt.resume={run_dir} "
            f"or choose another log.run_name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def _names_another_run(cfg: Config, source: Path) -> bool:
    """``log.out_dir``/``log.run_name`` point away from ``source`` and were not simply carried over from its
    saved config (a run that was moved or copied still names where it was first written)."""
    if not cfg.log.run_name:
        return False
    target = Path(cfg.log.out_dir) / cfg.log.run_name
    if target.resolve() == source.resolve():
        return False
    saved = source / "config.yaml"
    if saved.exists():
        import yaml

        try:
            log = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("log", {})
        except (OSError, yaml.YAMLError):
            log = {}
        if (str(log.get("out_dir")), str(log.get("run_name"))) == (str(cfg.log.out_dir), str(cfg.log.run_name)):
            return False
    return True


def _load_error(cfg: Config, path: str, e: Exception) -> SetupError:
    hint = ""
    if "safetensors" in str(e).lower() and not cfg.model.allow_unsafe_weights:
        hint = " (only safetensors weights load by default; model.allow_unsafe_weights=true allows pickle files)"
    return SetupError(f"cannot load model.path={path!r}: {e}{hint}")


def load_model(cfg: Config, path: str, device: torch.device) -> torch.nn.Module:
    """The causal LM at ``path`` on ``device`` in the configured dtype (also what Ray workers and ranks load)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(cfg.model.dtype, device), trust_remote_code=cfg.model.trust_remote_code,
            use_safetensors=None if cfg.model.allow_unsafe_weights else True,
            attn_implementation=cfg.model.attn_implementation,
        )
    except (OSError, ValueError, pickle.UnpicklingError) as e:  # the last: weights_only refused a pickle's contents
        raise _load_error(cfg, path, e) from None
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device)


def load_tokenizer(cfg: Config, path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(cfg, path, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model_and_tokenizer(cfg: Config, path: str, device: torch.device, log: Callable[[str], None]):
    return load_model(cfg, path, device), load_tokenizer(cfg, path)


def contention_warning(threads: int, cores: int, idle: Callable[[], float], env: dict[str, str]) -> str | None:
    """A warning when other processes keep the CPU busy and OpenMP would spin: None when all is well.

    ``idle`` measures the machine's idle fraction (``dapo.trainer.sft.idle_fraction``: a quarter-second
    sample); it is called only when the thread count and environment leave spinning possible.

    With more than one torch thread and the default OpenMP wait policy, each parallel region spins
    waiting for threads that share a core with another busy process: measured here, a run next to one
    other busy process went from 40 s to over 5 CPU-minutes. ``OMP_WAIT_POLICY=PASSIVE`` avoids it (at
    ~10% cost on an idle machine), so dapo does not set it for you.
    """
    if threads <= 1 or "OMP_WAIT_POLICY" in env:
        return None
    busy = cores * (1.0 - idle())
    if busy < 0.5:
        return None
    return (f"the CPU is busy with other work ({busy:.1f} of {cores} cores) and torch uses {threads} threads: "
            f"OpenMP threads spin while waiting and can make training several times slower; set "
            f"OMP_WAIT_POLICY=PASSIVE (or OMP_NUM_THREADS=1) in the environment before starting dapo")


def make_optimizer(cfg: Config, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its linear warm-up schedule (per optimiser step), the same on every trainer rank."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel (as HF Trainer's default adamw_torch_fused): 3-4x faster steps than the per-tensor
    # loop on CPU. Plain float tensors on CPU/CUDA only: FSDP2's sharded DTensors keep the default.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not hasattr(p, "full_tensor")
                for p in params)
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused or None)
    warm = o.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warm) if warm else 1.0)
    return optimizer, scheduler


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(x) for x in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise SetupError("the tokenizer has no eos_token and the model's generation_config names none")
    return sorted(ids)


def _task_parts(cfg: Config, tokenizer: Any):
    from dapo.data.tasks import get_task, task_splits

    try:
        task = get_task(cfg.data.task)
    except ValueError as e:
        raise SetupError(f"data.task: {e}") from None
    eval_ex, stream = task_splits(task, cfg.seed, cfg.data.eval_size, cfg.data.eval_seed)

    def encode(ex: Example) -> list[int]:
        return tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]

    def score_fn(texts: list[str], exs: list[Example]):
        out = [task.score(t, e.answer) for t, e in zip(texts, exs)]
        return [s for s, _ in out], [c for _, c in out], {}

    eval_items = [PromptItem(-1 - i, ex, encode(ex)) for i, ex in enumerate(eval_ex)]
    return TaskPromptStream(stream, encode), eval_items, score_fn, []


def _file_parts(cfg: Config, tokenizer: Any, log: Callable[[str], None]):
    from dapo.data.files import load_examples
    from dapo.rewards import RewardRunner

    d = cfg.data
    template = "dapo_math" if d.template == "auto" else d.template

    def load(path: str) -> tuple[list[Example], list[list[int]]]:
        exs, stats = load_examples(path, d.prompt_key, d.answer_key, bad_rows=d.bad_rows, dedup=d.dedup)
        log(f"{path}: {stats}")
        exs, fitted, n_drop, n_trunc = encode_prompts(exs, template, tokenizer, d.max_prompt_len, d.long_prompts)
        if n_drop or n_trunc:
            log(f"{path}: {n_drop} prompts longer than data.max_prompt_len={d.max_prompt_len} dropped, {n_trunc} truncated")
        if not exs:
            raise SetupError(f"{path}: no prompts left after the length filter (data.max_prompt_len={d.max_prompt_len})")
        return exs, fitted

    exs, ids = load(d.path)
    if d.eval_path:
        ev, ev_ids = load(d.eval_path)
        ev, ev_ids = ev[: d.eval_size], ev_ids[: d.eval_size]
    else:  # hold out a seeded slice of the training file (at most a tenth of it)
        order = list(range(len(exs)))
        random.Random(f"{cfg.seed if d.eval_seed is None else d.eval_seed}/holdout").shuffle(order)
        n_ev = min(d.eval_size, len(exs) // 10)
        ev_set = set(order[:n_ev])
        ev, ev_ids = [exs[i] for i in order[:n_ev]], [ids[i] for i in order[:n_ev]]
        exs, ids = [e for i, e in enumerate(exs) if i not in ev_set], [x for i, x in enumerate(ids) if i not in ev_set]
    fn = "math" if d.reward == "auto" else d.reward
    runner = RewardRunner(fn, workers=d.reward_workers, timeout_s=d.reward_timeout_s, memory_mb=d.reward_memory_mb or None)

    def score_fn(texts: list[str], examples: list[Example]):
        res = runner.score(texts, [e.answer for e in examples], [dict(e.fields, data_source=e.data_source) for e in examples])
        return res.scores, res.correct, res.stats

    eval_items = [PromptItem(-1 - i, e, x) for i, (e, x) in enumerate(zip(ev, ev_ids))]
    return ListPromptStream(exs, ids, cfg.seed, d.shuffle), eval_items, score_fn, [runner.close]


def _generation_eos(cfg: Config, path: str) -> Any:
    """Something with the model's ``generation_config``, without loading its weights."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))
    except (OSError, ValueError):
        return SimpleNamespace(generation_config=None)


def reference_model(cfg: Config, model: torch.nn.Module, path: str, ref_path: str | None,
                    device: torch.device) -> torch.nn.Module:
    """The frozen KL reference: a copy of ``model`` (loaded from ``path``) when ``ref_path`` is that same
    model or None, else the run's initial model loaded from ``ref_path`` (a resumed run)."""
    if ref_path is None or ref_path == path:
        ref = copy.deepcopy(model)
    else:
        try:
            ref = load_model(cfg, ref_path, device)
        except SetupError as e:
            raise SetupError(f"algo.kl_coef > 0: the KL reference is the run's initial model, which did not load: {e}") from None
    return ref.eval().requires_grad_(False)


def initial_model_path(cfg: Config, log: Callable[[str], None] = print) -> str:
    """The model a run starts from: ``model.path``, or the built-in task's base model (prepared if not cached)."""
    if cfg.model.path:
        return cfg.model.path
    from dapo.trainer.sft import prepare_base_model

    return str(prepare_base_model(cfg.data.task, log=log))


def build_parts(cfg: Config, run_dir: Path, resume_from: Path | None, log: Callable[[str], None] = print) -> RunParts:
    """Build the run. ``dist.rollout_workers`` > 0 puts rollout on Ray workers (``dapo.dist.RayEngine``),
    ``dist.trainer_ranks`` > 1 puts training on Ray ranks (``dapo.dist.RankGroup``); the loop is the same."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = resolve_device(cfg.model.device)
    init = initial_model_path(cfg, log) if resume_from is None or cfg.algo.kl_coef > 0 else None
    path = str(resume_from) if resume_from is not None else init
    # the KL reference is the run's initial policy, also after a resume (not the checkpoint resumed from)
    ref_path = init if cfg.algo.kl_coef > 0 else None
    d = cfg.dist
    remote_rollout, remote_train = d.rollout_workers > 0, d.trainer_ranks > 1
    if d.ray_address and not (remote_rollout or remote_train):
        log(f"dist.ray_address={d.ray_address} is set but dist.rollout_workers=0 and dist.trainer_ranks=1: "
            f"everything runs in this process")
    tokenizer = load_tokenizer(cfg, path)
    # the driver holds a model only when it trains or samples in this process
    local_engine = not remote_rollout and not d.rollout_on_ranks and cfg.rollout.engine == "hf"
    model = load_model(cfg, path, device) if (local_engine or not remote_train) else None
    if cfg.data.path:
        stream, eval_items, score_fn, closers = _file_parts(cfg, tokenizer, log)
    else:
        stream, eval_items, score_fn, closers = _task_parts(cfg, tokenizer)
    pad_id = int(tokenizer.pad_token_id)
    eos = eos_ids(model if model is not None else _generation_eos(cfg, path), tokenizer)
    optimizer = scheduler = ref = None
    if not remote_train:
        optimizer, scheduler = make_optimizer(cfg, model)
        if ref_path is not None:
            ref = reference_model(cfg, model, path, ref_path, device)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    parts = RunParts(model, tokenizer, None, optimizer, scheduler, stream, eval_items, score_fn, decode, pad_id,
                     device, ref, 0, closers, run_dir=run_dir, resume_from=resume_from)
    cluster = None
    try:
        if remote_rollout or remote_train:
            from dapo.dist import Cluster

            cluster = Cluster(d, want_gpu=cfg.model.device != "cpu", log=log)
        if remote_train:
            from dapo.dist import RankGroup

            parts.learner = RankGroup(cfg, path, pad_id, cluster, log=log, ref_path=ref_path, eos=eos)
            parts.closers.append(parts.learner.close)
        if d.rollout_on_ranks:
            from dapo.dist.ranks import RankEngine

            parts.engine = RankEngine(parts.learner)
        elif remote_rollout:
            from dapo.dist import RayEngine

            parts.engine = RayEngine(cfg, path, pad_id, eos, cluster, log=log)
            parts.closers.append(parts.engine.close)
        elif cfg.rollout.engine == "vllm":
            from dapo.rollout.vllm import VLLMEngine

            parts.engine = VLLMEngine(path, pad_id, eos, cfg)
        else:
            parts.engine = HFEngine(model, pad_id, eos, max_batch=cfg.rollout.batch_size)
    except BaseException as e:
        parts.close()
        if cluster is not None:
            cluster.close()
        if isinstance(e, ImportError):
            raise SetupError(str(e)) from None
        raise
    if cluster is not None:
        parts.closers.append(cluster.close)  # last: after the workers and ranks are gone
    return parts
