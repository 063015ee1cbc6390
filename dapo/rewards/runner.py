"""Scoring a batch of responses with a reward function: in-process or in a pool of worker processes.

A reward function is user code that sees model output, so it must never stall or crash a training
step. ``RewardRunner`` calls it once per response under a time limit and turns everything that is
not a clean score (an exception, a timeout, NaN, None, a string) into a wrong answer (-1.0), counted in
``RewardBatch.stats``:

    reward/errors    the function raised, or its worker process died
    reward/timeouts  it ran past ``timeout_s`` (a worker stuck in C code is killed and replaced)
    reward/bad_type  it returned something that is not a finite score

With ``workers=0`` calls run in this process under a SIGALRM limit (main thread only: see
``dapo.rewards.limits``). With ``workers=N`` they run in N ``spawn``-ed processes, which share no
threads or CUDA state with the trainer, and can be killed when the signal limit is not enough.

Given a ``decoder`` (a ``tokenizers`` tokenizer's JSON), the workers also turn token ids into text
(``score_ids``): at the recipe's scale decoding is tens of seconds of a step, which then run on the
workers' cores instead of the trainer's. Each worker loads the tokenizer once, and decodes a response
just before scoring it, outside the reward function's time limit (decoding is not the function's time).
"""
from __future__ import annotations

import importlib
import inspect
import math
import multiprocessing as mp
import multiprocessing.connection
import numbers
import os
import pickle
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dapo.rewards.limits import _Alarm, call_with_time_limit
from dapo.rewards.math import TAIL_CHARS, score_math
from dapo.userfile import absolute_spec, load_named

BUILTIN_REWARDS = {"math": "dapo.rewards.math:score_math"}
"""Reward functions known by name; anything else is ``module:function`` or ``path/to/file.py:function``."""

ERRORS, TIMEOUTS, BAD_TYPE = "reward/errors", "reward/timeouts", "reward/bad_type"
_MAX_MESSAGES = 5


class RewardFnError(ValueError):
    """A reward function that cannot be loaded; the message names what was not found."""


@dataclass(frozen=True)
class RewardBatch:
    scores: list[float]
    """(N,) one score per response, in input order; -1.0 for every failure."""
    correct: list[bool]
    """(N,) whether each response counts as correct (the ``acc`` that dynamic sampling may filter on)."""
    stats: dict[str, float]
    """Counts in this batch: reward/errors, reward/timeouts, reward/bad_type."""
    messages: list[str] = field(default_factory=list)
    """Up to 5 distinct descriptions of failures in this batch, for a log line."""
    errors: list[str] = field(default_factory=list)
    """(N,) why each response scored as a failure ("" for a clean score): what samples.jsonl shows."""


# --------------------------------------------------------------------------------------------------
# loading


