"""Tools: plain Python functions the model calls by writing a call in its turn (``--tools my_tools.py``).

Every public function of the tools file (a name not starting with ``_``, defined in that file) is a tool; the
built-in ``calculator`` (``--tools calculator``: ``mul(a, b)``, ``calc(expr)``, :mod:`dapo.envs.calculator`)
stands for its file. The model
calls one by writing, anywhere in its turn, either form:

    <tool_call>{"name": "mul", "arguments": {"a": 12, "b": 34}}</tool_call>    the JSON form chat templates use
                                                                             (Qwen2.5, Hermes); arguments may
                                                                             also be a list (positional)
    <tool>mul(12, 34)</tool>                                                  a Python call whose arguments are
                                                                             literals (numbers, strings, lists...)

A turn with calls is answered with their results, in order, and the model goes on; a turn without a call ends the
trajectory (it is the final answer). Each result is the text the tool printed followed by ``str`` of what it
returned (nothing for None), cut to ``env.max_output_chars``. How the results reach the model:

* with a chat template: as ``tool`` messages, rendered by the template (``dapo.rollout.multiturn``);
* without one: ``<result>TEXT</result>`` and a newline per call, appended as they are.

Which tools exist: with a chat template that renders tools (Qwen2.5, Hermes, Llama 3.1), their JSON schemas
(:func:`tool_schemas`: from Google-style docstrings, else from the signatures) go to it as
``apply_chat_template(tools=...)``, and it lists them in the prompts (``env.describe_tools``). Otherwise the
prompts must say which tools exist.

A call that cannot be parsed, names no tool, raises, runs past ``env.timeout_s`` or kills its process is answered
with a result that starts with ``error:`` and says why; the run goes on. Tools run in a pool of worker processes
(``env.workers``), the reward pool's machinery: a time limit in the worker (SIGALRM), and a worker stuck where
signals cannot reach is killed and replaced. Output is bounded in the worker, so a tool that prints or returns
megabytes costs the pipe ``max_output_chars``.
"""
from __future__ import annotations

import ast
import inspect
import io
import json
import re
import types
import typing
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dapo.envs.base import StepResult
from dapo.rewards.limits import _Alarm, call_with_time_limit
from dapo.rewards.runner import TIMEOUTS, RewardRunner
from dapo.userfile import import_file

CALLS, ERRORS, TIMEOUTS_, MALFORMED = "tool/calls", "tool/errors", "tool/timeouts", "tool/malformed"
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool>(.*?)</tool>", re.DOTALL)
_OPEN = re.compile(r"<tool_call>|<tool>")


@dataclass(frozen=True)
class ToolCall:
    name: str
    args: tuple = ()
    kwargs: dict | None = None
    error: str = ""
    """Why the call could not be parsed ("" when it could): the model is told so, nothing runs."""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The calls in a model turn, in order (see the module docstring), malformed ones with their ``error``.

    >>> parse_tool_calls('x <tool>mul(2, b=3)</tool> <tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>')
    [ToolCall(name='mul', args=(2,), kwargs={'b': 3}, error=''), ToolCall(name='add', args=(1, 2), kwargs={}, error='')]
    >>> parse_tool_calls("<tool>mul(2, x)</tool>")[0].error
    "malformed tool call 'mul(2, x)': arguments must be literals (numbers, strings, lists, dicts)"
    """
    calls, end = [], 0
    for m in _CALL.finditer(text):
        calls.append(_parse_json(m.group(1)) if m.group(1) is not None else _parse_python(m.group(2)))
        end = m.end()
    if _OPEN.search(text, end):
        calls.append(ToolCall("", error="malformed tool call: a <tool_call> or <tool> is not closed"))
    return calls


def _parse_json(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except ValueError as e:
        return ToolCall("", error=f"malformed tool call {_clip(body.strip(), 200)!r}: not JSON ({e})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", error='malformed tool call: expected {"name": ..., "arguments": {...}}')
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some templates write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            pass
    if isinstance(args, dict):
        return ToolCall(obj["name"], (), args)
    if isinstance(args, list):
        return ToolCall(obj["name"], tuple(args), {})
    return ToolCall(obj["name"], error="malformed tool call: arguments must be an object or a list")


def _parse_python(body: str) -> ToolCall:
    bad = f"malformed tool call {_clip(body.strip(), 200)!r}"
    try:
        node = ast.parse(body.strip(), mode="eval").body
    except SyntaxError:
        return ToolCall("", error=f"{bad}: expected name(arg, ...)")
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return ToolCall("", error=f"{bad}: expected name(arg, ...)")
    try:
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ToolCall(node.func.id, error=f"{bad}: arguments must be literals (numbers, strings, lists, dicts)")
    if len(kwargs) != len(node.keywords):
        return ToolCall(node.func.id, error=f"{bad}: **kwargs are not supported")
    return ToolCall(node.func.id, args, kwargs)


BUILTIN_TOOLS = {"calculator": Path(__file__).with_name("calculator.py")}
"""Tools files shipped with dapo, by the name ``env.tools`` (``--tools``) takes for them."""


def tools_file(spec: str | Path) -> Path:
    """The file ``env.tools`` names: a built-in name (``calculator``) or a path; a missing file is an error
    listing the built-in names. A file of the built-in's name in the working directory is taken as written."""
    p = Path(spec).expanduser()
    if not p.is_file() and str(spec) in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[str(spec)]
    if not p.is_file():
        raise FileNotFoundError(f"env.tools: file {str(p.resolve())!r} not found (or a built-in: "
                                f"{', '.join(sorted(BUILTIN_TOOLS))})")
    return p.resolve()


