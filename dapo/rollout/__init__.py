"""Rollout engines: prompt token ids in, sampled completions with per-token log-probs out."""
from dapo.rollout.base import Completion, RolloutEngine, SamplingParams, derive_seed
from dapo.rollout.hf import HFEngine

__all__ = ["Completion", "HFEngine", "RolloutEngine", "SamplingParams", "derive_seed"]
