"""Environments and tools (#26): the call syntax, and tools that raise, hang, flood or die becoming error
observations within the time limit, in real worker processes."""
import doctest
import time

import pytest

import dapo.envs.tools
from dapo.envs import StepResult, ToolEnv, ToolRunner, load_env, parse_tool_calls, step_all
from dapo.envs.base import EnvError

TOOLS = '''
import os
import time
from math import sqrt  # imported: not a tool

def mul(a, b):
    return a * b

def shout(text):
    print(text.upper())

def boom(x):
    raise ZeroDivisionError(f"no {x}")

def nap(s):
    time.sleep(s)
    return "woke"

def spin():
    while True:
        pass

def flood():
    print("x" * 3_000_000)
    return "y" * 5_000_000

def die():
    os._exit(3)

def _helper():
    return 1
'''


def test_doctests():
    assert doctest.testmod(dapo.envs.tools).failed == 0


def test_call_syntax_both_forms_and_malformed_calls():
    calls = parse_tool_calls('a <tool_call>{"name": "mul", "arguments": {"a": 2, "b": "x"}}</tool_call> b '
                             '<tool>shout("hi")</tool> <tool_call>{"name": 3}</tool_call> <tool>mul(1,</tool> <tool>')
    assert [(c.name, c.args, c.kwargs) for c in calls[:2]] == [("mul", (), {"a": 2, "b": "x"}), ("shout", ("hi",), {})]
    assert [bool(c.error) for c in calls] == [False, False, True, True, True]
    assert "not closed" in calls[4].error
    assert parse_tool_calls("no call here, <result>4</result>") == []
    # arguments written as a JSON string (as some chat templates do)
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')[0].kwargs == {"a": 1}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "my_tools.py"
    path.write_text(TOOLS)
    with ToolRunner(path, workers=2, timeout_s=1.0, max_chars=200) as r:
        yield r


def test_public_functions_of_the_file_are_the_tools(runner):
    assert runner.names == ["boom", "die", "flood", "mul", "nap", "shout", "spin"]


def test_bad_tools_become_error_observations_within_the_time_limit(runner):
    env = ToolEnv(runner)
    turns = ["<tool>mul(6, 7)</tool> <tool>shout('hi')</tool>", "<tool>boom(1)</tool>", "<tool>nap(30)</tool>",
             "<tool>flood()</tool>", "<tool>spin()</tool>", "<tool>die()</tool>", "<tool>sqrt(4)</tool><tool>mul(</tool>",
             "the answer is 42"]
    t0 = time.monotonic()
    res = step_all([ToolEnv(runner) for _ in turns], turns)
    took = time.monotonic() - t0
    assert took < 8, took  # hangs run at once on 2 workers, each stopped at 1 s (spin too: SIGALRM reaches it)
    obs = [r.observation for r in res]
    assert obs[0] == "<result>42</result>\n<result>HI\n</result>\n"
    assert obs[1] == "<result>error: boom raised ZeroDivisionError: no 1</result>\n"
    assert obs[2] == obs[4].replace("spin", "nap") == "<result>error: nap took longer than 1 s</result>\n"
    # 3 MB printed and 5 MB returned: the first 200 characters, and how much was cut
    assert obs[3] == "<result>" + "x" * 200 + f"... [{3_000_001 + 5_000_000 - 200} more characters cut]</result>\n"
    assert obs[5].startswith("<result>error: the tool worker process died (exit code 3)")
    assert obs[6] == ("<result>error: no tool named 'sqrt'; the tools are: boom, die, flood, mul, nap, shout, spin</result>\n"
                      "<result>error: malformed tool call 'mul(': expected name(arg, ...)</result>\n")
    assert res[7] == StepResult(None, None, True)  # no call: the final answer
    assert [r.done for r in res[:7]] == [False] * 7 and res[0].role == "tool"
    assert res[0].info == {"tool/calls": 2.0, "tool/errors": 0.0, "tool/timeouts": 0.0, "tool/malformed": 0.0}
    assert [res[k].info["tool/timeouts"] for k in (2, 4)] == [1.0, 1.0] and res[1].info["tool/errors"] == 1.0
    assert res[5].info["tool/errors"] == 1.0 and res[6].info["tool/malformed"] == 2.0
    # the pool recovered: the worker that died was replaced
    assert env.step("<tool>mul(2, 3)</tool>").observation == "<result>6</result>\n"


