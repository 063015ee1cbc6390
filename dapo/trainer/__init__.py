"""The training loop and what it needs around one step.

Follow one step from ``loop.train_step``: ``sampler`` (dynamic sampling: ``DynamicSampler.collect``, and
``Rollouts`` for one-step-off async) -> ``update.flatten_groups`` (advantages, overlong mask) ->
``update.Learner.old_logp`` -> ``loss.rollout_correction`` -> ``update.Learner.update`` (mini-batches;
``loss.micro_pass`` is one micro-batch's loss on ``policy.response_logprobs``) -> ``Learner.push_weights``.

Around the steps: ``build`` (a run's parts from its config), ``run`` (the run directory: resume, branching,
log truncation, checkpoint state, summary), ``watch`` (diagnostics: samples, reward errors, idle and NaN
streaks), ``checkpoint`` (atomic, checksummed step_N/), ``logger`` (metrics.jsonl, TensorBoard, W&B).
"""
