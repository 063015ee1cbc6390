"""Prompt streams for the trainer: examples in, tokenised ``PromptItem``s out, with a resumable cursor."""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from dapo.data.example import Example
from dapo.trainer.batch import PromptItem

Encode = Callable[[Example], list[int]]


class TaskPromptStream:
    """The built-in task's endless training stream (``dapo.data.tasks.TrainStream``), tokenised."""

    def __init__(self, stream: Any, encode: Encode):
        self.stream, self.encode = stream, encode

    def take(self, n: int) -> list[PromptItem]:
        start = self.stream.cursor
        return [PromptItem(start + k, ex, self.encode(ex)) for k, ex in enumerate(self.stream.take(n))]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "task", **self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict({k: v for k, v in state.items() if k != "kind"})


class ListPromptStream:
    """A finite dataset served in epochs, reshuffled each epoch from (seed, epoch); prompts are
    tokenised once up front (the dataset's prompt-length filter already ran)."""

    def __init__(self, examples: Sequence[Example], ids: Sequence[list[int]], seed: int, shuffle: bool = True):
        if not examples:
            raise ValueError("the training dataset is empty")
        self.examples, self.ids, self.seed, self.shuffle = list(examples), list(ids), seed, shuffle
        self.cursor = 0  # number of prompts served so far, over all epochs
        self._order_cache: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[PromptItem]:
        out = []
        N = len(self.examples)
        for _ in range(n):
            epoch, pos = divmod(self.cursor, N)
            if self._order_cache[0] != epoch:
                self._order_cache = (epoch, self._order(epoch))
            i = self._order_cache[1][pos]
            out.append(PromptItem(self.cursor, self.examples[i], self.ids[i]))
            self.cursor += 1
        return out

    @property
    def epoch(self) -> float:
        return self.cursor / len(self.examples)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "list", "cursor": self.cursor, "seed": self.seed, "size": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("size") != len(self.examples) or state.get("seed") != self.seed:
            raise ValueError(
                f"data cursor was saved for {state.get('size')} prompts with seed {state.get('seed')}, "
                f"this run has {len(self.examples)} with seed {self.seed}: resume with the same data and seed"
            )
        self.cursor = int(state["cursor"])


def encode_prompts(
    examples: Sequence[Example], template: str, tokenizer: Any, max_len: int, long_prompts: str = "drop"
) -> tuple[list[Example], list[list[int]], int, int]:
    """Render, tokenise and length-fit prompts: (kept examples, their ids, n dropped, n truncated).

    A chat template already writes the special tokens it wants, so those prompts are tokenised without
    adding more.
    """
    from dapo.data.templates import fit_prompts, render_prompt

    texts = [render_prompt(e, template, tokenizer) for e in examples]
    ids = [tokenizer(t, add_special_tokens=not template.endswith("chat"))["input_ids"] for t in texts]
    kept, fitted, n_drop, n_trunc = fit_prompts(ids, max_len, long_prompts)
    return [examples[i] for i in kept], fitted, n_drop, n_trunc
