"""What a run says about itself around the steps, so that a run that cannot learn says why.

At the start: the run directory, the prompt template and the first training prompt exactly as the model
sees it (decoded from its token ids), and a warning when the CPU is busy. After every step: a few samples
to ``samples.jsonl`` every ``log.samples_every`` steps (whether or not the update ran), each distinct error
message of the reward function once, and the streaks that stop a run: steps that kept no group with a
gradient (``algo.max_idle_steps``: every reward equal is a template, reward or length problem, not a
learning one) and rollouts with NaN log-probs (``optim.max_bad_steps``).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from dapo.items import Group
from dapo.learner import TrainingError
from dapo.trainer.logger import RunLogger
from dapo.trainer.run import append_samples

if TYPE_CHECKING:
    from dapo.trainer.build import Run

_MAX_ERROR_MESSAGES = 10
_SAMPLE_GROUPS, _SAMPLES_PER_GROUP = 4, 2


def _short(text: str, n: int = 160) -> str:
    text = text if len(text) <= n else text[: n // 2] + " ... " + text[-n // 2 :]
    return repr(text)


class StepWatch:
    def __init__(self, run: Run, logger: RunLogger):
        self.run, self.logger = run, logger
        self.idle_streak = 0
        self.solved = False  # max_idle_steps steps in a row with every sample correct: the run ends, successfully
        self.nan_streak = 0
        self.errors_seen: set[str] = set()

    # -------------------------------------------------------------------------------------------- start

    def starting(self, start: int) -> None:
        run, say = self.run, self.logger.message
        resumed = run.resume_from
        say(f"run directory: {run.run_dir}" + (
            f" (resuming from {resumed.name})" if resumed is not None and resumed.parent == run.run_dir
            else f" (branching off {resumed})" if resumed is not None
            else " (no complete checkpoint in it yet: starting again from step 0)" if run.cfg.ckpt.resume else ""))
        if run.device.type == "cpu":
            from dapo.cpu import contention_warning, idle_fraction

            warn = contention_warning(torch.get_num_threads(), os.cpu_count() or 1, idle_fraction, dict(os.environ))
            if warn:
                say(f"warning: {warn}")
        stream, template = run.problems.stream, run.problems.template
        state = stream.state_dict()
        first = stream.take(1)[0]  # a peek: the cursor is put back
        stream.load_state_dict(state)
        say(f"prompt template: {'the task ' + repr(run.cfg.data.task) + ' own format' if template == 'task' else template}"
            f"; the first training prompt, decoded from its token ids: {_short(run.decode(first.prompt_ids, special=True), 400)}"
            + (f" (the row's; {run.cfg.env.path}'s reset(row) may give another, which samples.jsonl shows)"
               if run.cfg.env.path else ""))

    # -------------------------------------------------------------------------------------------- each step

    def after_step(self, step: int, groups: list[Group], m: dict[str, float]) -> None:
        sampled = self.run.rollouts.sampled
        self._reward_errors(sampled)
        idle = not any(max(g.rewards) > min(g.rewards) for g in groups)
        every = self.run.cfg.log.samples_every
        if (every and step % every == 0) or idle:  # a step without a gradient always leaves its evidence
            append_samples(self.run.run_dir, self.sample_rows(step, sampled, groups))
        if m.get("rollout/nan_logprob_frac"):
            self._nan_rollout(step, m)
            return
        self.nan_streak = 0
        if not idle:
            self.idle_streak = 0
            return
        self.idle_streak += 1
        self._idle(step, sampled, m)

    def sample_rows(self, step: int, sampled: list[Group], trained: list[Group]) -> list[dict[str, Any]]:
        rows = []
        for g in sampled[:_SAMPLE_GROUPS]:
            for k, c in enumerate(g.completions[:_SAMPLES_PER_GROUP]):
                row = {"step": step, "prompt": self.run.decode(g.item.prompt_ids), "response": self.run.decode(c.token_ids.tolist()),
                       "answer": g.item.example.answer, "score": g.scores[k], "reward": g.rewards[k],
                       "finish": c.finish_reason, "trained": any(g is t for t in trained)}
                if g.errors and g.errors[k]:
                    row["reward_error"] = g.errors[k]
                rows.append(row)
        return rows

    def _reward_errors(self, sampled: list[Group]) -> None:
        for g in sampled:
            for msg in g.errors or []:
                if msg and msg not in self.errors_seen and len(self.errors_seen) < _MAX_ERROR_MESSAGES:
                    self.errors_seen.add(msg)
                    self.logger.message(f"reward function ({self.run.cfg.reward.fn}): {msg} (scored as wrong)" + (
                        "; further distinct errors are counted in reward/errors and shown in samples.jsonl"
                        if len(self.errors_seen) == _MAX_ERROR_MESSAGES else ""))

    def _nan_rollout(self, step: int, m: dict[str, float]) -> None:
        self.nan_streak += 1
        m["actor/skipped_updates"] = 1.0
        self.logger.message(f"step {step}: NaN log-probs in the rollout; skipping the update")
        limit = self.run.cfg.optim.max_bad_steps
        if self.nan_streak >= limit:
            raise TrainingError(
                f"step {step}: {m['rollout/nan_logprob_frac']:.0%} of the rollout's log-probs are NaN, the "
                f"{self.nan_streak}th rollout in a row: the weights are broken; stopping. The last good checkpoint "
                f"is kept; lower optim.lr or check the data/reward (optim.max_bad_steps={limit}).")

    def _idle(self, step: int, sampled: list[Group], m: dict[str, float]) -> None:
        run, cfg = self.run, self.run.cfg
        rewards = sorted({r for g in sampled for r in g.rewards})
        example = ""
        if sampled and sampled[0].completions:
            g = sampled[0]
            example = (f"; e.g. prompt {_short(run.decode(g.item.prompt_ids))} -> response "
                       f"{_short(run.decode(g.completions[0].token_ids.tolist()))} (answer {g.item.example.answer!r}, "
                       f"reward {g.rewards[0]:g})")
        self.logger.message(
            f"step {step}: no group with mixed outcomes to train on ({m.get('rollout/acc', 0.0):.0%} of "
            f"{sum(len(g.completions) for g in sampled)} samples correct, rewards "
            f"{', '.join(f'{r:g}' for r in rewards[:4])}{' ...' if len(rewards) > 4 else ''}); no gradient this step"
            + example)
        limit = cfg.algo.max_idle_steps
        if limit and self.idle_streak >= limit and m.get("rollout/acc", 0.0) >= 1.0:
            self.solved = True  # not a failure: the loop saves a checkpoint, evaluates and ends the run
            self.logger.message(
                f"step {step}: every sample of the last step was correct, and {self.idle_streak} steps in a row had no "
                f"group with mixed outcomes: the policy solves these prompts, nothing is left to learn from them; "
                f"stopping (algo.max_idle_steps={limit}; harder prompts, or algo.max_idle_steps=0, go on)")
            return
        if limit and self.idle_streak >= limit:
            template = run.problems.template
            raise TrainingError(
                f"step {step}: {self.idle_streak} steps in a row had no group with mixed outcomes, so nothing can be "
                f"learned ({m.get('rollout/acc', 0.0):.0%} of the last step's samples were correct, "
                f"{m.get('response/truncated_frac', 0.0):.0%} were cut at rollout.max_new_tokens={cfg.rollout.max_new_tokens}). "
                f"Likely causes: the prompt template (data.template: {template}), the reward function (reward.fn="
                f"{cfg.reward.fn}), the answer column ({_answer_column(cfg, sampled)}), or responses cut short "
                f"(rollout.max_new_tokens). Samples are in {run.run_dir / 'samples.jsonl'}; "
                f"{_what_is_kept(run.run_dir, cfg.ckpt.every)}. algo.max_idle_steps=0 never stops.")


def _answer_column(cfg: Any, sampled: list[Group]) -> str:
    """Which column the answers came from, in words: data.answer_key, or the 'answer' column a file's rows fall
    back to when they lack it."""
    from dapo.data.files import get_field

    key = cfg.data.answer_key
    fields = sampled[0].item.example.fields if sampled else {}
    if cfg.data.path and key != "answer" and get_field(fields, key, None) is None and "answer" in fields:
        return f"the file's 'answer' column: it has no data.answer_key={key}"
    return f"data.answer_key={key}"


def _what_is_kept(run_dir: Any, every: int) -> str:
    """The run's newest complete checkpoint, in words, for a message that stops it."""
    from dapo.trainer.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        return f"the run directory {run_dir} keeps its last checkpoint, {ckpt.name}"
    why = "ckpt.every=0: only the last step saves one" if not every else f"the first is at step {every} (ckpt.every)"
    return f"the run directory {run_dir} holds no checkpoint ({why})"

