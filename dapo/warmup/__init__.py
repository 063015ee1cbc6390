"""The supervised warm-up: a base model that is right part of the time, which RL can then improve.

    dapo sft                                   # the demo's base for data.task (cached; dapo train does this)
    dapo sft --data my.jsonl --out base/ sft.response_key=solution --reward my_reward.py:score

``sft`` is the loop, ``base`` makes and caches base models (the built-in tasks' tiny ones, or a user's
own from a file), ``tiny`` the tiny Qwen2 they start from, ``command`` the ``dapo sft`` command.
"""
from dapo.warmup.base import (
    base_model_dir, build_base_model, default_cache_dir, prepare_base_model, task_settings, warm_up_file,
)
from dapo.warmup.sft import IGNORE_INDEX, SFTResult, make_probe, sft, sft_batch, sft_loss
from dapo.warmup.tiny import build_tiny_model

__all__ = [
    "IGNORE_INDEX", "SFTResult", "base_model_dir", "build_base_model", "build_tiny_model", "default_cache_dir",
    "make_probe", "prepare_base_model", "sft", "sft_batch", "sft_loss", "task_settings", "warm_up_file",
]
