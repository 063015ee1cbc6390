"""The driver: the training loop and what it needs around one step.

Follow one step from ``loop.train_step``: ``sampler`` (dynamic sampling: ``DynamicSampler.collect``, and
``Rollouts`` for one-step-off async) -> ``batch.flatten_groups`` (advantages, overlong mask) ->
``Learner.old_logp`` -> ``batch.rollout_correction`` (the mismatch, and per-token weights) ->
``Learner.update`` (``dapo.learner``: what every rank runs) -> ``Learner.push_weights``.

Around the steps: ``build`` (a run's parts from its config), ``run`` (the run directory: resume, branching,
log truncation, checkpoint state, summary), ``watch`` (diagnostics: samples, reward errors, idle and NaN
streaks), ``checkpoint`` (atomic, checksummed step_N/), ``logger`` (metrics.jsonl, TensorBoard, W&B).
"""
