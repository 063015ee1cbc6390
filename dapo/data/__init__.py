"""Prompt sources: files (JSONL, Parquet, CSV, Hugging Face datasets), templates, built-in tasks.

    from dapo.data import load_examples, render_prompt
    examples, stats = load_examples("dapo-math-17k.parquet", dedup=True)
    text = render_prompt(examples[0], "dapo_math")

The built-in synthetic tasks live in ``dapo.data.tasks``.
"""
from dapo.data.example import Example
from dapo.data.files import SUPPORTED, DataError, LoadStats, get_field, load_examples
from dapo.data.templates import TEMPLATES, add_instruction, fit_prompts, prompt_text, render_prompt

__all__ = [
    "Example", "load_examples", "LoadStats", "DataError", "SUPPORTED", "get_field",
    "render_prompt", "prompt_text", "add_instruction", "fit_prompts", "TEMPLATES",
]
