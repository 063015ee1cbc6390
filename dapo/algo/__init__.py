"""The DAPO maths: pure functions of tensors, no configs, no I/O.

Paper: DAPO, Decoupled Clip and Dynamic sAmpling Policy Optimization (arXiv 2503.14476).
"""
from dapo.algo.advantages import ADV_ESTIMATORS, group_advantages, keep_groups
from dapo.algo.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    PolicyLoss,
    aggregate_loss,
    cispo_loss,
    get_policy_loss,
    gspo_loss,
    kl_penalty,
    policy_loss,
    register_policy_loss,
)
from dapo.algo.mismatch import mismatch_stats, rollout_is_weights, rollout_sequence_mask
from dapo.algo.shaping import overlong_penalty
from dapo.algo.tokens import token_entropy, token_logprobs

__all__ = [
    "ADV_ESTIMATORS",
    "AGG_MODES",
    "POLICY_LOSSES",
    "PolicyLoss",
    "aggregate_loss",
    "cispo_loss",
    "get_policy_loss",
    "group_advantages",
    "gspo_loss",
    "keep_groups",
    "kl_penalty",
    "mismatch_stats",
    "overlong_penalty",
    "policy_loss",
    "register_policy_loss",
    "rollout_is_weights",
    "rollout_sequence_mask",
    "token_entropy",
    "token_logprobs",
]