def load_reward_fn(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """Resolve a reward function: a callable as is; a built-in name (``"math"``); ``"module:function"``;
    or ``"path/to/file.py:function"`` (relative to the working directory).

    Raises RewardFnError naming the module, file or attribute that was not found.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise RewardFnError(f"reward function must be a callable or a string, got {type(spec).__name__}")
    spec = BUILTIN_REWARDS.get(spec, spec)
    fn = load_named(spec, key="reward function", kind="function", error=RewardFnError, prefix="_dapo_reward",
                    form_hint=f"a built-in ({', '.join(BUILTIN_REWARDS)}) nor ")
    if not callable(fn):
        raise RewardFnError(f"{spec} is a {type(fn).__name__}, not a function")
    return fn


class _Caller:
    """Calls ``fn(response, ground_truth, **extra)``, passing only the extra fields ``fn`` accepts.

    A function with ``**kwargs`` gets every field; ``fn(response, ground_truth)`` gets none; fields
    named like its first two parameters are never passed (they would collide).
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.takes_all, self.names, self.first_two = False, frozenset(), frozenset()
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # some builtins have no signature: call with two arguments
            return
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.first_two = frozenset(positional[:2])
        self.takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
        self.names = frozenset(
            p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )

    def kwargs(self, extra: dict[str, Any]) -> dict[str, Any]:
        if self.takes_all:
            return {k: v for k, v in extra.items() if k not in self.first_two}
        return {k: v for k, v in extra.items() if k in self.names}

    def __call__(self, response: str, ground_truth: str, extra: dict[str, Any]) -> Any:
        return self.fn(response, ground_truth, **self.kwargs(extra))


def check_reward_call(spec: str | Callable[..., Any], extras: Sequence[dict[str, Any]], where: str) -> None:
    """Refuse at start a reward function that no sample could be scored with: every call is
    ``fn(response, ground_truth, **the row's columns it names)``, so a function taking one argument, or naming a
    column the rows lack, would score each sample as a failure until the run stops idle. Checked against each
    distinct set of columns in ``extras`` (the rows' fields); ``where``: the file, for the message."""
    if isinstance(spec, str) and spec in BUILTIN_REWARDS:
        return
    fn = load_reward_fn(spec)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins): the calls will tell
        return
    caller, seen = _Caller(fn), set()
    for extra in extras:
        columns = frozenset(extra)
        if columns in seen:
            continue
        seen.add(columns)
        try:
            sig.bind("", "", **caller.kwargs(extra))
        except TypeError as e:
            name = spec if isinstance(spec, str) else getattr(fn, "__qualname__", repr(fn))
            raise RewardFnError(
                f"reward.fn={name}: cannot score {where}'s rows: {e} (each sample is scored as fn(response, "
                f"ground_truth, **columns): the response text, the row's answer, and the row's other columns that "
                f"the function names, or all of them for **kwargs; a row there has the columns "
                f"{', '.join(sorted(extra)) or 'none'})") from None


# --------------------------------------------------------------------------------------------------
# one call: value -> (score, correct, kind, message)


def normalize_reward(value: Any) -> tuple[float, bool, str, str]:
    """Turn what a reward function returned into ``(score, correct, kind, message)``.

    bool -> +1/-1; a real number -> that score, correct = score > 0; an object with ``.score`` (and
    optionally ``.correct``), or a dict with ``"score"`` (and optionally ``"correct"`` or ``"acc"``).
    Anything else, or a non-finite score, gives (-1.0, False, "reward/bad_type", why); kind is "" when
    the value was fine.
    """
    correct = None
    if isinstance(value, dict):
        if "score" not in value:
            return -1.0, False, BAD_TYPE, f"returned a dict without 'score' (keys: {sorted(value)[:5]})"
        score = value["score"]
        correct = value.get("correct", value.get("acc"))
    elif hasattr(value, "score") and not isinstance(value, (str, bytes, numbers.Number)):
        score, correct = value.score, getattr(value, "correct", None)
    else:
        score = value
    if isinstance(score, bool) or type(score).__name__ == "bool_":  # numpy's bool is not a bool
        score = bool(score)
        score, correct = (1.0 if score else -1.0), (score if correct is None else correct)
    if isinstance(score, (str, bytes)) or score is None or not hasattr(score, "__float__"):
        return -1.0, False, BAD_TYPE, f"returned {type(score).__name__}, not a number"
    try:
        score = float(score)
    except (TypeError, ValueError) as e:  # e.g. a tensor with more than one element
        return -1.0, False, BAD_TYPE, f"returned {type(value).__name__} that is not one number: {e}"
    if not math.isfinite(score):
        return -1.0, False, BAD_TYPE, f"returned a non-finite score ({score})"
    return score, bool(score > 0 if correct is None else correct), "", ""


def _score_one(caller: _Caller, response: str, answer: str, extra: dict, timeout_s: float | None):
    try:
        value = call_with_time_limit(timeout_s, caller, response, answer, extra)
    except TimeoutError as e:  # ours (RewardTimeout), or a limit the function keeps itself
        return -1.0, False, TIMEOUTS, f"timed out: {e}"
    except (KeyboardInterrupt, _Alarm):  # the user's Ctrl-C, or an enclosing time limit: not the function's
        raise
    except BaseException as e:  # SystemExit, a library's own BaseException timeouts, ...
        return -1.0, False, ERRORS, f"raised {type(e).__name__}: {e}"
    return normalize_reward(value)


# --------------------------------------------------------------------------------------------------
# worker processes