def test_chat_mode_answers_with_tool_messages(runner):
    r = ToolEnv(runner, chat=True).step('<tool_call>{"name": "mul", "arguments": [3, 5]}</tool_call>')
    assert r.observation == [{"role": "tool", "content": "15"}] and r.role == "tool"


def test_load_env_names_what_is_missing(tmp_path):
    f = tmp_path / "my_env.py"
    f.write_text("class Env:\n    def reset(self, row):\n        return None\n    def step(self, text):\n        return 3\n")
    env = load_env(f"{f}:Env")()
    with pytest.raises(EnvError, match="Env.step returned int, not a dapo.envs.StepResult"):
        step_all([env], ["x"])
    env.step = lambda text: StepResult("x", reward="1")
    with pytest.raises(EnvError, match="returned reward='1': a number or None"):
        step_all([env], ["x"])
    for bad in (float("nan"), float("inf"), -float("inf")):
        env.step = lambda text, bad=bad: StepResult("x", reward=bad)
        with pytest.raises(EnvError, match=r"returned reward=(nan|inf|-inf): a finite number or None"):
            step_all([env], ["x"])
    import numpy as np

    env.step = lambda text: StepResult("x", reward=np.float32(0.5))  # a numpy score is a number
    assert step_all([env], ["x"])[0].reward == 0.5
    with pytest.raises(EnvError, match="has no class or function 'Nope'; it defines: Env"):
        load_env(f"{f}:Nope")
    with pytest.raises(EnvError, match="not found"):
        load_env(f"{tmp_path / 'nope.py'}:Env")
    # the same spec grammar and messages as reward.fn (dapo.userfile): module form, malformed, not callable
    with pytest.raises(EnvError, match="cannot import module 'no_such_module_xyz'"):
        load_env("no_such_module_xyz:Env")
    with pytest.raises(EnvError, match=r"env.path 'Env' is not of the form 'path/to/file.py:name'"):
        load_env("Env")
    (tmp_path / "consts.py").write_text("LIMIT = 3\n")
    with pytest.raises(EnvError, match="LIMIT is a int, not a class or function"):
        load_env(f"{tmp_path / 'consts.py'}:LIMIT")
    # module form; a class that cannot be made with no arguments is refused at load, naming what it needs
    with pytest.raises(EnvError, match=r"env.path: dapo.envs.tools:ToolEnv is called with no arguments, one per "
                                       r"trajectory, but its __init__ needs some \(missing a required argument: "
                                       r"'runner'\): give them defaults"):
        load_env("dapo.envs.tools:ToolEnv")
    (tmp_path / "made.py").write_text("class Env:\n    def __init__(self, size=3):\n        self.size = size\n"
                                      "def make(level):\n    return Env(level)\n")
    assert load_env(f"{tmp_path / 'made.py'}:Env")().size == 3  # defaults are fine
    with pytest.raises(EnvError, match=r"made.py:make is called with no arguments.* its signature needs some"):
        load_env(f"{tmp_path / 'made.py'}:make")


def test_an_environment_that_raises_is_named_with_its_line(tmp_path):
    f = tmp_path / "crashy.py"
    f.write_text("class Env:\n    def reset(self, row):\n        return None\n"
                 "    def step(self, text):\n        return {}['score']\n")
    env = load_env(f"{f}:Env")()
    with pytest.raises(EnvError, match=rf"env.path: Env.step raised: KeyError: 'score' at {f}, line 5: return {{}}"):
        step_all([env], ["x"])


@pytest.mark.parametrize("extra, message", [
    (["env.path=e.py:E"], "set env.path or env.tools, not both"),
    (["rollout.max_total_tokens=5"], "must be 0 or >= rollout.max_new_tokens"),
    (["rollout.max_turns=0"], "rollout.max_turns: must be >= 1"),
])
def test_config_refuses_what_multi_turn_cannot_run_on(extra, message):
    from dapo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["env.tools=t.py", *extra])


