"""Supervised warm-up: makes the built-in demo's base model, a tiny Qwen2 that is right part of the time.

RL from a verifiable reward needs a policy that already succeeds sometimes: a group of G samples that
are all wrong carries no gradient. So the demo first imitates worked answers (``task.sft_response``)
for a while, then stops. When to stop matters: learning the addition format has a sharp phase
transition (on 2 CPU cores, ~10% sampled accuracy one hundred steps before ~50%), so a fixed step count
lands anywhere from useless to already solved. Instead the warm-up measures sampled accuracy
(temperature 1, the RL sampling distribution) on held-out prompts every ``eval_every`` steps and stops
at the first measurement >= ``target_accuracy``: a base that is right about a quarter of the time,
leaving RL room to climb.

Held-out here means the warm-up's own probe set (tag ``"sft-probe"``), drawn from the same reserved
slice of the prompt space as the RL eval set (see ``dapo.data.tasks``) but independently, so choosing
when to stop never tunes on the prompts RL reports on, and no warm-up step trains on any of them.

The loss is the usual next-token cross-entropy on response tokens only (prompt and padding labels are
-100, the ignore index), averaged over the batch's response tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from dapo.data.charvocab import DEFAULT_ALPHABET, make_char_tokenizer
from dapo.data.example import Example
from dapo.data.tasks import TASKS, Task, TrainStream, eval_examples, get_task
from dapo.rollout.base import SamplingParams, derive_seed
from dapo.rollout.hf import HFEngine

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt and padding): F.cross_entropy's ignore_index."""

CACHE_FORMAT = 1
"""Bump when what a cached base model means changes (task formats, tokenizer, training code)."""


# --------------------------------------------------------------------------------------------------
# the model


