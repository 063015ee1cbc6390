"""Prompt templates: how an example's prompt becomes the text the policy continues, and prompt lengths.

Templates (``data.template``):

    none        the prompt as it is (chat messages: the user turns' contents, joined)
    dapo_math   the DAPO-Math-17k instruction around the problem, asking for a last line "Answer: ..."
                (DAPO-Math-17k prompts already carry it, and it is never added twice)
    boxed       the problem, then "put your final answer within \\boxed{}"
    chat        the tokenizer's chat template with a generation prompt; plain text when it has none

``dapo_math+chat`` and ``boxed+chat`` add the instruction to the last user turn, then apply the chat
template: what an instruct model should see.
"""
from __future__ import annotations

from typing import Any, Sequence

from dapo.data.example import Example

DAPO_MATH_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_MATH_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
BOXED_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("none", "dapo_math", "boxed", "chat", "dapo_math+chat", "boxed+chat")

_DAPO_MARK = "The last line of your response should be of the form Answer:"

Messages = list[dict[str, Any]]


def prompt_text(prompt: str | Messages) -> str:
    """The text of a prompt: a string as is; chat messages' user contents joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(m["content"] for m in prompt if m.get("role") == "user")


def add_instruction(problem: str, template: str) -> str:
    """``problem`` with the ``dapo_math`` or ``boxed`` instruction, unless it already has it.

    >>> add_instruction("What is 2+3?", "boxed")
    'What is 2+3?\\n\\nPlease reason step by step, and put your final answer within \\\\boxed{}.'
    >>> p = add_instruction("What is 2+3?", "dapo_math"); add_instruction(p, "dapo_math") == p
    True
    """
    if template == "dapo_math":
        return problem if _DAPO_MARK in problem else DAPO_MATH_PREFIX + problem + DAPO_MATH_SUFFIX
    if template == "boxed":
        return problem if "\\boxed{}" in problem else problem + BOXED_SUFFIX
    if template == "none":
        return problem
    raise ValueError(f"unknown instruction template {template!r}; valid: none, dapo_math, boxed")


def render_prompt(example: Example | str | Messages, template: str, tokenizer: Any = None,
                  tools: list[dict[str, Any]] | None = None) -> str:
    """The text given to the policy for one example; see the module docstring for ``template``.

    tokenizer: needed by the ``chat`` templates (any object with ``chat_template`` and
    ``apply_chat_template``, e.g. a transformers tokenizer). tools: JSON schemas given to the chat template
    (``apply_chat_template(tools=...)``, which lists them where it does, e.g. in Qwen2.5's system prompt).

    >>> render_prompt(Example([{"role": "user", "content": "What is 2+3?"}], "5"), "none")
    'What is 2+3?'
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")
    prompt = example.prompt if isinstance(example, Example) else example
    chat = template.endswith("chat")
    instruction = "none" if template == "chat" else template.removesuffix("+chat")
    if not chat:
        return add_instruction(prompt_text(prompt), instruction)
    if tokenizer is None:
        raise ValueError(f"template {template!r} needs a tokenizer (for its chat template)")
    messages = _with_instruction(_as_messages(prompt), instruction)
    if not getattr(tokenizer, "chat_template", None):
        return prompt_text(messages)  # a base model's tokenizer: plain text
    if tools:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def assistant_turns(messages: Messages, template: str, tokenizer: Any = None,
                    tools: list[dict[str, Any]] | None = None) -> list[tuple[str, str]]:
    """(prompt text, response text) for each assistant turn of a conversation that follows a user turn: the
    prompt rendered exactly as :func:`render_prompt` renders the conversation so far (what ``dapo train``
    shows the model), the response as the model should continue it.

    With a chat template the response is what the template writes after the generation prompt for that
    turn: the content and the template's end-of-turn marker (``<|im_end|>`` in ChatML). Without one (or
    when the template's rendering of the turn does not start with its generation prompt), the content alone.
    Earlier turns stay in the prompt as the template writes them; without a chat template only the user
    turns are kept (the ``none`` rendering). A tool-use conversation (assistant turns with ``tool_calls``,
    ``tool`` turns with their results) needs a chat template to write the calls; ``tools``, the conversation's
    tool schemas, go to the template with every rendering (``render_prompt``).

    >>> assistant_turns([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "none")
    [('2+2?', '4')]
    """
    out = []
    chat = template.endswith("chat") and bool(getattr(tokenizer, "chat_template", None))
    instruction = "none" if template == "chat" else template.removesuffix("+chat")
    for k, m in enumerate(messages):
        if m.get("role") != "assistant" or not any(x.get("role") == "user" for x in messages[:k]):
            continue
        if not chat and m.get("content") is None:
            raise ValueError("an assistant turn with tool_calls and no content needs a chat template to write "
                             "the calls: use a tokenizer with one and data.template=chat")
        prompt, response = render_prompt(messages[:k], template, tokenizer, tools), m.get("content")
        if chat:
            extra = {"tools": tools} if tools else {}
            whole = tokenizer.apply_chat_template(_with_instruction(_as_messages(messages[: k + 1]), instruction),
                                                  tokenize=False, **extra)
            if whole.startswith(prompt) and len(whole) > len(prompt):
                response = whole[len(prompt):]
            elif response is None:
                raise ValueError("the chat template's rendering of an assistant turn with tool_calls does not "
                                 "continue its rendering of the conversation before it")
        out.append((prompt, response))
    return out


def _as_messages(prompt: str | Messages) -> Messages:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _with_instruction(messages: Messages, instruction: str) -> Messages:
    """The instruction added to the last user turn."""
    for m in reversed(messages):
        if m.get("role") == "user":
            m["content"] = add_instruction(m["content"], instruction)
            break
    return messages


def fit_prompts(
    token_id_lists: Sequence[Sequence[int]], max_len: int, mode: str = "drop"
) -> tuple[list[int], list[list[int]], int, int]:
    """Make prompts fit in ``max_len`` tokens.

    token_id_lists: (N,) prompts as token ids. mode: ``drop`` leaves out longer prompts; ``truncate``
    keeps their last ``max_len`` tokens (the end of a prompt holds the question and the instruction).
    Returns (kept_indices, fitted_ids, n_dropped, n_truncated); ``fitted_ids[j]`` is the prompt
    ``kept_indices[j]``.

    >>> fit_prompts([[1, 2], [1, 2, 3, 4], [5]], max_len=3)
    ([0, 2], [[1, 2], [5]], 1, 0)
    >>> fit_prompts([[1, 2], [1, 2, 3, 4], [5]], max_len=3, mode="truncate")
    ([0, 1, 2], [[1, 2], [2, 3, 4], [5]], 0, 1)
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if mode not in ("drop", "truncate"):
        raise ValueError(f"mode must be 'drop' or 'truncate', got {mode!r}")
    kept, fitted, dropped, truncated = [], [], 0, 0
    for i, ids in enumerate(token_id_lists):
        ids = list(ids)
        if len(ids) > max_len:
            if mode == "drop":
                dropped += 1
                continue
            ids = ids[-max_len:]
            truncated += 1
        kept.append(i)
        fitted.append(ids)
    return kept, fitted, dropped, truncated
