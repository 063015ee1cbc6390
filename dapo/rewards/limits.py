"""Per-call time limits inside one process, for verifiers that may hang on a pathological input.

A symbolic checker can spend minutes on ``9^{9^{9^{9}}}``; one such response must not stall an RL step.
``call_with_time_limit`` arms a one-shot ``SIGALRM`` timer (``setitimer``) around a call and turns
its expiry into ``RewardTimeout``. Limits nest: an inner limit never extends an outer one, and the
outer timer is re-armed with whatever it had left when the inner call returns.

Signals only reach the main thread of the main interpreter, and only between Python bytecodes: a call
made from another thread runs without a limit, and a long C-level operation (a huge integer power, a
catastrophic regular expression) is only stopped by killing the process, which is what
``RewardRunner(workers > 0)`` does.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable


class RewardTimeout(TimeoutError):
    """A reward call ran past its time limit."""


class _Alarm(BaseException):
    """Raised by our SIGALRM handler. A BaseException, so that a verifier's broad ``except Exception``
    (math-verify has several) cannot swallow it; converted to ``RewardTimeout`` by its own limit."""

    def __init__(self, token: object):
        super().__init__("time limit")
        self.token = token


def limits_available() -> bool:
    """True when ``call_with_time_limit`` can interrupt a call here (POSIX, main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def call_with_time_limit(seconds: float | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Return ``fn(*args, **kwargs)``, or raise ``RewardTimeout`` if it runs longer than ``seconds``.

    ``seconds`` None or <= 0, or no way to interrupt here (see ``limits_available``), runs ``fn`` with
    no limit. If an enclosing limit expires first, its own timeout propagates (not this one's).

    >>> call_with_time_limit(1.0, sum, [1, 2, 3])
    6
    """
    if seconds is None or seconds <= 0 or not limits_available():
        return fn(*args, **kwargs)
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    if 0 < outer_left <= seconds:
        return fn(*args, **kwargs)  # the enclosing deadline comes first and is still armed
    outer_handler = signal.getsignal(signal.SIGALRM)
    token = object()

    def on_alarm(signum, frame):
        raise _Alarm(token)

    start = time.monotonic()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Alarm as e:
        if e.token is not token:
            raise
        raise RewardTimeout(f"took longer than {seconds:g} s") from None
    finally:
        signal.signal(signal.SIGALRM, outer_handler if outer_handler is not None else signal.SIG_DFL)
        if outer_left > 0:  # give the enclosing limit back what it had left (at least a tick)
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-4))