def load_tools(path: str | Path) -> dict[str, Callable[..., Any]]:
    """The tools of a file (or a built-in name, :func:`tools_file`): its public functions defined in it
    (imported ones are not tools), by name."""
    p = tools_file(path)
    module = import_file(p, "_dapo_tools", "env.tools")
    tools = {k: v for k, v in vars(module).items()
             if inspect.isfunction(v) and not k.startswith("_") and v.__module__ == module.__name__}
    if not tools:
        raise ValueError(f"env.tools: {p} defines no public function (every def not starting with _ is a tool)")
    return tools


_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", tuple: "array",
               dict: "object", type(None): "null"}


def _json_type(hint: Any) -> str | list[str] | None:
    """The JSON schema type of a plain annotation (``int``, ``int | float``, ``list[str]``); None: not one."""
    if hint in _JSON_TYPES:
        return _JSON_TYPES[hint]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_json_type(a) for a in typing.get_args(hint)]
        return parts if all(isinstance(t, str) for t in parts) else None  # type: ignore[return-value]
    return _JSON_TYPES.get(origin) if origin is not None else None


def _signature_schema(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    """A function's schema from its signature: the docstring's first paragraph, each argument's type where it
    has a plain annotation, the arguments without a default required."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: no types
        hints = {}
    props: dict[str, dict[str, Any]] = {}
    required = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        t = _json_type(hints.get(p.name, inspect.Parameter.empty))
        props[p.name] = {"type": t} if t else {}
        if p.default is p.empty:
            required.append(p.name)
    doc = (inspect.getdoc(fn) or "").split("\n\n")[0].strip()
    return {"type": "function", "function": {"name": name, "description": " ".join(doc.split()),
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": required}}}


def tool_schemas(path: str | Path) -> list[dict[str, Any]]:
    """The tools of ``path`` as the JSON schemas a chat template lists (``apply_chat_template(tools=...)``), in
    the file's order: transformers' ``get_json_schema`` where the docstring describes every argument (Google
    style: a description, then an ``Args:`` section), else one from the signature (``_signature_schema``).

    >>> [s["function"]["name"] for s in tool_schemas("calculator")]
    ['mul', 'calc']
    >>> tool_schemas("calculator")[0]["function"]["parameters"]["properties"]["a"]
    {'type': ['integer', 'number'], 'description': 'the first factor (an integer or a decimal)'}
    """
    from transformers.utils import get_json_schema

    out = []
    for name, fn in load_tools(path).items():
        try:
            schema = get_json_schema(fn)
        except Exception:  # noqa: BLE001 - no docstring, an argument it does not describe, a hint it cannot map
            schema = _signature_schema(name, fn)
        schema["function"].pop("return", None)
        schema.pop("return", None)
        out.append(schema)
    return out


# ------------------------------------------------------------------------------------------------ in the worker


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters cut]"


class _Bounded(io.TextIOBase):
    """A text sink keeping the first ``limit`` characters written and counting the rest."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.kept, self.dropped = limit, [], 0, 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        room = max(0, self.limit - self.kept)
        self.parts.append(s[:room])
        self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - room)
        return len(s)

    def text(self) -> str:
        return "".join(self.parts)


