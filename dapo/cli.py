"""The ``dapo`` command: train, sft, eval, ablate, report, export.

    dapo train                                   # the built-in demo: tiny model, addition, DAPO
    dapo train --preset grpo optim.steps=20      # naive GRPO on the same task
    dapo train --model DIR --data FILE reward.fn=my_module:score
    dapo train --tools my_tools.py rollout.max_turns=4   # the model may call my_tools.py's functions
    dapo export RUN/step_N --merge OUT           # a LoRA checkpoint as a plain Hugging Face model

User errors (bad config, missing files) print one line; DAPO_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import Sequence

from dapo.config import PRESET_DOCS, ConfigError, describe, load_config, resume_named
from dapo.fsutil import strict_json

# subcommands that live in their own modules, each with a ``main(argv) -> int``
_SUBCOMMANDS = {
    "sft": ("dapo.warmup.command", "main", "supervised warm-up: a base model to start RL from (a task's, or your file's)"),
    "eval": ("dapo.eval", "main", "avg@k, pass@k, maj@k over a dataset"),
    "report": ("dapo.report", "main", "plots and an HTML report from runs' metrics.jsonl"),
    "ablate": ("dapo.ablate", "main", "the paper's Table 1 rows, several seeds, equal sample budget"),
    "export": ("dapo.cli", "export_main", "a checkpoint as a plain Hugging Face model (LoRA: merged into its base)"),
}


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dapo train",
        description="Train with DAPO (or any preset). With no arguments: the built-in demo.",
        epilog="presets:\n" + "\n".join(f"  {k:18s} {v}" for k, v in PRESET_DOCS.items())
        + "\n\nkey=value overrides use dotted keys, e.g. algo.eps_high=0.28 optim.lr=1e-4; "
        "dapo train --help-config lists every key.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with config sections (model, data, rollout, algo, optim, log, ckpt, dist)")
    p.add_argument("--preset", help="starting preset (default dapo)")
    p.add_argument("--model", help="shortcut for model.path=...")
    p.add_argument("--data", help="shortcut for data.path=...")
    p.add_argument("--reward", help="shortcut for reward.fn=... (math, module:function or file.py:function)")
    p.add_argument("--resume", help="shortcut for ckpt.resume=RUN_DIR")
    p.add_argument("--env", help="shortcut for env.path=... (file.py:Class): an environment answers the model's turns")
    p.add_argument("--tools", help="shortcut for env.tools=... (file.py, or calculator: built in): its public functions are "
                   "tools the model calls")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("overrides", nargs="*", help="key=value")
    return p


def train_main(argv: Sequence[str]) -> int:
    args = _train_parser().parse_intermixed_args(list(argv))  # key=value may come before or after flags
    if args.help_config:
        print(describe())
        return 0
    over = list(args.overrides)
    for flag, key in (("model", "model.path"), ("data", "data.path"), ("reward", "reward.fn"), ("resume", "ckpt.resume"),
                      ("env", "env.path"), ("tools", "env.tools")):
        if getattr(args, flag):
            over.append(f"{key}={getattr(args, flag)}")
    resume = resume_named(args.config, over)
    cfg = _resume_config(resume, args, over) if resume else load_config(args.preset, args.config, over)
    from dapo.trainer.loop import train

    result = train(cfg)
    print(strict_json({"run_dir": str(result.run_dir), "steps": result.steps,
                       "before": result.before.get("accuracy"), "after": result.after.get("accuracy"),
                       "wall_s": round(result.wall_s, 1), "report": str(result.report) if result.report else None}))
    return 0


def _resume_config(resume: str, args: argparse.Namespace, over: list[str]):
    """A resume starts from the run's saved config.yaml, then applies --preset, --config and the overrides on
    top (each change is named when the run starts); only the merged config is validated, so an override that
    needs the run's own keys (reward.fn on a data-file run) is judged with them. A run killed before it saved
    its config starts from the defaults, as a new run would."""
    from dapo.config import run_config
    from dapo.trainer.run import resume_source

    run_dir, _ = resume_source(resume)
    cfg = run_config(run_dir, over, preset=args.preset, file=args.config)
    return cfg if cfg is not None else load_config(args.preset, args.config, over)


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dapo export",
        description="Write a checkpoint as a standalone Hugging Face model directory that transformers and dapo eval "
                    "load without peft. A LoRA checkpoint (adapter_config.json) is merged into its base "
                    "(W + alpha/r * B A); a full-model checkpoint is copied without its trainer state.")
    p.add_argument("checkpoint", help="a run's step_N/ (or any LoRA adapter directory)")
    p.add_argument("--merge", required=True, metavar="OUT", help="output directory (must not exist, or be empty)")
    p.add_argument("--base", help="base model of a LoRA checkpoint (default: its adapter_config.json's "
                   "base_model_name_or_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the written weights (auto: as they are: a LoRA merge in its base model's dtype, a full "
                        "checkpoint in float32, the master weights training keeps)")
    return p


def export_main(argv: Sequence[str]) -> int:
    import shutil
    from pathlib import Path

    import torch

    from dapo import lora
    from dapo.fsutil import install_dir, occupied, staging_dir
    from dapo.problems import TEMPLATE_FILE

    args = _export_parser().parse_args(list(argv))
    ckpt, out = Path(args.checkpoint), Path(args.merge)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint directory")
    if occupied(out):
        raise ValueError(f"--merge {out}: already exists and is not empty; choose a new directory")
    tmp = staging_dir(out.resolve())
    try:
        if lora.is_lora_checkpoint(ckpt):
            from dapo.model import adapter_base, same_base

            base = args.base or adapter_base(str(ckpt))
            if args.base and not same_base(ckpt, args.base):  # the user's choice; said, not refused
                print(f"dapo export: warning: --base {args.base} is not the base {ckpt} was trained on (its weights "
                      f"differ from the fingerprint in {ckpt / lora.BASE_FINGERPRINT}): the merge is the adapter on "
                      f"other weights", file=sys.stderr)
            dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
            lora.merge_to_hf(base, ckpt, tmp, dtype=dtype)
            if (ckpt / TEMPLATE_FILE).is_file():  # dapo eval keeps the prompt format it was trained with
                shutil.copy2(ckpt / TEMPLATE_FILE, tmp / TEMPLATE_FILE)
            what = f"{ckpt} merged into its base {base}"
        elif (ckpt / "config.json").is_file():
            if args.base:
                raise ValueError(f"{ckpt} is a full model, not a LoRA adapter: --base does not apply")
            for f in ckpt.iterdir():  # the model, tokenizer and template; not the optimiser state or manifest
                skip = f.name in ("trainer_state.pt", "optimizer.pt", "manifest.json") or f.name.startswith("eval_")
                if f.is_file() and not skip:
                    shutil.copy2(f, tmp / f.name)
            what = f"{ckpt} (a full model) copied"
            if args.dtype != "auto":  # training keeps float32 master weights; a published model is often bf16
                from transformers import AutoModelForCausalLM  # as a LoRA merge is written: weights and config

                AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, args.dtype)).save_pretrained(
                    str(tmp), safe_serialization=True)
                what += f" in {args.dtype}"
        else:
            from dapo.model import _not_a_model_dir

            why = _not_a_model_dir(str(ckpt))  # a run directory: it names the latest checkpoint
            raise FileNotFoundError(f"{ckpt}: " + (why if why.startswith("a run directory") else
                                                   f"neither a LoRA adapter ({lora.ADAPTER_CONFIG}) nor a Hugging "
                                                   f"Face model (config.json)"))
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"dapo export: {what} -> {out} (load it with dapo eval --model {out}, or transformers' from_pretrained)")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _quiet_libraries() -> None:
    """No progress bars from transformers' own loading and saving (a checkpoint every few steps drew two);
    what dapo does is on its own progress line."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ["train", *_SUBCOMMANDS]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dapo {" + ",".join(names) + "} ...\n")
        print("  train    train with DAPO or any preset (no arguments: the built-in demo)")
        for name, (_, _, doc) in _SUBCOMMANDS.items():
            print(f"  {name:8s} {doc}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    _quiet_libraries()
    # SIGTERM outside the training loop (loading, the first evaluation) stops like Ctrl-C; inside it the
    # loop's own handler finishes the step and checkpoints first
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        if cmd in names:
            if cmd == "train":
                out = train_main(rest)
            else:
                mod, fn, _ = _SUBCOMMANDS[cmd]
                out = getattr(importlib.import_module(mod), fn)(rest)
            sys.stdout.flush()  # here, where a closed pipe is caught, not in the interpreter's exit
            return out if isinstance(out, int) else 0
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("DAPO_DEBUG"):
            raise
        print(f"dapo {cmd}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dapo train --help-config | head`: the reader left; nothing more to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush of stdout must not fail again
        return 141  # as a shell reports a command ended by SIGPIPE
    except KeyboardInterrupt as e:  # a run says what it keeps; a base, an evaluation is never left half-written
        hint = getattr(e, "dapo_hint", None)
        print(f"dapo {cmd}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except RuntimeError as e:
        from dapo.learner import TrainingError  # a run that cannot go on: non-finite, idle

        if not isinstance(e, TrainingError):
            raise
        print(f"dapo {cmd}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    print(f"dapo: unknown command {cmd!r} (valid: {', '.join(names)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
