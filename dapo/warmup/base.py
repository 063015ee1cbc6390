"""Base models made by the warm-up: the built-in tasks' demo bases (cached) and a user's own (``dapo sft --data``).

A base model directory holds the model and tokenizer in Hugging Face format (safetensors), ``sft.json``
(how it was made: steps, seconds, probe accuracies, settings) and ``prompt_template.json`` (the template its
prompts were rendered with, which ``dapo train`` then keeps). It is written to a temporary sibling and
renamed into place (``dapo.fsutil.install_dir``), so a killed build leaves nothing that looks finished.

Held-out prompts: a task's warm-up measures accuracy on its own probe set (tag ``"sft-probe"``), drawn from
the same reserved slice of the prompt space as the RL eval set but independently, so choosing when to stop
never tunes on the prompts RL reports on; a file's warm-up holds out exactly the rows ``dapo train`` will
hold out with the same seed, and never trains on them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dapo.config import Config, SFTConfig
from dapo.data.charvocab import DEFAULT_ALPHABET, make_char_tokenizer
from dapo.data.tasks import TrainStream, eval_examples, get_task
from dapo.fsutil import install_dir, occupied, staging_dir
from dapo.items import PromptItem
from dapo.problems import as_file_template, save_template, task_score_fn
from dapo.warmup.sft import Pair, SFTResult, make_probe, sft
from dapo.warmup.tiny import build_tiny_model

CACHE_FORMAT = 2
"""Bump when what a cached base model means changes (task formats, tokenizer, training or probe code)."""
INFO = "sft.json"


def default_cache_dir() -> Path:
    """``$DAPO_CACHE`` or ``~/.cache/dapo``."""
    return Path(os.environ.get("DAPO_CACHE") or Path.home() / ".cache" / "dapo")


def task_settings(task_name: str) -> SFTConfig:
    """The warm-up settings of a task's demo base: the defaults with the task's own ``sft_overrides``."""
    return dataclasses.replace(SFTConfig(), **get_task(task_name).sft_overrides)


def cache_key(task_name: str, settings: SFTConfig, seed: int) -> str:
    blob = json.dumps({"task": task_name, "settings": dataclasses.asdict(settings), "seed": seed,
                       "alphabet": DEFAULT_ALPHABET, "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def base_model_dir(task_name: str, settings: SFTConfig, cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Where the base model for (task, settings, seed) lives in the cache, built or not."""
    return Path(cache_dir or default_cache_dir()) / "base" / f"{task_name}-{cache_key(task_name, settings, seed)}"


def is_built(path: Path) -> bool:
    """A directory is a finished base model only with its ``sft.json`` (written last, inside the rename)."""
    return (path / INFO).is_file()


