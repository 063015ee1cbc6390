"""Command-line flags that are shortcuts for config keys: ``--k 8`` is ``eval.k=8``.

A command declares ``{flag: key}``; each flag's help is the key's own docstring and default, so no command
restates a default, and ``key=value`` overrides work beside the flags.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Callable

from dapo.config.load import default, field_doc


def whole(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum`` (``--limit -3`` is an error, not a slice)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {n}")
        return n

    return parse


def add_key_flags(parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """Add one flag per config key; unset flags stay None (the config's value stands)."""
    for flag, key in flags.items():
        doc = re.split(r"\.\s+(?=[A-Z])", field_doc(key))[0].rstrip(".")  # its first sentence ("e.g. 1e-5" is not one)
        help_text = f"{key}: {doc} (default {default(key)!r})".replace("%", "%%")
        if isinstance(default(key), bool):
            parser.add_argument(flag, dest=key, action="store_const", const="true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=key, default=None, metavar=key.split(".")[-1].upper(), help=help_text)


def key_overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """``key=value`` for every flag that was given."""
    out = []
    for key in flags.values():
        value: Any = getattr(args, key)
        if value is not None:
            out.append(f"{key}={value}")
    return out