def _reward_handler(fn_spec, timeout_s: float | None, decoder: str | None = None) -> Callable[..., tuple]:
    """What a reward worker does with one item: ``(response, answer, extra) -> (score, correct, kind, message)``.
    A response that is not a string is token ids (an integer numpy array), decoded by the tokenizer ``decoder``
    (a ``tokenizers`` JSON) with special tokens skipped."""
    fn = load_reward_fn(fn_spec)
    if getattr(fn, "__module__", "") == "dapo.rewards.math":
        from dapo.rewards.math import warm_up

        warm_up()
    caller = _Caller(fn)
    tokenizer = None
    if decoder is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(decoder)

    def handle(response, answer, extra) -> tuple:
        if not isinstance(response, str):
            try:
                response = tokenizer.decode(response.tolist(), skip_special_tokens=True)
            except Exception as e:  # noqa: BLE001  ids the tokenizer cannot take: this response's failure
                return -1.0, False, ERRORS, f"could not decode the response's token ids: {type(e).__name__}: {e}"
        return _score_one(caller, response, answer, extra, timeout_s)

    return handle


def _worker_main(conn, fn_spec, timeout_s: float | None, memory_mb: int | None, handler: str,
                 options: dict | None = None) -> None:
    """A worker: build the handler (``module:function`` of a factory ``(fn_spec, timeout_s, **options) ->
    callable``), then run chunks of (index, *payload) forever, sending one (index, *result) per item as soon as
    it is done. Rewards use ``_reward_handler`` (options: the ``decoder``); tools (``dapo.envs.tools``) their own.

    Ctrl-C is the trainer's to handle (it stops us). The parent started this process with SIGINT blocked
    (``_Worker``), so a terminal's Ctrl-C to the process group that lands during interpreter start-up stays
    pending; ignoring SIGINT discards it, and only then is it unblocked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        module, _, name = handler.partition(":")
        handle = getattr(importlib.import_module(module), name)(fn_spec, timeout_s, **(options or {}))
        if memory_mb:
            import resource

            limit = int(memory_mb) * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except BaseException as e:
        conn.send(("load_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for i, *payload in chunk:
            conn.send((i, *handle(*payload)))


class _Worker:
    def __init__(self, ctx, fn_spec, timeout_s, memory_mb, handler: str, name: str, options: dict | None = None):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn_spec, timeout_s, memory_mb, handler, options),
                                daemon=True, name=name)
        # the child inherits the signal mask: with SIGINT blocked from its first instruction, a Ctrl-C to
        # the process group during its start-up (seconds of imports) cannot raise KeyboardInterrupt in it
        # before _worker_main ignores SIGINT; here a SIGINT that arrives meanwhile is delivered on unblock
        # before the block: starting multiprocessing's resource tracker unblocks SIGINT and SIGTERM again
        # (resource_tracker.ensure_running), which start() would otherwise do in the middle of it
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        blocked = hasattr(signal, "pthread_sigmask")
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocked else None
        try:
            self.proc.start()
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child.close()
        self.ready = False
        self.started = time.monotonic()
        self.pending: list[tuple] = []  # items sent and not answered yet, in the order it scores them
        self.deadline = float("inf")  # when the item it is on now counts as hung

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class RewardRunner:
    """Scores batches with one reward function; see the module docstring.

    fn: a callable, a built-in name (``"math"``), ``"module:function"`` or ``"path/to/file.py:function"``.
    With ``workers > 0`` a callable must be picklable (a module-level function). workers: 0 = in this
    process; N = a pool of N processes. timeout_s: per-response limit (None = none; not advised).
    memory_mb: address-space limit of each worker (``workers > 0`` only). decoder: a ``tokenizers``
    tokenizer's JSON (``Tokenizer.to_str()``) the workers decode ``score_ids``' token ids with (``workers > 0``
    only; ``decodes`` says whether this runner takes token ids).

    >>> with RewardRunner("math") as runner:
    ...     runner.score(["Answer: 4", "Answer: 5", "no answer"], ["4", "4", "4"]).scores
    [1.0, -1.0, -1.0]
    """

    def __init__(self, fn: str | Callable[..., Any] = "math", workers: int = 0, timeout_s: float | None = 5.0,
                 memory_mb: int | None = None, start_timeout_s: float = 120.0, decoder: str | None = None):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if memory_mb is not None and workers == 0:
            raise ValueError("memory_mb limits worker processes: it needs workers > 0")
        self._caller = _Caller(load_reward_fn(fn))  # fail here, early, if it cannot be found
        # score_math reads only the tail of a response: send workers just that, not 20k-token responses
        self._send_chars = TAIL_CHARS if self._caller.fn is score_math else None
        if workers and callable(fn):
            try:
                pickle.dumps(fn)
            except Exception as e:
                raise RewardFnError(
                    f"with workers > 0 the reward function must be picklable (a module-level function, "
                    f"or a 'module:function' string): {e}"
                ) from e
        # workers started later must find a file even after a chdir
        self._start(absolute_spec(fn), workers, timeout_s, memory_mb, start_timeout_s, decoder if workers else None)

    def _start(self, fn_spec: Any, workers: int, timeout_s: float | None, memory_mb: int | None,
               start_timeout_s: float, decoder: str | None = None) -> None:
        """The worker pool's settings, and its ``workers`` processes started (each builds ``_handler`` of
        ``fn_spec``); the tool pool (``dapo.envs.tools.ToolRunner``) starts its own through this too."""
        self.fn_spec, self.workers, self.timeout_s, self.memory_mb = fn_spec, workers, timeout_s, memory_mb
        self.start_timeout_s = start_timeout_s
        self.decoder = decoder
        self.decodes = decoder is not None
        """Whether ``score_ids`` can be called: workers that decode token ids themselves."""
        self._pool: list[_Worker] = []
        if workers:
            self._ctx = mp.get_context("spawn")
            self._pool = [self._spawn() for _ in range(workers)]

    # -- public ----------------------------------------------------------------------------------

    def score(self, responses: list[str], answers: list[str], extras: list[dict] | None = None) -> RewardBatch:
        """Score ``responses[i]`` against ``answers[i]`` with the row fields ``extras[i]``; all (N,)."""
        extras = [{} for _ in responses] if extras is None else extras
        if not len(responses) == len(answers) == len(extras):
            raise ValueError(f"responses, answers, extras must have one entry each: got "
                             f"{len(responses)}, {len(answers)}, {len(extras)}")
        items = list(zip(range(len(responses)), responses, answers, extras))
        if self.workers and self._send_chars:
            items = [(i, r[-self._send_chars :], a, e) for i, r, a, e in items]
        return self._run(items)

    def score_ids(self, ids: list[Any], answers: list[str], extras: list[dict] | None = None) -> RewardBatch:
        """``score`` of the responses whose token ids are ``ids[i]`` (1-D integer numpy arrays; int32 ships half
        the bytes of int64), decoded in the workers with special tokens skipped. Needs ``decodes``."""
        if not self.decodes:
            raise RuntimeError("score_ids needs reward workers with a decoder (workers > 0 and decoder=...)")
        extras = [{} for _ in ids] if extras is None else extras
        if not len(ids) == len(answers) == len(extras):
            raise ValueError(f"ids, answers, extras must have one entry each: got {len(ids)}, {len(answers)}, {len(extras)}")
        return self._run(list(zip(range(len(ids)), ids, answers, extras)))

    def _run(self, items: list[tuple]) -> RewardBatch:
        if self.workers:
            try:
                results = self._score_pool(items)
            except BaseException:  # Ctrl-C or a failed start: workers may hold items of this batch
                for k, w in enumerate(self._pool):
                    if w.pending:
                        w.kill()
                        self._pool[k] = self._spawn()
                raise
        else:
            results = [_score_one(self._caller, r, a, e, self.timeout_s) for _, r, a, e in items]
        stats = {ERRORS: 0.0, TIMEOUTS: 0.0, BAD_TYPE: 0.0}
        messages: list[str] = []
        for _, _, kind, message in results:
            if kind:
                stats[kind] += 1
                if len(messages) < _MAX_MESSAGES and message not in messages:
                    messages.append(message)
        return RewardBatch([r[0] for r in results], [r[1] for r in results], stats, messages,
                           [r[3] if r[2] else "" for r in results])

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        for w in self._pool:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._pool:
            w.proc.join(timeout=2)
            w.kill()
        self._pool = []

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- the pool ---------------------------------------------------------------------------------

    _handler = "dapo.rewards.runner:_reward_handler"
    """The worker's handler factory (``_worker_main``); the tool pool (``dapo.envs.tools``) names its own."""
    _what = "reward"

    def _spawn(self) -> _Worker:
        options = {"decoder": self.decoder} if self.decoder is not None else None
        return _Worker(self._ctx, self.fn_spec, self.timeout_s, self.memory_mb, self._handler, f"dapo-{self._what}",
                       options)

    def _failure(self, kind: str, message: str) -> tuple:
        """The result of an item whose worker was killed (hung) or died."""
        return (-1.0, False, kind, message)

    def _hard_limit(self) -> float:
        # the worker's own SIGALRM limit fires at timeout_s; this is for a worker stuck where signals
        # cannot reach (C code, a swallowed alarm)
        return float("inf") if self.timeout_s is None else self.timeout_s * 1.5 + 1.0

    def _score_pool(self, items: list[tuple]) -> list[tuple]:
        if not self._pool:
            raise RuntimeError("RewardRunner is closed")
        results: list[tuple | None] = [None] * len(items)
        chunk = max(1, min(64, len(items) // (4 * len(self._pool)) or 1))
        queue = [items[k : k + chunk] for k in range(0, len(items), chunk)]
        remaining = len(items)
        while remaining:
            now = time.monotonic()
            for w in self._pool:  # hand out work
                if w.ready and not w.pending and queue:
                    w.pending = list(queue.pop(0))
                    w.conn.send(w.pending)
                    w.deadline = now + self._hard_limit()
            waits = [w.deadline for w in self._pool if w.pending] + [
                w.started + self.start_timeout_s for w in self._pool if not w.ready]
            timeout = max(0.0, min(waits, default=now + 1.0) - now)
            ready = mp.connection.wait([w.conn for w in self._pool], timeout=timeout)
            for k, w in enumerate(self._pool):
                if w.conn in ready:
                    remaining -= self._receive(k, results, queue)
            now = time.monotonic()
            for k, w in enumerate(self._pool):
                if w.pending and now > w.deadline:
                    remaining -= self._replace(k, results, queue, TIMEOUTS,
                                               f"timed out: killed a worker stuck for {self._hard_limit():g} s")
                elif not w.ready and now > w.started + self.start_timeout_s:
                    raise RuntimeError(f"{self._what} worker did not start within {self.start_timeout_s:g} s")
        return results

    def _receive(self, k: int, results: list, queue: list) -> int:
        """Read what worker k sent; returns how many items it finished (a crash finishes one)."""
        w, done = self._pool[k], 0
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                elif msg[0] == "load_error":
                    raise RewardFnError(f"{self._what} worker could not load {self.fn_spec!r}: {msg[1]}")
                else:
                    i = msg[0]
                    results[i] = msg[1:]
                    w.pending.pop(0)  # a worker scores its chunk in order
                    w.deadline = time.monotonic() + self._hard_limit()
                    done += 1
        except (EOFError, OSError):  # it died: the item it was on is an error, the rest go back
            w.proc.join(timeout=1)
            code = w.proc.exitcode
            if not w.ready:
                raise RuntimeError(
                    f"{self._what} worker exited while starting (exit code {code}); its error is printed above. Worker "
                    "processes are spawned: a script using workers > 0 needs `if __name__ == '__main__':`"
                ) from None
            return done + self._replace(k, results, queue, ERRORS, f"worker process died (exit code {code})")
        return done

    def _replace(self, k: int, results: list, queue: list, kind: str, message: str) -> int:
        """Kill worker k, charge its current item to ``kind``, requeue the rest, start a new worker."""
        w = self._pool[k]
        w.kill()
        self._pool[k] = self._spawn()
        if not w.pending:
            return 0
        (i, *_), rest = w.pending[0], w.pending[1:]
        results[i] = self._failure(kind, message)
        if rest:
            queue.insert(0, rest)
        return 1
