"""One prompt with its ground truth: what every data source yields and every reward reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    prompt: str | list[dict[str, Any]]
    """Plain text, or chat messages ``[{"role": "user", "content": ...}]`` as in DAPO-Math-17k."""
    answer: str | None
    """Ground truth the verifier compares against; None for a supervised row that has none."""
    data_source: str = ""
    """Where the row came from (metrics and evaluation are also reported per source)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """The row's other fields, passed to user reward functions."""