def build_tiny_model(
    vocab_size: int,
    eos_id: int,
    pad_id: int,
    bos_id: int,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    ffn: int = 512,
    max_pos: int = 128,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 causal LM with tied input/output embeddings (defaults: ~1.06M parameters).

    The global torch RNG is left untouched: the weights depend on ``seed`` alone.
    """
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = bos_id
    return model


# --------------------------------------------------------------------------------------------------
# batches and accuracy


def sft_batch(
    tokenizer: PreTrainedTokenizerBase, task: Task, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both (B, L): prompt + worked response + eos, right-padded.

    Right padding keeps every row's positions 0..n-1, the same positions the rollout engine gives a
    left-padded prompt (it counts positions from the attention mask). Labels are the input ids on
    response tokens (eos included) and IGNORE_INDEX on prompt and padding; the causal shift happens in
    :func:`sft_loss`.
    """
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([task.sft_response(ex) for ex in examples], add_special_tokens=False)["input_ids"]
    rows = [(p, r + [tokenizer.eos_token_id]) for p, r in zip(prompts, responses)]
    L = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    for b, (p, r) in enumerate(rows):
        input_ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        labels[b, len(p) : len(p) + len(r)] = torch.tensor(r)
    return input_ids, labels


def sft_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens. (B, L), (B, L) -> scalar.

    No attention mask: padding sits only at the end of each row, and causal attention never lets an
    earlier token see a later one, so the real tokens' logits are exactly those of the unpadded rows.
    """
    logits = model(input_ids=input_ids).logits  # (B, L, V)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    seed: int,
    greedy: bool = False,
    max_new_tokens: int | None = None,
) -> float:
    """Fraction of ``examples`` answered correctly by one sample each (temperature 1), or greedily.

    Samples come from the project's rollout engine, seeded per prompt from (seed, prompt index). The
    response text is everything generated before eos; a response cut off at ``max_new_tokens`` is
    scored as it stands.
    """
    engine = HFEngine(model, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    params = SamplingParams(
        n=1,
        max_new_tokens=max_new_tokens or task.max_response_len + 1,
        temperature=1.0,
        top_k=1 if greedy else 0,  # top-1 of the filtered distribution is the argmax: greedy decoding
    )
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    comps = engine.generate(prompts, params, [derive_seed(seed, i) for i in range(len(prompts))])
    correct = 0
    for c in comps:
        ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        # specials other than eos stay in the text ("<bos>"), so they can never look like a digit
        correct += task.score(tokenizer.decode(ids), examples[c.prompt_index].answer)[1]
    return correct / max(1, len(examples))


# --------------------------------------------------------------------------------------------------
# the warm-up loop


@dataclass
class SFTResult:
    steps: int
    """Optimiser steps taken."""
    seconds: float
    """Wall time of the loop, evaluations included."""
    cpu_seconds: float
    """CPU time of this process over the loop (all threads): comparable across busy and idle machines."""
    stopped: str
    """'target' (sampled accuracy reached the target) or 'max_steps'."""
    sampled_accuracy: float
    """Probe-set accuracy with one temperature-1 sample per prompt, at the end."""
    greedy_accuracy: float
    """Probe-set accuracy of greedy decoding, at the end."""
    final_loss: float
    history: list[dict] = field(default_factory=list)
    """One dict per measurement: step, seconds, loss (mean since the last one), sampled_acc."""


def sft(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    max_steps: int = 1000,
    target_accuracy: float | None = None,
    min_steps: int = 0,
    eval_every: int = 25,
    lr: float = 3e-3,
    batch: int = 128,
    seed: int = 0,
    n_probe: int = 256,
    warmup_steps: int = 20,
    grad_clip: float = 1.0,
    num_threads: int | None = None,
    log: Callable[[str], None] = print,
) -> SFTResult:
    """Train ``model`` in place to imitate ``task.sft_response`` with AdamW; stop on accuracy or a step cap.

    With ``target_accuracy`` set, sampled accuracy on ``n_probe`` held-out prompts is measured every
    ``eval_every`` steps from ``min_steps`` on, and training stops at the first measurement >= target.
    Without it, exactly ``max_steps`` steps run.

    The learning rate warms up linearly over ``warmup_steps`` and then stays constant; gradients are
    clipped to norm ``grad_clip`` (0 = off); AdamW uses betas (0.9, 0.95). Measured at lr 3e-3, batch
    128: without these three the loss spiked mid-transition and was 1.05 at step 200 against 0.48 with
    them. Training examples are ``TrainStream(task, seed)`` from index 0, so a run is determined by its
    arguments (and the thread count's float rounding).
    """
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _sft_loop(model, tokenizer, task, max_steps, target_accuracy, min_steps, eval_every,
                         lr, batch, seed, n_probe, warmup_steps, grad_clip, log)
    finally:
        torch.set_num_threads(old_threads)


def _sft_loop(model, tokenizer, task, max_steps, target, min_steps, eval_every, lr, batch, seed, n_probe,
              warmup_steps, grad_clip, log):
    device = next(model.parameters()).device
    stream = TrainStream(task, seed)
    probe = eval_examples(task, seed, n_probe, tag="sft-probe")
    probe_seed = derive_seed(seed, 0x5F7)  # the same sampling seeds at every measurement: less noisy comparisons
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup_steps)))
    history: list[dict] = []
    t0, c0 = time.perf_counter(), time.process_time()
    loss_sum, loss_n, step, stopped, sampled, last_loss = 0.0, 0, 0, "max_steps", None, float("nan")

    model.train()
    for step in range(1, max_steps + 1):
        input_ids, labels = sft_batch(tokenizer, task, stream.take(batch))  # (B, L) each
        loss = sft_loss(model, input_ids.to(device), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        last_loss = loss.item()
        loss_sum, loss_n = loss_sum + last_loss, loss_n + 1

        if eval_every > 0 and step >= min_steps and (step - min_steps) % eval_every == 0:
            sampled = accuracy(model, tokenizer, task, probe, probe_seed)
            model.train()
            history.append({"step": step, "seconds": round(time.perf_counter() - t0, 2),
                            "loss": loss_sum / loss_n, "sampled_acc": sampled})
            log(f"sft step {step:4d}  loss {loss_sum / loss_n:.4f}  sampled acc {sampled:.3f}"
                f"  ({time.perf_counter() - t0:.0f}s)")
            loss_sum, loss_n = 0.0, 0
            if target is not None and sampled >= target:
                stopped = "target"
                break

    if sampled is None or (stopped != "target" and history[-1]["step"] != step):
        sampled = accuracy(model, tokenizer, task, probe, probe_seed)
    greedy = accuracy(model, tokenizer, task, probe, probe_seed, greedy=True)
    model.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    log(f"sft done: {step} steps, {seconds:.0f}s, held-out accuracy sampled {sampled:.3f} greedy {greedy:.3f}"
        f" ({stopped})")
    if target is not None and stopped != "target":
        log(f"warning: sampled accuracy {sampled:.3f} never reached the target {target} in {max_steps} steps")
    return SFTResult(step, seconds, cpu_seconds, stopped, sampled, greedy, last_loss, history)


# --------------------------------------------------------------------------------------------------
# the demo's base model, cached


@dataclass(frozen=True)
class SFTSettings:
    """Everything that determines a base model; its hash names the cache directory."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    ffn: int = 512
    max_pos: int = 128
    lr: float = 3e-3
    batch: int = 128
    warmup_steps: int = 20
    grad_clip: float = 1.0
    target_accuracy: float | None = 0.25
    """Stop at the first probe measurement of sampled accuracy >= this; None = run ``max_steps``."""
    min_steps: int = 150
    """No measurement before this step (accuracy is ~0 until the phase transition)."""
    eval_every: int = 20
    max_steps: int = 1000
    n_probe: int = 256
    seed: int = 0

    def key(self, task_name: str) -> str:
        blob = json.dumps(
            {"task": task_name, "settings": dataclasses.asdict(self), "alphabet": DEFAULT_ALPHABET,
             "format": CACHE_FORMAT},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def task_settings(task_name: str) -> SFTSettings:
    """The default settings with the task's own ``sft_overrides`` (e.g. multisum trains a fixed number of steps)."""
    return dataclasses.replace(SFTSettings(), **get_task(task_name).sft_overrides)


def default_threads() -> int:
    """Torch threads for the warm-up: one per core that is idle right now, 1 to 4.

    A second thread only pays on an idle core. Measured on a 2-core machine: a step took 0.47 s with
    2 threads and 0.78 s with 1 when the machine was otherwise quiet, but 4.7 s with 2 threads when
    one other process was busy (each parallel region waits for the thread sharing a core, spinning
    meanwhile). 4 is the most a 1M-parameter model uses well.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores, round(cores * idle_fraction())))


def idle_fraction(window_s: float = 0.25) -> float:
    """Fraction of CPU time the whole machine spent idle over ``window_s`` (Linux ``/proc/stat``);
    elsewhere estimated from the 1-minute load average, which lags by about a minute."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(x) for x in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal ...
        return vals[3] + vals[4], sum(vals[:8])

    try:
        idle0, total0 = sample()
        time.sleep(window_s)
        idle1, total1 = sample()
        return (idle1 - idle0) / max(1, total1 - total0)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cores = os.cpu_count() or 1
        return max(0.0, 1.0 - os.getloadavg()[0] / cores)
    except (AttributeError, OSError):
        return 1.0


def default_cache_dir() -> Path:
    """``$DAPO_CACHE`` or ``~/.cache/dapo``."""
    return Path(os.environ.get("DAPO_CACHE") or Path.home() / ".cache" / "dapo")


def base_model_dir(task_name: str, settings: SFTSettings, cache_dir: str | Path | None = None) -> Path:
    """Where the base model for (task, settings) lives in the cache, built or not."""
    return Path(cache_dir or default_cache_dir()) / "base" / f"{task_name}-{settings.key(task_name)}"


def is_complete(path: Path) -> bool:
    """A base model directory is trusted only with its ``sft.json`` (written last, before the atomic rename)."""
    return (path / "sft.json").is_file()


def build_base_model(
    out_dir: str | Path,
    task_name: str = "addition",
    settings: SFTSettings | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    num_threads: int | None = None,
) -> Path:
    """Train a base model and write it (safetensors + tokenizer + ``sft.json``) to ``out_dir`` atomically.

    Everything is written to a temporary sibling directory that is renamed into place at the end, so
    an interrupted build leaves no ``out_dir`` at all. An existing complete ``out_dir`` is returned as
    is unless ``force``; with ``force`` it is replaced only once the new one is complete.
    """
    out = Path(out_dir)
    if is_complete(out) and not force:
        log(f"{out} already holds a base model; force=True (--force) rebuilds it")
        return out
    task = get_task(task_name)
    settings = settings or task_settings(task_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tokenizer = make_char_tokenizer()
    s = settings
    model = build_tiny_model(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
                             tokenizer.bos_token_id, s.layers, s.hidden, s.heads, s.ffn, s.max_pos, s.seed)
    n_params = sum(p.numel() for p in model.parameters())
    threads = num_threads or default_threads()
    log(f"preparing the base model for task {task_name!r}: {n_params / 1e6:.2f}M parameters, "
        f"{threads} thread(s) -> {out}")
    res = sft(model, tokenizer, task, max_steps=s.max_steps, target_accuracy=s.target_accuracy,
              min_steps=s.min_steps, eval_every=s.eval_every, lr=s.lr, batch=s.batch, seed=s.seed,
              n_probe=s.n_probe, warmup_steps=s.warmup_steps, grad_clip=s.grad_clip, num_threads=threads, log=log)

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {
            "task": task_name,
            "steps": res.steps,
            "seconds": round(res.seconds, 2),
            "cpu_seconds": round(res.cpu_seconds, 2),
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "stopped": res.stopped,
            "sampled_accuracy": res.sampled_accuracy,
            "greedy_accuracy": res.greedy_accuracy,
            "final_loss": res.final_loss,
            "seed": s.seed,
            "n_params": n_params,
            "threads": threads,
            "settings": dataclasses.asdict(s),
            "history": res.history,
            "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        }
        (tmp / "sft.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _install(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return out


def prepare_base_model(
    task_name: str = "addition",
    cache_dir: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    settings: SFTSettings | None = None,
    num_threads: int | None = None,
) -> Path:
    """The demo's base model directory for ``task_name``: from the cache, or trained now (~1-2 min on 2 cores).

    Load it with ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``;
    ``path / "sft.json"`` records steps, seconds, and the probe accuracies (sampled and greedy).
    ``num_threads`` (default: :func:`default_threads`) changes float rounding, not the cache key: the
    cache holds whichever build finished first.
    """
    settings = settings or task_settings(task_name)  # fails on a bad task name before touching the cache
    out = base_model_dir(task_name, settings, cache_dir)
    if is_complete(out) and not force:
        log(f"base model for task {task_name!r}: cached at {out}")
        return out
    return build_base_model(out, task_name, settings, force=force, log=log, num_threads=num_threads)


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is moved aside first (force) and then removed."""
    old = None
    if out.exists():
        if is_complete(out) and not force:  # a concurrent build finished first: keep it
            return
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if not is_complete(out):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_tmp(out: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary build directories of ``out`` left by killed builds (older than an hour)."""
    now = time.time()
    for p in out.parent.glob(f".tmp-{out.name}-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --------------------------------------------------------------------------------------------------
# `dapo sft`


def sft_main(argv: Sequence[str] | None = None) -> Path:
    """``dapo sft --task addition [--out DIR] [--target-acc 0.25] [--max-steps N] [--min-steps N] [--force] ...``.

    Without ``--out`` the model goes to the cache that ``dapo train`` reads. Prints and returns the path.
    """
    d = SFTSettings()
    ap = argparse.ArgumentParser(prog="dapo sft", description="supervised warm-up: make a task's demo base model",
                                 epilog="Defaults are the task's own settings (the ones `dapo train` uses); the "
                                        "values shown are addition's.")
    ap.add_argument("--task", default="addition", help=f"built-in task: {', '.join(TASKS)} (default: addition)")
    ap.add_argument("--out", default="", help="output directory (default: the cache used by `dapo train`)")
    ap.add_argument("--target-acc", type=float, help=f"stop at this held-out sampled accuracy (default "
                    f"{d.target_accuracy}); <= 0: run --max-steps")
    ap.add_argument("--max-steps", type=int, help=f"step cap (default {d.max_steps})")
    ap.add_argument("--min-steps", type=int, help=f"first measurement (default {d.min_steps})")
    ap.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d.lr})")
    ap.add_argument("--batch", type=int, help=f"examples per step (default {d.batch})")
    ap.add_argument("--n-probe", type=int, help=f"held-out prompts per accuracy measurement (default {d.n_probe})")
    ap.add_argument("--seed", type=int, help=f"model init and data seed (default {d.seed})")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: one per idle core, at most 4)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    a = ap.parse_args(argv)
    settings = task_settings(a.task)
    given = {"max_steps": a.max_steps, "min_steps": a.min_steps, "lr": a.lr, "batch": a.batch, "seed": a.seed,
             "n_probe": a.n_probe}
    if a.target_acc is not None:
        given["target_accuracy"] = a.target_acc if a.target_acc > 0 else None
    settings = dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})
    if a.out:
        path = build_base_model(a.out, a.task, settings, force=a.force, num_threads=a.threads or None)
    else:
        path = prepare_base_model(a.task, force=a.force, settings=settings, num_threads=a.threads or None)
    print(path)
    return path
