"""The rollout-engine interface: token ids in, sampled completions with log-probs out.

Engines know nothing about text or rewards. Each prompt's samples are seeded from (run seed, step,
prompt index), so a rollout is reproducible whatever the batch it is part of.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from dapo.ragged import as_numpy, from_pickled


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Samples per prompt (G)."""
    max_new_tokens: int = 24
    """Stop after this many generated tokens (finish_reason 'length')."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = off."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after emitting any of these (finish_reason 'stop'); the token is kept."""


@dataclass(eq=False)
class Completion:
    prompt_index: int
    """Index of the prompt in the ``generate`` call."""
    token_ids: torch.Tensor
    """(T,) int64: generated tokens, including the stop token when finish_reason == 'stop'. Lists are
    converted on construction. Its own storage, not a view into a batch's buffer: a completion is pickled
    (Ray) and saved (carried groups in checkpoints) on its own, and a view would carry the whole buffer."""
    logprobs: torch.Tensor
    """(T,) float32: log pi(token | prefix) under the sampling distribution (after temperature, before
    top-p/top-k). Lists are converted on construction."""
    finish_reason: str
    """'stop' (a stop token was generated) or 'length' (max_new_tokens reached: truncated); a multi-turn
    trajectory (``dapo.rollout.multiturn``): 'stop' (the environment said done), 'length' (its token budget ran
    out) or 'turns' (``rollout.max_turns`` turns and the environment still not done)."""
    weight_version: int = 0
    """Version of the weights that produced it (proves the rollout used the latest policy)."""
    mask: torch.Tensor | None = None
    """(T,) bool: True on tokens the model sampled, False on tokens an environment appended (observations, whose
    ``logprobs`` are 0); None = every token is the model's. Lists are converted on construction."""

    def __post_init__(self):
        self.token_ids = torch.as_tensor(self.token_ids, dtype=torch.long)
        self.logprobs = torch.as_tensor(self.logprobs, dtype=torch.float32)
        if self.token_ids.dim() != 1 or self.token_ids.shape != self.logprobs.shape:
            raise ValueError(f"Completion: token_ids {tuple(self.token_ids.shape)} and logprobs "
                             f"{tuple(self.logprobs.shape)} must be 1-D and of equal length")
        if self.mask is not None:
            self.mask = torch.as_tensor(self.mask, dtype=torch.bool)
            if self.mask.shape != self.token_ids.shape:
                raise ValueError(f"Completion: mask {tuple(self.mask.shape)} and token_ids "
                                 f"{tuple(self.token_ids.shape)} must be of equal length")

    @property
    def n_model_tokens(self) -> int:
        """Tokens the model sampled (all of them without a mask)."""
        return len(self.token_ids) if self.mask is None else int(self.mask.sum())

    def __eq__(self, other: object) -> bool:
        """Equal fields (tensors by value: ``torch.equal``)."""
        if not isinstance(other, Completion):
            return NotImplemented
        return (self.prompt_index, self.finish_reason, self.weight_version) == (
            other.prompt_index, other.finish_reason, other.weight_version) and torch.equal(
            self.token_ids, other.token_ids) and torch.equal(self.logprobs, other.logprobs) and (
            (self.mask is None) == (other.mask is None)) and (self.mask is None or torch.equal(self.mask, other.mask))

    __hash__ = None  # mutable, compared by value

    def __reduce__(self):
        """Pickled (Ray: rollout workers -> driver) with numpy buffers for the tensors: about 4x faster than
        torch's per-tensor pickling at a step's 16k completions (``dapo.ragged.as_numpy``)."""
        return _completion_from_pickle, (self.prompt_index, as_numpy(self.token_ids), as_numpy(self.logprobs),
                                         self.finish_reason, self.weight_version,
                                         None if self.mask is None else as_numpy(self.mask))


def _completion_from_pickle(prompt_index, token_ids, logprobs, finish_reason, weight_version, mask=None) -> Completion:
    return Completion(prompt_index, from_pickled(token_ids), from_pickled(logprobs), finish_reason, weight_version,
                      None if mask is None else from_pickled(mask))


class RolloutEngine(Protocol):
    weight_version: int

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Completion]:
        """n completions per prompt, grouped: all n of prompt 0, then prompt 1, ... ``seeds[i]`` seeds prompt i."""
        ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the policy's weights (after an optimiser step) and record their version."""
        ...


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, prompt id, ...), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF
