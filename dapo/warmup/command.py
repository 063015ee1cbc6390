"""``dapo sft``: make a base model with the supervised warm-up.

    dapo sft                                      # the demo base of data.task, into the cache dapo train reads
    dapo sft --task multisum --out base/          # another built-in task, to a directory
    dapo sft --data mine.jsonl --reward my_reward.py:score sft.response_key=solution   # your own task

For a file: rows need a prompt (``data.prompt_key``) and a response to imitate (``sft.response_key``), or a
``messages`` conversation (every assistant turn is imitated, the loss on assistant tokens only). With the
ground truth (``data.answer_key``) the warm-up stops on held-out accuracy under ``reward.fn``; without one,
when the held-out loss stops improving (``sft.patience``), and the log says which. Prompts are rendered with
the template ``dapo train`` would choose (a chat template's own turns when the tokenizer has one), and it is
recorded in the model directory, so ``dapo train --model OUT`` keeps it. Without ``--model`` a tiny Qwen2
with a character tokenizer built from the file is trained from scratch, the demo's recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Sequence

SFT_FLAGS = {
    "--task": "data.task", "--data": "data.path", "--model": "model.path", "--reward": "reward.fn",
    "--template": "data.template", "--prompt-key": "data.prompt_key", "--answer-key": "data.answer_key",
    "--response-key": "sft.response_key", "--target-acc": "sft.target_accuracy", "--max-steps": "sft.max_steps",
    "--min-steps": "sft.min_steps", "--lr": "sft.lr", "--batch": "sft.batch", "--n-probe": "sft.n_probe",
    "--seed": "seed",
}


def main(argv: Sequence[str] | None = None) -> Path:
    """Prints and returns the model directory."""
    from dapo.config import load_config
    from dapo.config.flags import add_key_flags, key_overrides, whole
    from dapo.warmup.base import build_base_model, prepare_base_model, task_settings, warm_up_file

    ap = argparse.ArgumentParser(prog="dapo sft", description=__doc__.split("\n\n")[0],
                                 epilog="key=value overrides any config key; the sft.* keys are listed by "
                                        "dapo train --help-config. For a built-in task the defaults are the task's "
                                        "own warm-up settings (those dapo train uses).")
    ap.add_argument("--out", default="", help="output directory (default: a task's base goes to the cache that "
                    "dapo train reads; a file's to LOG.OUT_DIR/sft-<file>-<time>)")
    ap.add_argument("--threads", type=whole(0), default=0, help="torch threads (default: one per idle core, at most 4)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    add_key_flags(ap, SFT_FLAGS)
    ap.add_argument("overrides", nargs="*", help="key=value")
    a = ap.parse_intermixed_args(list(argv) if argv is not None else None)
    over = [*key_overrides(a, SFT_FLAGS), *a.overrides]
    cfg = load_config(overrides=over)
    if cfg.sft.target_accuracy is not None and cfg.sft.target_accuracy <= 0:  # <= 0: run sft.max_steps
        cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, target_accuracy=None))
    threads = a.threads or None
    if cfg.data.path:
        stem = Path(cfg.data.path.rstrip("/")).name.split(".")[0]
        out = Path(a.out) if a.out else Path(cfg.log.out_dir) / f"sft-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = warm_up_file(cfg, out, force=a.force, num_threads=threads)
    else:
        if cfg.model.path:
            raise ValueError("--model warms up a given model on a file: pass --data FILE (built-in tasks start "
                             "from the tiny model)")
        # the task's own warm-up settings, with every sft.* key the user gave (also one equal to a default)
        given = {o.split("=", 1)[0].strip().removeprefix("sft.") for o in over if o.strip().startswith("sft.")}
        settings = dataclasses.replace(task_settings(cfg.data.task), **{k: getattr(cfg.sft, k) for k in given})
        if a.out:
            path = build_base_model(a.out, cfg.data.task, settings, cfg.seed, force=a.force, num_threads=threads)
        else:
            path = prepare_base_model(cfg.data.task, force=a.force, settings=settings, num_threads=threads,
                                      seed=cfg.seed)
    print(path)
    return path
