"""Environments for multi-turn rollouts: the model acts, the environment answers (``--env``, ``--tools``).

    from dapo.envs import StepResult, ToolEnv, ToolRunner, parse_tool_calls
"""
from dapo.envs.base import Environment, EnvError, StepResult, load_env, row_of, step_all
from dapo.envs.tools import ToolCall, ToolEnv, ToolRunner, call_tool, load_tools, parse_tool_calls

__all__ = ["Environment", "EnvError", "StepResult", "ToolCall", "ToolEnv", "ToolRunner", "call_tool", "load_env",
           "load_tools", "parse_tool_calls", "row_of", "step_all"]
