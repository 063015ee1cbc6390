"""The DAPO maths: pure functions of tensors, no configs, no I/O.

Paper: DAPO, Decoupled Clip and Dynamic sAmpling Policy Optimization (arXiv 2503.14476).
"""
from dapo.algo.advantages import group_advantages, keep_groups
from dapo.algo.losses import AGG_MODES, aggregate_loss, kl_penalty, policy_loss
from dapo.algo.shaping import overlong_penalty
from dapo.algo.tokens import token_entropy, token_logprobs

__all__ = [
    "AGG_MODES",
    "aggregate_loss",
    "group_advantages",
    "keep_groups",
    "kl_penalty",
    "overlong_penalty",
    "policy_loss",
    "token_entropy",
    "token_logprobs",
]
