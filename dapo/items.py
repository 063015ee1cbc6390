"""The data types that travel between layers: a tokenised prompt, a scored group of responses, the
scoring function's shape, and a stream of prompts. Trainer, evaluator and warm-up all import them from
here, and this module imports nothing of theirs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from dapo.data.example import Example
from dapo.rewards.runner import RewardBatch
from dapo.rollout.base import Completion


@dataclass
class PromptItem:
    uid: int
    """Position in the training stream (seeds the prompt's samples, and is the data cursor); held-out
    items count down from -1."""
    example: Example
    prompt_ids: list[int]


@dataclass
class Group:
    """One prompt and its G scored responses."""

    item: PromptItem
    completions: list[Completion]
    scores: list[float]
    """Verifier scores (+1 / -1 for exact verifiers)."""
    correct: list[bool]
    rewards: list[float]
    """Scores plus the soft overlong penalty when it is on: what advantages are computed from."""
    step: int
    """RL step whose policy generated it (older than the current step when carried over)."""
    errors: list[str] | None = None
    """Why each response's reward failed ("" when it did not), from the reward function."""


ScoreFn = Callable[[list[str], list[Example]], RewardBatch]
"""(response texts, their examples) -> RewardBatch: one verifier call per response, failures scored -1."""

ScoreIds = Callable[[Sequence[torch.Tensor], list[Example]], RewardBatch]
"""(responses' token ids, 1-D integer tensors; their examples) -> RewardBatch: a ``ScoreFn`` that decodes the
responses itself, where it is cheapest (``dapo.problems.ResponseDecoder``: in the reward workers, or in one batch)."""


class PromptStream(Protocol):
    def take(self, n: int) -> list[PromptItem]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
