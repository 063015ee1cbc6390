"""``TrainBatch``: a step's responses, flattened over groups, as the update reads them.

Which tokens are in the loss is the product of three masks, each owned by whoever knows it:

    row ``loss_mask``   0 for responses kept out of the loss (the overlong filter, DAPO §3.4)
    ``token_mask``      0 on tokens the model did not sample (a tool's or an environment's observation)
    ``weights``         the sampler/trainer correction (``algo.rollout_is``): per-token importance weights,
                        0 for responses it drops; the loss multiplies by them

The loss's denominators (token-mean, seq-mean) count the tokens all three keep, so nothing outside this
module has to know which of them dropped a token.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from dapo.ragged import Ragged


@dataclass(frozen=True)
class TrainBatch:
    """Token ids and log-probs are ``Ragged``: one buffer each, with the same row offsets (row i is response i)."""

    prompts: list[list[int]]
    """Each response's prompt (the group's own list, not a copy: G rows share one)."""
    responses: Ragged
    """Token ids, int64."""
    behaviour_logp: Ragged
    """log-probs the sampler reported for each token (the behaviour policy), float32; ``responses``' offsets."""
    fresh: list[bool]
    """Sampled by the current policy (carried-over groups were not)."""
    advantages: torch.Tensor  # (N,)
    loss_mask: torch.Tensor  # (N,) 0 for responses kept out of the loss (overlong filter)
    token_mask: Ragged | None = None
    """1 on tokens the model sampled, 0 on observation tokens (multi-turn); None = every token is the model's."""
    weights: Ragged | None = None
    """Per-token loss weights of the mismatch correction (``rollout_correction``), 0 = out of the loss; None = all 1."""

    @classmethod
    def of(cls, prompts: list[list[int]], responses: list, behaviour_logp: list, fresh: list[bool],
           advantages: torch.Tensor, loss_mask: torch.Tensor, token_mask: list | None = None) -> "TrainBatch":
        """From per-response sequences (lists or 1-D tensors), as tests and benchmarks build one by hand."""
        r = Ragged.of(responses, torch.long)
        tm = None if token_mask is None else r.like(Ragged.of(token_mask, torch.float32).values)
        return cls(list(prompts), r, r.like(Ragged.of(behaviour_logp, torch.float32).values), list(fresh),
                   advantages, loss_mask, tm)

    def weighted(self, weights: Ragged | None) -> "TrainBatch":
        """This batch under the correction's per-token ``weights`` (None: uncorrected)."""
        return dataclasses.replace(self, weights=weights)

    @functools.cached_property
    def seq_lengths(self) -> list[int]:
        """Prompt + response tokens of each row: what micro-batches are planned by (computed once a batch)."""
        return [len(p) + n for p, n in zip(self.prompts, self.responses.lengths.tolist())]

    @functools.cached_property
    def token_keep(self) -> Ragged | None:
        """Per token, 1 where ``token_mask`` and ``weights`` keep it (row ``loss_mask`` aside); None = every token.
        Computed once a batch (every micro-batch reads it); ``weighted`` makes a new batch, with its own."""
        if self.token_mask is None and self.weights is None:
            return None
        keep = torch.ones_like(self.behaviour_logp.values)
        if self.token_mask is not None:
            keep = keep * self.token_mask.values
        if self.weights is not None:
            keep = keep * (self.weights.values > 0).float()
        return self.responses.like(keep)

    def loss_tokens(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) float64: tokens in the loss of rows ``idx`` (default: all), what the denominators count."""
        lengths, keep = self.responses.lengths, self.token_keep
        if keep is not None:
            rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            lengths = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, rows, keep.values.double())
        n = self.loss_mask.double() * lengths.double()
        return n if idx is None else n[idx]

    def trainable(self) -> torch.Tensor:
        """(N,) bool: rows with at least one token in the loss."""
        return self.loss_tokens() > 0

    def in_loss(self, idx: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``idx`` as (b, T) blocks: the 0/1 mask of their tokens in the loss, and the correction's
        weights (None when uncorrected)."""
        mask = (torch.arange(T)[None, :] < self.responses.lengths[idx][:, None]).float() * self.loss_mask[idx][:, None]
        keep = self.token_keep
        if keep is not None:
            mask = mask * keep.padded(idx, T)
        return mask, None if self.weights is None else self.weights.padded(idx, T)
