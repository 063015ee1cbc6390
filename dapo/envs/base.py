"""The environment interface: what a multi-turn rollout talks to between the model's turns.

A user writes one small file (``--env my_env.py:Guess``)::

    from dapo.envs import StepResult

    class Guess:
        def reset(self, row):                    # the row's fields: prompt, answer, data_source, the rest
            self.answer, self.tries = int(row["answer"]), 0
            return None                          # None: the row's prompt as data.template renders it
        def step(self, model_text):              # the text of the model's last turn
            self.tries += 1
            guess = int(model_text) if model_text.strip().isdigit() else -1
            if guess == self.answer:
                return StepResult(None, reward=1.0, done=True)
            out = self.tries == 3                # the third miss ends it, scored -1
            return StepResult("higher" if guess < self.answer else "lower", reward=-1.0 if out else None, done=out)

One instance per trajectory, made by calling what ``env.path`` names with no arguments. ``reset`` returns the
first prompt: a string (tokenised as it is), chat messages (rendered by the tokenizer's chat template with a
generation prompt), or None (the row's prompt as single-turn training renders it). Every trajectory of a row
must get the same first prompt: a group shares it. ``step`` answers one model turn: an observation to append
(or None), a reward (or None), and whether the trajectory is over. The trajectory's reward is the sum of the
rewards ``step`` gave when it gave any, else the run's reward function on the last turn's text.

An environment runs in the trainer process, so an exception in ``reset`` or ``step`` stops the run (tools, which
run the model's arguments, run in worker processes: ``dapo.envs.tools``). With ``dist.async_steps=1`` it runs on
the rollout's background thread, while the update runs on the main one.

An environment may define ``step_many(envs, texts) -> list[StepResult]`` as a classmethod or staticmethod: the
rollout then answers all trajectories waiting on it at once (``ToolEnv`` runs their tool calls in one pool
round), instead of one ``step`` after another.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from dapo.userfile import import_failure, load_named

Prompt = str | list[dict[str, Any]] | None


@dataclass(frozen=True)
class StepResult:
    observation: str | list[dict[str, Any]] | None = None
    """Text to show the model before its next turn (None: nothing). With a chat template it is rendered as a
    message of ``role`` (or, as a list, as these messages); without one it is appended as it is."""
    reward: float | None = None
    """A reward for this turn; the trajectory's reward is the sum of those given (None: none given)."""
    done: bool = False
    """The trajectory is over: no more turns."""
    role: str = "user"
    """The chat role the observation is rendered as (``tool`` for tool results)."""
    info: dict[str, float] = field(default_factory=dict)
    """Counts summed into the step's metrics under their own names (``tool/calls``, ``tool/errors``, ...)."""


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> Prompt:
        """The first prompt of a trajectory for ``row`` (see the module docstring)."""
        ...

    def step(self, model_text: str) -> StepResult:
        """Answer the model's turn ``model_text``."""
        ...


class EnvError(ValueError):
    """An environment that cannot be loaded or that answered something that is not a ``StepResult``."""


def load_env(spec: str) -> Callable[[], Environment]:
    """What ``env.path`` names: ``path/to/file.py:Name`` or ``module:Name``, a class (or factory) called with no
    arguments for each trajectory. Raises EnvError naming the file or attribute that was not found."""
    factory = load_named(spec, key="env.path", kind="class or function", error=EnvError, prefix="_dapo_env")
    if not callable(factory):
        raise EnvError(f"env.path: {spec} is a {type(factory).__name__}, not a class or function")
    return factory


def user_call(owner: Any, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, code of the user's environment (``owner``: its class or factory; ``what``: ``Game.step``):
    an exception it raises is an EnvError naming the call, the exception and the line of the user's file it came
    from, not a traceback through dapo's rollout."""
    try:
        return fn(*args)
    except Exception as e:
        try:
            path = Path(inspect.getfile(owner)).resolve()
        except (TypeError, OSError):
            path = None
        key = "env.tools" if getattr(owner, "__module__", "") == "dapo.envs.tools" else "env.path"  # ToolEnv
        raise EnvError(import_failure(f"{key}: {what} raised", e, path)) from e


def step_all(envs: list[Any], texts: list[str]) -> list[StepResult]:
    """``step`` of every env on its text, through its class's ``step_many`` where it has one; checked."""
    out: list[StepResult | None] = [None] * len(envs)
    by_class: dict[type, list[int]] = {}
    for k, e in enumerate(envs):
        by_class.setdefault(type(e), []).append(k)
    for cls, idx in by_class.items():
        many = getattr(cls, "step_many", None)
        if many:
            res = user_call(cls, f"{cls.__name__}.step_many", many, [envs[k] for k in idx], [texts[k] for k in idx])
        else:
            res = [user_call(cls, f"{cls.__name__}.step", envs[k].step, texts[k]) for k in idx]
        for k, r in zip(idx, res):
            if not isinstance(r, StepResult):
                raise EnvError(f"{cls.__name__}.step returned {type(r).__name__}, not a dapo.envs.StepResult")
            if r.reward is not None and (isinstance(r.reward, bool) or not isinstance(r.reward, numbers.Real)):
                raise EnvError(f"{cls.__name__}.step returned reward={r.reward!r}: a number or None")
            if r.reward is not None and not math.isfinite(r.reward):
                raise EnvError(f"{cls.__name__}.step returned reward={r.reward!r}: a finite number or None (a "
                               f"non-finite reward would make the group's advantages NaN)")
            if r.observation is not None and not isinstance(r.observation, (str, list)):
                raise EnvError(f"{cls.__name__}.step returned observation of type {type(r.observation).__name__}: "
                               f"a string, chat messages or None")
            out[k] = r
    return out  # type: ignore[return-value]


def row_of(example: Any) -> dict[str, Any]:
    """The dict ``reset`` gets: the row's other fields, then prompt, answer and data_source."""
    return {**example.fields, "prompt": example.prompt, "answer": example.answer, "data_source": example.data_source}
