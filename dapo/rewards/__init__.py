"""Verifiers ``(response text, ground truth) -> score`` and running them over a batch with time limits.

    from dapo.rewards import score_math, RewardRunner
    score_math("...\\nAnswer: 34", "34")          # MathScore(score=1.0, correct=True, pred='34')
    with RewardRunner("math", workers=8) as runner:
        batch = runner.score(responses, answers, extras)   # RewardBatch(scores, correct, stats, messages, errors)
"""
from dapo.rewards.limits import RewardTimeout, call_with_time_limit
from dapo.rewards.math import MathScore, extract_answer, math_verify_available, normalize_answer, score_math
from dapo.rewards.runner import (
    BUILTIN_REWARDS,
    RewardBatch,
    RewardFnError,
    RewardRunner,
    load_reward_fn,
    normalize_reward,
)

__all__ = [
    "score_math", "MathScore", "extract_answer", "normalize_answer", "math_verify_available",
    "RewardRunner", "RewardBatch", "RewardFnError", "load_reward_fn", "normalize_reward", "BUILTIN_REWARDS",
    "RewardTimeout", "call_with_time_limit",
]