HANGS = '''import threading
from dapo.envs import StepResult

class Env:
    def reset(self, row):
        return None
    def step(self, text):
        if text == "hang":
            threading.Event().wait()      # never set: blocked until the process exits
        if text == "boom":
            raise TimeoutError("the user's own TimeoutError")
        return StepResult(reward=1.0, done=True, info={"on": float(threading.current_thread().name == "dapo-env")})

class Many(Env):
    @staticmethod
    def step_many(envs, texts):
        return [e.step(t) for e, t in zip(envs, texts)]
'''


@pytest.mark.parametrize("cls, what", [("Env", "Env.step"), ("Many", "Many.step_many")])
def test_an_environment_call_past_its_limit_stops_with_an_error_naming_it(tmp_path, cls, what):
    f = tmp_path / "hangs.py"
    f.write_text(HANGS)
    env = load_env(f"{f}:{cls}")()
    # within the limit: the answer comes back, computed on the helper thread
    assert step_all([env, env], ["ok", "ok"], timeout_s=5)[0].info == {"on": 1.0}
    assert step_all([env], ["ok"])[0].info == {"on": 0.0}  # no limit: on the caller's thread
    t0 = time.monotonic()
    with pytest.raises(EnvError, match=rf"env.path: {what} did not return within 0.3 s \(env.step_timeout_s\)"):
        step_all([env, env], ["ok", "hang"], timeout_s=0.3)
    assert time.monotonic() - t0 < 3
    # the stuck thread is left behind; the next call gets a new one, and a TimeoutError of the env's own is its own
    assert step_all([env], ["ok"], timeout_s=5)[0].reward == 1.0
    with pytest.raises(EnvError, match=rf"env.path: {what} raised: TimeoutError: the user's own TimeoutError at {f}"):
        step_all([env], ["boom"], timeout_s=5)


DOCUMENTED_TOOLS = '''
def add(a: int, b: int = 1) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b

def shout(text, times: int | float = 2, *rest):
    return text.upper()
'''
TOOLS_TEMPLATE = ("{% if tools %}[tools]{% for t in tools %}{{ t.function.name }}({{ t.function.parameters.properties "
                  "| list | join(',') }});{% endfor %}<eos>\n{% endif %}{% for m in messages %}[{{ m.role }}]"
                  "{{ m.content }}<eos>\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def test_tool_schemas_from_docstrings_or_else_from_signatures(tmp_path):
    from dapo.envs.tools import tool_schemas

    (tmp_path / "t.py").write_text(DOCUMENTED_TOOLS)
    assert tool_schemas(tmp_path / "t.py") == [
        {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer", "description": "the first"},
                                             "b": {"type": "integer", "description": "the second"}},
            "required": ["a"]}}},
        {"type": "function", "function": {"name": "shout", "description": "", "parameters": {  # no docstring
            "type": "object", "properties": {"text": {}, "times": {"type": ["integer", "number"]}},
            "required": ["text"]}}},
    ]


@pytest.mark.parametrize("describe, renders_tools", [(True, True), (False, True), (True, False)])
def test_a_chat_template_that_renders_tools_lists_them_in_the_prompts(tmp_path, tiny_model_dir, describe,
                                                                      renders_tools):
    import json

    from dapo.config import load_config
    from dapo.model import load_tokenizer
    from dapo.problems import load_problems

    (tmp_path / "t.py").write_text(DOCUMENTED_TOOLS)
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=[f"model.path={tiny_model_dir}", f"data.path={tmp_path / 'd.jsonl'}",
                                 f"env.tools={tmp_path / 't.py'}", "data.template=chat",
                                 f"env.describe_tools={str(describe).lower()}", "data.max_prompt_len=200"])
    tok = load_tokenizer(cfg.model, cfg.model.path)
    tok.chat_template = TOOLS_TEMPLATE if renders_tools else TOOLS_TEMPLATE.split("{% endif %}", 1)[1]
    said = []
    probs = load_problems(cfg, tok, said.append)
    item = probs.eval_items[0]
    listed = describe and renders_tools
    text = ("[tools]add(a,b);shout(text,times);<eos>\n" if listed else "") + f"[user]{item.example.prompt}<eos>\n[assistant]"
    assert item.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ("tools described to the chat template (env.describe_tools): add, shout" in said) == listed
    assert any("does not render tools, so the prompts do not list add, shout" in s for s in said) == (
        describe and not renders_tools)