def reuse_base(out: Path, key: str, value: str, log: Callable[[str], None]) -> Path:
    """A finished base at ``out`` asked for again without --force: returned as it is when it was made from the same
    ``key`` (``task`` or ``data``, its sft.json says), refused when from another (it would stand in silently)."""
    try:
        info = json.loads((out / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    have = info.get(key)
    made = next((f"{k} {info[k]!r}" for k in ("data", "task") if info.get(k)), "unrecorded inputs")
    same = have == value or (key == "data" and isinstance(have, str) and bool(have)
                             and Path(have).expanduser().resolve() == Path(value).expanduser().resolve())
    if not same:
        raise FileExistsError(f"--out {out}: already holds a base model made from {made} (its {INFO}), not {key} "
                              f"{value!r}: --force replaces it, or choose another --out")
    log(f"{out} already holds a base model made from this {key}; --force rebuilds it")
    return out


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that holds something other than a dapo base: a run, a checkpoint, a user's files.
    Only a finished base (its ``sft.json``) is ever replaced (with ``--force``), and an empty directory filled."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: is a file, not a directory; choose a new directory")
    if occupied(out) and not is_built(out):
        raise FileExistsError(f"--out {out}: already exists, is not empty and is not a dapo base (no {INFO}); "
                              f"dapo sft never replaces what it did not write: choose a new directory")


def tiny_model_for(tokenizer: Any, s: SFTConfig, seed: int, max_pos: int = 0) -> torch.nn.Module:
    return build_tiny_model(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id,
                            s.layers, s.hidden, s.heads, s.ffn, max(s.max_pos, max_pos), seed)


def write_base(out: Path, model: torch.nn.Module, tokenizer: Any, template: str, meta: dict[str, Any],
               force: bool, own_dir: bool = False) -> Path:
    """Write the model directory atomically; an existing finished ``out`` is replaced only with ``force``."""
    tmp = staging_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_template(tmp, template)
        meta = {**meta, "template": as_file_template(template),
                "versions": {"torch": torch.__version__, "transformers": _transformers_version()}}
        (tmp / INFO).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if not own_dir:  # a user's --out (dapo's cache is its own: a partial entry there is replaced)
            check_out_dir(out)  # again, just before the rename: something may have appeared there while training
        install_dir(tmp, out, replace=force or not is_built(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return out


def result_meta(res: SFTResult, settings: SFTConfig, seed: int, n_params: int, threads: int) -> dict[str, Any]:
    return {
        "steps": res.steps, "seconds": round(res.seconds, 2), "cpu_seconds": round(res.cpu_seconds, 2),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "stopped": res.stopped, "sampled_accuracy": res.sampled_accuracy, "greedy_accuracy": res.greedy_accuracy,
        "final_loss": res.final_loss, "held_out_loss": res.held_out_loss, "seed": seed, "n_params": n_params, "threads": threads,
        "settings": dataclasses.asdict(settings), "history": res.history,
    }


# --------------------------------------------------------------------------------------------------
# a built-in task's demo base


def task_pairs(task: Any, tokenizer: Any, seed: int) -> Callable[[int], list[Pair]]:
    """The next n (prompt, worked response + eos) pairs of the task's training stream. A response with tool
    calls (``Task.sft_turns``) is tokenised as a multi-turn rollout builds it, each segment on its own, every
    model turn followed by eos, and comes with a mask that is False on the tools' results (no loss there)."""
    stream = TrainStream(task, seed)
    eos = tokenizer.eos_token_id

    def take(n: int) -> list[Pair]:
        exs = stream.take(n)
        prompts = tokenizer([ex.prompt for ex in exs], add_special_tokens=False)["input_ids"]
        out: list[Pair] = []
        for ex, p in zip(exs, prompts):
            segments = task.sft_turns(ex)
            ids = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
            resp = [t for seg, (_, model) in zip(ids, segments) for t in seg + ([eos] if model else [])]
            mask = [model for seg, (_, model) in zip(ids, segments) for _ in range(len(seg) + model)]
            out.append((p, resp) if all(mask) else (p, resp, mask))
        return out

    return take


def build_base_model(out_dir: str | Path, task_name: str = "addition", settings: SFTConfig | None = None,
                     seed: int = 0, force: bool = False, log: Callable[[str], None] = print,
                     num_threads: int | None = None, own_dir: bool = False) -> Path:
    """Warm a tiny model up on a built-in task and write it to ``out_dir`` (see the module docstring).

    An existing finished ``out_dir`` is returned as is unless ``force``; with ``force`` it is replaced only
    once the new one is complete.
    """
    from dapo.cpu import default_threads

    out = Path(out_dir)
    if is_built(out) and not force:
        return reuse_base(out, "task", task_name, log)
    if not own_dir:
        check_out_dir(out)
    _remove_stale_tmp(out)
    task = get_task(task_name)
    s = settings or task_settings(task_name)
    tokenizer = make_char_tokenizer()
    model = tiny_model_for(tokenizer, s, seed)
    n_params = sum(p.numel() for p in model.parameters())
    threads = num_threads or default_threads()
    log(f"preparing the base model for task {task_name!r}: {n_params / 1e6:.2f}M parameters, "
        f"{threads} thread(s) -> {out}")
    probe_exs = eval_examples(task, seed, s.n_probe, tag="sft-probe")
    items = [PromptItem(-1 - i, ex, tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
             for i, ex in enumerate(probe_exs)]
    runner = None
    if task.tools:  # the probe's rollouts call the tools its responses name, as dapo train --tools does
        from dapo.envs import ToolEnv, ToolRunner

        runner = ToolRunner(task.tools, workers=1)
    try:
        probe = make_probe(items, task_score_fn(task), tokenizer, seed, task.max_response_len + 1,
                           make_env=(lambda: ToolEnv(runner)) if runner else None)
        res = sft(model, task_pairs(task, tokenizer, seed), tokenizer.pad_token_id, s, probe, threads, log)
    finally:
        if runner is not None:
            runner.close()
    return write_base(out, model, tokenizer, "none", {"task": task_name, **result_meta(res, s, seed, n_params, threads)},
                      force, own_dir)


def prepare_base_model(task_name: str = "addition", cache_dir: str | Path | None = None, force: bool = False,
                       log: Callable[[str], None] = print, settings: SFTConfig | None = None,
                       num_threads: int | None = None, seed: int = 0) -> Path:
    """The demo's base model directory for ``task_name``: from the cache, or trained now (~1-2 min on 2 cores).

    Load it with ``AutoModelForCausalLM.from_pretrained(path)`` and ``PreTrainedTokenizerFast.from_pretrained(path)``
    (``AutoTokenizer`` in transformers 5 swaps in Qwen2's byte-level pre-tokenizer, which drops the spaces).
    ``num_threads`` (default: one per idle core) changes float rounding, not the cache key: the cache
    holds whichever build finished first.
    """
    settings = settings or task_settings(task_name)  # fails on a bad task name before touching the cache
    out = base_model_dir(task_name, settings, cache_dir, seed)
    if is_built(out) and not force:
        log(f"base model for task {task_name!r}: cached at {out}")
        return out
    return build_base_model(out, task_name, settings, seed, force=force, log=log, num_threads=num_threads, own_dir=True)


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
# a user's own file: dapo sft --data FILE


def example_pairs(item: PromptItem, template: str, tokenizer: Any, cfg: Config,
                  tools: list[dict[str, Any]] | None = None) -> list[Pair]:
    """The (prompt, response + eos) pairs one row teaches: its ``sft.response_key`` column after its prompt,
    or else every assistant turn of its conversation (a ``messages`` row), each after the conversation so
    far, rendered as ``dapo train`` renders prompts (:func:`dapo.data.templates.assistant_turns`): a tool-use
    conversation's calls and results included, with ``tools`` (``env.tools``' schemas) or else the row's own
    ``tools`` column given to the chat template."""
    from dapo.data.files import response_value, row_conversation
    from dapo.data.templates import assistant_turns, fit_prompts
    from dapo.problems import row_tools

    eos = tokenizer.eos_token_id
    fields, key = item.example.fields, cfg.sft.response_key
    value = response_value(fields, key)
    if value is not None:
        return [(item.prompt_ids, tokenizer(str(value), add_special_tokens=False)["input_ids"] + [eos])]
    conversation = row_conversation(fields, cfg.data.prompt_key)
    if not any(m.get("role") == "assistant" for m in conversation):
        return []  # the loader refused (or skipped) such training rows; a held-out row of eval.path teaches nothing
    chat = template.endswith("chat")
    out = []
    try:
        turns = assistant_turns(conversation, template, tokenizer, tools or row_tools(item.example))
    except ValueError as e:
        raise ValueError(f"{cfg.data.path}: {e}") from None
    for prompt, response in turns:
        ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        kept, fitted, _, _ = fit_prompts([ids], cfg.data.max_prompt_len, cfg.data.long_prompts)
        if not kept:
            continue  # an earlier turn's prompt is measured like any prompt
        resp = tokenizer(response, add_special_tokens=False)["input_ids"]
        resp = resp[: resp.index(eos) + 1] if eos in resp else resp + [eos]  # ends at the turn's own end
        out.append((fitted[0], resp))
    return out


def file_pairs(problems: Any, tokenizer: Any, cfg: Config) -> Callable[[int], list[Pair]]:
    """The next n (prompt, response + eos) pairs of a file's training stream (its epochs, shuffled)."""
    queue: list[Pair] = []

    def take(n: int) -> list[Pair]:
        while len(queue) < n:
            for it in problems.stream.take(n - len(queue)):
                queue.extend(example_pairs(it, problems.template, tokenizer, cfg, problems.tools))
        out = queue[:n]
        del queue[:n]
        return out

    return take


def _stopping_rule(s: SFTConfig, answered: bool, held_out: bool, cfg: Config) -> str:
    """What ends this warm-up, in words for the log."""
    if answered and s.target_accuracy is not None:
        return (f"held-out sampled accuracy under reward {cfg.reward.fn} >= sft.target_accuracy="
                f"{s.target_accuracy}, or sft.max_steps={s.max_steps}")
    why = ("sft.target_accuracy is null" if s.target_accuracy is None
           else f"the held-out rows have no answer (data.answer_key={cfg.data.answer_key})")
    if held_out and s.patience > 0:
        return (f"{why}: held-out loss no better for sft.patience={s.patience} measurements (every "
                f"sft.eval_every={s.eval_every} steps from sft.min_steps={s.min_steps}), or sft.max_steps={s.max_steps}")
    return f"{why}: a fixed budget of sft.max_steps={s.max_steps} steps"


def _check_reachable(held_out: list[Any], problems: Any, tokenizer: Any, cfg: Config,
                     log: Callable[[str], None]) -> None:
    """Score the held-out rows' own responses (what the warm-up teaches) with the reward it stops on: when none
    of them is correct, sft.target_accuracy can never be met and the warm-up would run to sft.max_steps (stop 41
    saw the math verifier, picked for an ``answer`` column, give -1 to every response without a \\boxed{});
    refused, with what to change. A ceiling below the target is said."""
    texts, examples = [], []
    for it in held_out:
        pairs = example_pairs(it, problems.template, tokenizer, cfg, problems.tools)
        if not pairs:
            continue
        resp = next((r for p, r in pairs if list(p) == list(it.prompt_ids)), pairs[-1][1])
        texts.append(tokenizer.decode(resp, skip_special_tokens=True))
        examples.append(it.example)
    if not texts:
        return
    batch = problems.score_fn(texts, examples)
    ok = sum(bool(c) for c in batch.correct) / len(texts)
    target = cfg.sft.target_accuracy
    reward = "auto (the math verifier)" if cfg.reward.fn == "auto" else cfg.reward.fn
    if ok == 0:
        raise ValueError(
            f"{cfg.data.path}: none of the {len(texts)} held-out rows' own responses scores as correct under "
            f"reward.fn={reward} (e.g. response {texts[0][:60]!r}, answer {examples[0].answer!r}: reward "
            f"{batch.scores[0]:g}), so sft.target_accuracy={target} can never be met; pass --reward FILE.py:FN that "
            f"scores these responses, or --target-acc 0 to stop on held-out loss")
    if ok < target:
        log(f"warning: only {ok:.0%} of the held-out rows' own responses score as correct under reward.fn={reward}, "
            f"below sft.target_accuracy={target}: the warm-up will likely run to sft.max_steps={cfg.sft.max_steps}")


def char_tokenizer_for(cfg: Config) -> Any:
    """A character tokenizer over the default alphabet plus every character of the file's prompts, answers
    and responses (so nothing in the user's data encodes to <unk>)."""
    from dapo.data.files import load_examples, row_conversation
    from dapo.data.templates import prompt_text

    exs, _ = load_examples(cfg.data.path, cfg.data.prompt_key, cfg.data.answer_key, bad_rows=cfg.data.bad_rows,
                           require_answer=False)
    chars = set()
    for ex in exs:
        chars.update(prompt_text(ex.prompt), ex.answer or "", str(ex.fields.get(cfg.sft.response_key, "")))
        for m in row_conversation(ex.fields, cfg.data.prompt_key):
            chars.update(str(m.get("content", "")))
    return make_char_tokenizer(DEFAULT_ALPHABET + "".join(sorted(chars - set(DEFAULT_ALPHABET))))


def warm_up_file(cfg: Config, out: Path, force: bool = False, log: Callable[[str], None] = print,
                 num_threads: int | None = None) -> Path:
    """``dapo sft --data FILE``: imitate the file's responses, on ``model.path`` or a new tiny model with a
    character tokenizer built from the file; stop on held-out accuracy under ``reward.fn``."""
    from dapo.cpu import default_threads
    from dapo.model import load_model, load_tokenizer, resolve_device
    from dapo.problems import load_problems

    if is_built(out) and not force:
        return reuse_base(out, "data", cfg.data.path, log)
    check_out_dir(out)
    s, threads = cfg.sft, num_threads or default_threads()
    tokenizer = load_tokenizer(cfg.model, cfg.model.path) if cfg.model.path else char_tokenizer_for(cfg)
    problems = load_problems(cfg, tokenizer, log, require_answer=False, response_key=cfg.sft.response_key)
    try:
        pairs = file_pairs(problems, tokenizer, cfg)
        sample = pairs(min(512, len(problems.stream.examples)))  # lengths, and a bad response key fails early
        pairs = file_pairs(problems, tokenizer, cfg)
        problems.stream.cursor = 0
        longest_seq, longest_resp = max(len(p) + len(r) for p, r in sample), max(len(r) for _, r in sample)
        if cfg.model.path:
            model = load_model(cfg.model, cfg.model.path, resolve_device(cfg.model.device))
        else:
            torch.manual_seed(cfg.seed)
            model = tiny_model_for(tokenizer, s, cfg.seed, max_pos=2 * longest_seq)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"warm-up on {cfg.data.path}: {len(problems.stream.examples)} training rows, {len(problems.eval_items)} "
            f"held out; {'model ' + cfg.model.path if cfg.model.path else 'a new tiny model'} "
            f"({n_params / 1e6:.2f}M parameters), {threads} thread(s) -> {out}")
        probe, held_out = None, problems.eval_items
        answered = bool(held_out) and all(it.example.answer is not None for it in held_out)
        if answered and s.target_accuracy is not None:
            _check_reachable(held_out, problems, tokenizer, cfg, log)
        if answered:
            probe = make_probe(held_out, problems.score_fn, tokenizer, cfg.eval_seed,
                               max(cfg.rollout.max_new_tokens, longest_resp))
        val_pairs = [p for it in held_out for p in example_pairs(it, problems.template, tokenizer, cfg,
                                                                 problems.tools)]
        log("stopping rule: " + _stopping_rule(s, answered, bool(val_pairs), cfg))
        random.seed(cfg.seed)
        res = sft(model, pairs, tokenizer.pad_token_id, s, probe, threads, log, val_pairs=val_pairs)
    finally:
        problems.close()
    meta = {"data": cfg.data.path, "reward": cfg.reward.fn, **result_meta(res, s, cfg.seed, n_params, threads)}
    return write_base(out, model, tokenizer, problems.template, meta, force)
