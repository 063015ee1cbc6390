"""What every trainer rank runs: the policy update, from a ``TrainBatch`` to an optimiser step.

    batch.py    ``TrainBatch``: the step's responses; which tokens are in the loss (row mask, token mask,
                the mismatch correction's weights)
    plan.py     ``MicroBatchPlan``: a rank's micro-batches and their layout (padded or packed; the
                shared-prompt prefill, decided alike on every FSDP rank)
    policy.py   log-probs (and entropy) of response tokens under the training model
    loss.py     ``micro_loss``: one micro-batch's clipped, weighted, token-mean loss
    learner.py  ``LocalLearner``: old log-probs and the mini-batch steps of one rank (one process is rank
                0 of 1)
    parallel.py ``DataParallel``: the rank's place and its collectives
    state.py    the optimiser state's file

``Learner`` is what the driver's loop calls: a ``LocalLearner`` in its own process, or
``dapo.distributed.RankGroup`` fanning the same calls out to Ray ranks. Nothing here imports the driver
(``dapo.trainer``) or Ray.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from dapo.learner.batch import TrainBatch
from dapo.learner.learner import LocalLearner, TrainingError, needs_recompute
from dapo.learner.parallel import DataParallel, whole_tensor
from dapo.ragged import Ragged
from dapo.rollout.base import Fingerprints, RolloutEngine


class Learner(Protocol):
    """The policy being trained, as the loop, the watch and the checkpoint code see it."""

    samples_the_policy: bool
    """The engine samples with the trained model itself in float32: old log-probs need no recompute."""
    bad_streak: int
    """Non-finite updates skipped in a row (checkpoints are not written during a streak)."""

    def old_logp(self, batch: TrainBatch) -> Ragged:
        """log pi_old of every response token (the sampler's own where a recompute cannot differ)."""
        ...

    def update(self, batch: TrainBatch, old_logp: Ragged, step: int) -> dict[str, float]:
        """The step's mini-batch optimiser steps; returns its ``actor/*`` metrics."""
        ...

    def push_weights(self, engine: RolloutEngine, version: int) -> Fingerprints | None:
        """The new weights to the rollout engine, stamped ``version``; returns the fingerprints of what was pushed
        (``dapo.rollout.base.weight_fingerprints``, in the engine's dtype), None when no weight travelled or
        ``rollout.verify_weights`` is off (nothing will be checked)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_pretrained(self, path: str | Path) -> None:
        """The model's files (under LoRA: the adapter), and on ranks the optimiser state's file."""
        ...

    def nonfinite_params(self) -> list[str]:
        """Names of parameter tensors holding NaN or inf (empty when all is well)."""
        ...

    def close(self) -> None: ...


__all__ = ["DataParallel", "Learner", "LocalLearner", "TrainBatch", "TrainingError", "needs_recompute", "whole_tensor"]