def call_tool(tools: dict[str, Callable[..., Any]], call: ToolCall, timeout_s: float | None,
              max_chars: int) -> tuple[str, str]:
    """Run one call: (result text, "" or the metric it counts in: tool/errors, tool/timeouts, tool/malformed)."""
    if call.error:
        return f"error: {call.error}", MALFORMED
    fn = tools.get(call.name)
    if fn is None:
        return f"error: no tool named {_clip(call.name, 100)!r}; the tools are: {', '.join(sorted(tools))}", MALFORMED
    out = _Bounded(max_chars)
    try:
        with redirect_stdout(out), redirect_stderr(out):
            value = call_with_time_limit(timeout_s, fn, *call.args, **(call.kwargs or {}))
        shown = "" if value is None else str(value)
    except TimeoutError:
        return f"error: {call.name} took longer than {timeout_s:g} s", TIMEOUTS_
    except (KeyboardInterrupt, _Alarm):  # the trainer's Ctrl-C, an enclosing limit: not the tool's
        raise
    except BaseException as e:  # noqa: BLE001  SystemExit, a bad argument, anything the tool raises
        return _clip(f"error: {call.name} raised {type(e).__name__}: {e}", max_chars), ERRORS
    text, total = out.text() + shown[:max_chars], out.kept + out.dropped + len(shown)
    return (text[:max_chars] + f"... [{total - max_chars} more characters cut]" if total > max_chars else text), ""


def _tool_handler(spec: tuple[str, int], timeout_s: float | None) -> Callable[[ToolCall], tuple[str, str]]:
    """The worker's side of ``ToolRunner`` (see ``dapo.rewards.runner._worker_main``)."""
    path, max_chars = spec
    tools = load_tools(path)
    return lambda call: call_tool(tools, call, timeout_s, max_chars)


class ToolRunner(RewardRunner):
    """Runs tool calls in ``workers`` processes with a time limit each: ``run(calls) -> [(text, kind)]``."""

    _handler = "dapo.envs.tools:_tool_handler"
    _what = "tool"

    def __init__(self, path: str | Path, workers: int = 2, timeout_s: float = 5.0, max_chars: int = 1000,
                 memory_mb: int | None = None, start_timeout_s: float = 120.0):
        if workers < 1:
            raise ValueError(f"env.workers: tools run in worker processes, so it must be >= 1, got {workers}")
        self.names = sorted(load_tools(path))  # fail here, early, on a missing file or a file without tools
        self._start((str(tools_file(path)), int(max_chars)), workers, timeout_s, memory_mb, start_timeout_s)

    def _failure(self, kind: str, message: str) -> tuple:
        return f"error: the tool {message}", TIMEOUTS_ if kind == TIMEOUTS else ERRORS

    def run(self, calls: list[ToolCall]) -> list[tuple[str, str]]:
        """(result text, metric kind or "") of each call, in order."""
        return [tuple(r) for r in self._score_pool([(i, c) for i, c in enumerate(calls)])] if calls else []


class ToolEnv:
    """The environment of ``--tools``: a turn's tool calls are answered with their results (module docstring);
    a turn without one ends the trajectory, scored by the reward function. ``chat``: results as tool messages
    (a chat template renders them) rather than ``<result>`` text."""

    def __init__(self, runner: ToolRunner, chat: bool = False):
        self.runner, self.chat = runner, chat

    def reset(self, row: dict[str, Any]) -> None:
        return None  # the row's prompt, as data.template renders it

    def step(self, model_text: str) -> StepResult:
        return self.step_many([self], [model_text])[0]

    @staticmethod
    def step_many(envs: list["ToolEnv"], texts: list[str]) -> list[StepResult]:
        """Every trajectory's calls in one pool round: ``env.workers`` run at a time, so calls that all hang cost
        about (their number / env.workers) x env.timeout_s of the step, not one time limit."""
        calls = [parse_tool_calls(t) for t in texts]
        flat = [c for cs in calls for c in cs]
        results = envs[0].runner.run(flat) if flat else []
        out, k = [], 0
        for env, cs in zip(envs, calls):
            res, k = results[k : k + len(cs)], k + len(cs)
            if not cs:
                out.append(StepResult(None, None, True))
                continue
            info = {CALLS: float(len(cs)), ERRORS: 0.0, TIMEOUTS_: 0.0, MALFORMED: 0.0}
            for _, kind in res:
                if kind:
                    info[kind] += 1
            if env.chat:
                obs: Any = [{"role": "tool", "content": text} for text, _ in res]
            else:
                obs = "".join(f"<result>{text}</result>\n" for text, _ in res)
            out.append(StepResult(obs, None, False, "tool", info))
        return out
