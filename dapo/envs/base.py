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
run the model's arguments, run in worker processes: ``dapo.envs.tools``). So does a call that has not returned
after ``env.step_timeout_s``: each call of the environment's code runs on a helper thread the rollout waits on
for at most that long. A thread cannot be stopped, so the stuck call is left behind as the run exits; and a call
stuck in C code that holds the interpreter lock (a regular expression that backtracks without end) cannot be
timed out in-process at all. With ``dist.async_steps=1`` the environment runs on the rollout's background thread,
while the update runs on the main one.

An environment may define ``step_many(envs, texts) -> list[StepResult]`` as a classmethod or staticmethod: the
rollout then answers all trajectories waiting on it at once (``ToolEnv`` runs their tool calls in one pool
round), instead of one ``step`` after another.
"""
from __future__ import annotations

import inspect
import math
import numbers
import queue
import threading
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
    try:
        inspect.signature(factory).bind()
    except TypeError as e:  # refused at start, not as a TypeError at dapo's call site mid-rollout
        what = "__init__" if inspect.isclass(factory) else "signature"
        raise EnvError(f"env.path: {spec} is called with no arguments, one per trajectory, but its {what} needs "
                       f"some ({e}): give them defaults, or name a function that takes none and makes it (the row "
                       f"reaches reset(row))") from None
    except ValueError:  # no signature to read (a builtin): its call says
        pass
    return factory


class _CallThread:
    """A daemon thread running one call at a time for the thread that made it: ``call(fn, args, timeout_s)``
    returns what ``fn(*args)`` returned or raises what it raised, or raises ``_TimedOut`` once ``timeout_s`` has
    passed (the call goes on, stuck, and this thread is not used again)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="dapo-env", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, args, box, done = self._jobs.get()
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
                box.append((False, e))
            done.set()

    def call(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
        box: list[tuple[bool, Any]] = []
        done = threading.Event()
        self._jobs.put((fn, args, box, done))
        if not done.wait(timeout_s):
            raise _TimedOut
        ok, value = box[0]
        if ok:
            return value
        raise value


class _TimedOut(Exception):
    pass


_threads = threading.local()  # each calling thread (the rollout's, the main one's) its own _CallThread


def _call_within(timeout_s: float | None, fn: Callable[..., Any], *args: Any) -> Any:
    if not timeout_s:
        return fn(*args)
    worker = getattr(_threads, "worker", None)
    if worker is None:
        worker = _threads.worker = _CallThread()
    try:
        return worker.call(fn, args, timeout_s)
    except _TimedOut:
        _threads.worker = None  # stuck on the call; a later call gets a new thread
        raise


def user_call(owner: Any, what: str, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> Any:
    """``fn(*args)``, code of the user's environment (``owner``: its class or factory; ``what``: ``Game.step``):
    an exception it raises is an EnvError naming the call, the exception and the line of the user's file it came
    from, not a traceback through dapo's rollout. ``timeout_s`` (None or 0: none): the call runs on a helper
    thread, and one that has not returned by then is an EnvError saying so (``env.step_timeout_s``)."""
    key = "env.tools" if getattr(owner, "__module__", "") == "dapo.envs.tools" else "env.path"  # ToolEnv
    try:
        return _call_within(timeout_s, fn, *args)
    except _TimedOut:
        raise EnvError(f"{key}: {what} did not return within {timeout_s:g} s (env.step_timeout_s): the run stops "
                       f"(its checkpoints are kept); raise env.step_timeout_s, or 0 for no limit, if it is slow "
                       f"rather than stuck") from None
    except Exception as e:
        try:
            path = Path(inspect.getfile(owner)).resolve()
        except (TypeError, OSError):
            path = None
        raise EnvError(import_failure(f"{key}: {what} raised", e, path)) from e


def step_all(envs: list[Any], texts: list[str], timeout_s: float | None = None) -> list[StepResult]:
    """``step`` of every env on its text, through its class's ``step_many`` where it has one; checked.
    ``timeout_s``: the limit of each call (``user_call``); a ``step_many`` is one call."""
    out: list[StepResult | None] = [None] * len(envs)
    by_class: dict[type, list[int]] = {}
    for k, e in enumerate(envs):
        by_class.setdefault(type(e), []).append(k)
    for cls, idx in by_class.items():
        many = getattr(cls, "step_many", None)
        if many:
            res = user_call(cls, f"{cls.__name__}.step_many", many, [envs[k] for k in idx], [texts[k] for k in idx],
                            timeout_s=timeout_s)
        else:
            res = [user_call(cls, f"{cls.__name__}.step", envs[k].step, texts[k], timeout_s=timeout_s) for k in idx]
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
