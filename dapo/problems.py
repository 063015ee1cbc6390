"""What a run learns from and is judged on: tokenised prompts, held-out problems and the verifier.

``load_problems(cfg, tokenizer)`` is the one place that turns ``data.*``, ``eval.*`` and ``reward.*`` into
prompts a model continues and a score function, for ``dapo train``, ``dapo eval`` and ``dapo sft`` alike:

- a built-in task (``data.path`` empty): its own prompt format and exact verifier; training prompts from
  its endless stream, held-out prompts from its reserved slice of the prompt space;
- a file: rows read by ``dapo.data.files``, rendered by a template (``choose_template``), tokenised and
  length-fitted; held-out problems from ``eval.path`` or a seeded tenth of the file; scored by
  ``reward.fn`` (the DAPO math verifier by default) through a ``RewardRunner``.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dapo.config import Config
from dapo.data.example import Example
from dapo.items import PromptItem, PromptStream, ScoreFn, ScoreIds
from dapo.rewards.runner import BAD_TYPE, ERRORS, TIMEOUTS, RewardBatch

Encode = Callable[[Example], list[int]]
TEMPLATE_FILE = "prompt_template.json"
"""Written into a model directory by ``dapo sft`` and into every checkpoint: the prompt template the model was
trained with, which ``data.template=auto`` then keeps (a model warmed up on bare prompts must not be trained
or evaluated on prompts wrapped in an instruction it never saw)."""


# --------------------------------------------------------------------------------------------------
# prompt streams


class TaskPromptStream:
    """A built-in task's endless training stream (``dapo.data.tasks.TrainStream``), tokenised."""

    def __init__(self, stream: Any, encode: Encode):
        self.stream, self.encode = stream, encode

    def take(self, n: int) -> list[PromptItem]:
        start = self.stream.cursor
        return [PromptItem(start + k, ex, self.encode(ex)) for k, ex in enumerate(self.stream.take(n))]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "task", **self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind", "task") != "task":
            raise ValueError(_other_kind(state, f"the built-in task {self.stream.task.name!r}"))
        self.stream.load_state_dict({k: v for k, v in state.items() if k != "kind"})


def _other_kind(state: dict[str, Any], this: str) -> str:
    """A data cursor saved by the other kind of stream (a file's, a task's), in words."""
    saved = (f"a prompt file's {state.get('size')} prompts" if state.get("kind") == "list"
             else f"the built-in task {state.get('task')!r}")
    return (f"data cursor was saved for {saved}, and this run reads {this}: resume with the run's own data.path / "
            f"data.task (its config.yaml), or start a new run from the checkpoint (model.path=...)")


class ListPromptStream:
    """A finite dataset served in epochs, reshuffled each epoch from (seed, epoch); prompts are
    tokenised once up front (the dataset's prompt-length filter already ran)."""

    def __init__(self, examples: Sequence[Example], ids: Sequence[list[int]], seed: int, shuffle: bool = True):
        if not examples:
            raise ValueError("the training dataset is empty")
        self.examples, self.ids, self.seed, self.shuffle = list(examples), list(ids), seed, shuffle
        self.cursor = 0  # number of prompts served so far, over all epochs
        self._order_cache: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[PromptItem]:
        out = []
        N = len(self.examples)
        for _ in range(n):
            epoch, pos = divmod(self.cursor, N)
            if self._order_cache[0] != epoch:
                self._order_cache = (epoch, self._order(epoch))
            i = self._order_cache[1][pos]
            out.append(PromptItem(self.cursor, self.examples[i], self.ids[i]))
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "list", "cursor": self.cursor, "seed": self.seed, "size": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "list":
            raise ValueError(_other_kind(state, f"a prompt file's {len(self.examples)} prompts"))
        if state.get("size") != len(self.examples) or state.get("seed") != self.seed:
            raise ValueError(
                f"data cursor was saved for {state.get('size')} prompts with seed {state.get('seed')}, "
                f"this run has {len(self.examples)} with seed {self.seed}: resume with the run's own data.path (and its "
                f"data.* filters) and seed (its config.yaml), or start a new run from the checkpoint (model.path=...)"
            )
        self.cursor = int(state["cursor"])


# --------------------------------------------------------------------------------------------------
# templates and encoding


def encode_prompts(
    examples: Sequence[Example], template: str, tokenizer: Any, max_len: int, long_prompts: str = "drop",
    tools: list[dict[str, Any]] | None = None, log: Callable[[str], None] | None = None, where: str = "",
) -> tuple[list[Example], list[list[int]], int, int]:
    """Render, tokenise and length-fit prompts: (kept examples, their ids, n dropped, n truncated). With ``log``,
    prompts holding characters the tokenizer encodes as its unknown token are counted there (``where``: the file).

    A chat template already writes the special tokens it wants, so those prompts are tokenised without
    adding more. ``tools``: the tools' JSON schemas, given to a chat template (``render_prompt``); None: each
    row's own ``tools`` column, where it has one.
    """
    from dapo.data.templates import fit_prompts, render_prompt

    texts = [render_prompt(e, template, tokenizer, tools or row_tools(e)) for e in examples]
    ids = [tokenizer(t, add_special_tokens=not template.endswith("chat"))["input_ids"] for t in texts]
    if log is not None:
        unknown = unknown_characters(texts, ids, tokenizer)
        if unknown:
            n, chars = unknown
            log(f"warning: {where}: {n} of {len(texts)} prompts hold characters the tokenizer does not know, which "
                f"it encodes as {tokenizer.unk_token} (e.g. {', '.join(repr(c) for c in chars)}): the model never sees "
                f"them; a tokenizer that covers them (model.tokenizer), or dapo sft --data on this file (its tokenizer "
                f"is built from the file's characters), does")
    kept, fitted, n_drop, n_trunc = fit_prompts(ids, max_len, long_prompts)
    return [examples[i] for i in kept], fitted, n_drop, n_trunc


def unknown_characters(texts: Sequence[str], ids: Sequence[list[int]], tokenizer: Any,
                       show: int = 5) -> tuple[int, list[str]] | None:
    """(how many of ``texts`` encode to the tokenizer's unknown token somewhere, up to ``show`` of the characters
    that do), or None when none does or the tokenizer has no unknown token (byte-level BPE covers every byte)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    hit = [t for t, x in zip(texts, ids) if unk in x]
    if not hit:
        return None
    chars: list[str] = []
    for text in hit[:20]:
        for c in dict.fromkeys(text):
            if c not in chars and unk in tokenizer(c, add_special_tokens=False)["input_ids"]:
                chars.append(c)
                if len(chars) == show:
                    return len(hit), chars
    return len(hit), chars


def row_tools(example: Example) -> list[dict[str, Any]] | None:
    """A row's ``tools`` column (tool schemas, as a list or as its JSON text, as TRL's and verl's tool-use data
    hold them; ``dapo.data.files`` checked its form), for the chat template; None when it has none."""
    tools = example.fields.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    return tools or None


def described_tools(cfg: Config, template: str, tokenizer: Any,
                    log: Callable[[str], None]) -> list[dict[str, Any]] | None:
    """The tools' JSON schemas for the chat template (``env.describe_tools``), when prompts go through one
    with ``env.tools``; None otherwise. Says which, and when the template has no place for them."""
    e = cfg.env
    if not (e.tools and e.describe_tools and template.endswith("chat") and getattr(tokenizer, "chat_template", None)):
        return None
    from dapo.envs.tools import tool_schemas

    schemas = tool_schemas(e.tools)
    names = ", ".join(s["function"]["name"] for s in schemas)
    if "tools" not in str(tokenizer.chat_template):
        log(f"env.describe_tools: the tokenizer's chat template does not render tools, so the prompts do not list "
            f"{names}: say in them which tools exist")
        return None
    log(f"tools described to the chat template (env.describe_tools): {names}")
    return schemas


def response_vote(response: str) -> str | None:
    """What a response votes for in maj@k under a user's reward, whose answer format dapo cannot know: the
    math answer or the text after the last ':' where there is one (``vote_answer``), else the whole response,
    whitespace-normalised (identical answers vote together); None only for an empty response.

    >>> response_vote("so\\nAnswer: 12"), response_vote(" 0 6  6\\n"), response_vote("  ")
    ('12', '0 6 6', None)
    """
    from dapo.rewards.math import vote_answer

    return vote_answer(response) or (" ".join(response.split()) or None)


def reward_spec(cfg: Config) -> str:
    """The verifier files are scored with: ``reward.fn``, or the DAPO math verifier for ``auto``."""
    return "math" if cfg.reward.fn == "auto" else cfg.reward.fn


def as_file_template(template: str) -> str:
    """The file template equal to ``template``: a built-in task's own format ("task") is its prompts' bare
    text, which is ``none`` (the demo's character tokenizer adds no special tokens either way)."""
    return "none" if template == "task" else template


def saved_template(model_path: str) -> str | None:
    """The template the model at ``model_path`` was trained with (``TEMPLATE_FILE``), if it says; a base or
    checkpoint of a built-in task written before this rule recorded "task", read as ``none``."""
    info = Path(model_path) / TEMPLATE_FILE if model_path else None
    if info is None or not info.is_file():
        return None
    try:
        saved = json.loads(info.read_text(encoding="utf-8")).get("template")
    except (OSError, ValueError, AttributeError):
        return None
    return as_file_template(saved) if isinstance(saved, str) and saved else None


def save_template(model_dir: str | Path, template: str) -> None:
    """Record in ``model_dir`` the prompt template its model was trained with, as a template a file's
    prompts can be rendered with (so ``data.template=auto`` on any file understands it)."""
    text = json.dumps({"template": as_file_template(template)}) + "\n"
    (Path(model_dir) / TEMPLATE_FILE).write_text(text, encoding="utf-8")


def choose_template(cfg: Config, tokenizer: Any, answers: bool = True, model_path: str | None = None) -> tuple[str, str]:
    """(template, why) for a file's prompts: ``data.template``, or for ``auto``: the template the model was
    trained with (``dapo sft``, a checkpoint; ``model_path``, else ``model.path``: the model the run loads, the
    demo base or a checkpoint resumed from included); else with the math reward ``dapo_math`` (``+chat`` when the tokenizer has a
    chat template); with any other reward, or rows without answers and no reward (supervised data), the chat
    template when there is one, else the prompt as it is."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    if cfg.data.template != "auto":
        t = cfg.data.template
        if t.endswith("chat") and not chat:  # render_prompt would fall back to the plain text, unasked
            whose = cfg.model.tokenizer or cfg.model.path or "the demo model"
            raise ValueError(f"data.template={t!r} renders prompts with the tokenizer's chat template, and the "
                             f"tokenizer of {whose} has none: set data.template="
                             f"{t.removesuffix('chat').removesuffix('+') or 'none'} (or auto), or use a tokenizer "
                             f"with a chat template (model.tokenizer)")
        return t, "data.template"
    path = model_path or cfg.model.path
    saved = saved_template(path)
    if saved:
        return saved, f"auto: the template {path} was trained with (its {TEMPLATE_FILE})"
    if not answers and cfg.reward.fn == "auto":
        return ("chat" if chat else "none"), "auto: no reward and rows without answers, " + (
            "the tokenizer's chat template" if chat else "and the tokenizer has no chat template: the prompt as it is")
    if reward_spec(cfg) == "math":
        return ("dapo_math+chat" if chat else "dapo_math"), "auto: the math reward" + (
            ", and the tokenizer's chat template" if chat else "; the tokenizer has no chat template")
    return ("chat" if chat else "none"), f"auto: reward {cfg.reward.fn}, " + (
        "the tokenizer's chat template" if chat else "and the tokenizer has no chat template: the prompt as it is")


# --------------------------------------------------------------------------------------------------
# scoring


def task_score_fn(task: Any) -> ScoreFn:
    """A built-in task's exact verifier as a ``ScoreFn`` (it cannot fail: no errors to report)."""

    def score_fn(texts: list[str], examples: list[Example]) -> RewardBatch:
        out = [task.score(t, e.answer) for t, e in zip(texts, examples)]
        return RewardBatch([s for s, _ in out], [c for _, c in out], {ERRORS: 0.0, TIMEOUTS: 0.0, BAD_TYPE: 0.0},
                           [], [""] * len(out))

    return score_fn


def runner_score_fn(runner: Any) -> ScoreFn:
    """A ``RewardRunner`` as a ``ScoreFn``: each row's other fields (and its data_source) reach the function."""

    def score_fn(texts: list[str], examples: list[Example]) -> RewardBatch:
        return runner.score(texts, *_reward_inputs(examples))

    return score_fn


def _reward_inputs(examples: list[Example]) -> tuple[list, list[dict[str, Any]]]:
    """What a reward function gets beside each response: the ground truths, and each row's other fields."""
    return [e.answer for e in examples], [dict(e.fields, data_source=e.data_source) for e in examples]


class ResponseDecoder:
    """Responses' token ids -> their text, exactly as ``tokenizer.decode(ids, skip_special_tokens=True)`` gives it
    (special tokens such as a chat template's markers dropped), for a whole batch at once.

    ``tokenizer.decode`` per response costs a Python wrapper call and a list per response, and transformers'
    ``batch_decode`` is the same loop. A stock fast tokenizer that does no clean-up of spaces decodes with its Rust
    tokenizer directly: ``decode_batch``, one call for the batch, spread over the CPU's cores; ``json`` is then that
    tokenizer's serialisation, which reward workers load to decode in their own processes (``RewardRunner``'s
    ``decoder``). Any other tokenizer (a slow one, a subclass with its own decode, clean-up on) keeps its own
    ``decode`` per response, and ``json`` is None: the driver decodes."""

    def __init__(self, tokenizer: Any):
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        self.tokenizer = tokenizer
        self.backend = None
        try:
            from transformers import TokenizersBackend
        except ImportError:  # transformers 4: the fast class
            from transformers import PreTrainedTokenizerFast as TokenizersBackend
        cls = type(tokenizer)
        if (isinstance(tokenizer, TokenizersBackend) and cls.decode is PreTrainedTokenizerBase.decode
                and cls._decode is TokenizersBackend._decode and not getattr(tokenizer, "clean_up_tokenization_spaces", True)):
            self.backend = tokenizer.backend_tokenizer
        self.json: str | None = self.backend.to_str() if self.backend is not None else None

    def decode(self, ids: Sequence[Any]) -> list[str]:
        """The texts of ``ids`` (1-D integer tensors or lists), (N,)."""
        lists = [x.tolist() if hasattr(x, "tolist") else list(x) for x in ids]
        if self.backend is not None:
            return self.backend.decode_batch(lists, skip_special_tokens=True)
        return [self.tokenizer.decode(x, skip_special_tokens=True) for x in lists]

    @staticmethod
    def pack(ids: Sequence[Any]) -> list[Any]:
        """``ids`` (1-D integer tensors) as int32 numpy arrays, what a reward worker decodes: half the bytes of
        int64 through the pipe, and one buffer each to pickle instead of a Python int per token."""
        return [x.to(torch.int32).numpy() for x in ids]


def runner_score_ids(runner: Any, decoder: ResponseDecoder) -> ScoreIds:
    """A ``RewardRunner`` scoring token ids: decoded in its workers when it has them and ``decoder`` can go there
    (``runner.decodes``), else decoded here in one batch; then as ``runner_score_fn``."""
    decoded_here = text_score_ids(runner_score_fn(runner), decoder)

    def score_ids(ids: Sequence[Any], examples: list[Example]) -> RewardBatch:
        if runner.decodes:
            return runner.score_ids(decoder.pack(ids), *_reward_inputs(examples))
        return decoded_here(ids, examples)

    return score_ids


def text_score_ids(score_fn: ScoreFn, decoder: ResponseDecoder) -> ScoreIds:
    """A ``ScoreFn`` scoring token ids: decoded here in one batch."""

    def score_ids(ids: Sequence[Any], examples: list[Example]) -> RewardBatch:
        return score_fn(decoder.decode(ids), examples)

    return score_ids


# --------------------------------------------------------------------------------------------------
# the whole set


@dataclass
class Problems:
    """Prompts to train on, held-out problems and their verifier, as one config describes them."""

    eval_items: list[PromptItem]
    score_fn: ScoreFn
    template: str
    """The prompt template in use ("task" for a built-in task's own format)."""
    extract: Callable[[str], "str | None"]
    """A response's final answer, for majority votes and sample logs."""
    stream: PromptStream | None = None
    """The training prompts (None when loaded for evaluation only)."""
    score_ids: ScoreIds | None = None
    """``score_fn`` on token ids (what training's sampler calls): decoded in the reward workers or in one batch."""
    closers: list[Callable[[], None]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    """The ``env.tools`` schemas the chat template is given (``described_tools``); None: each row's own ``tools``
    column where it has one (``row_tools``)."""

    def prompt_lengths(self) -> list[int]:
        """Tokens of each prompt, training and held-out (a built-in task's stream is not counted: its prompts
        are short by construction)."""
        ids = [it.prompt_ids for it in self.eval_items] + list(getattr(self.stream, "ids", None) or [])
        return [len(x) for x in ids]

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers = []


def load_problems(cfg: Config, tokenizer: Any, log: Callable[[str], None] = print, *, train: bool = True,
                  limit: int = 0, require_answer: bool = True, held_out: bool = False,
                  response_key: str | None = None, model_path: str | None = None) -> Problems:
    """The problems of ``cfg``. ``train=False`` (``dapo eval``): every row of ``data.path`` (or ``eval.size``
    held-out prompts of the task) is a problem to evaluate, the first ``limit`` when it is set; with
    ``held_out`` only the rows a training run on ``data.path`` holds out (the problems of its before/after).
    ``require_answer=False`` (``dapo sft``): rows without a ground truth are kept (``Example.answer`` None);
    ``response_key`` (``dapo sft``): a training row without a response there or an assistant turn is a bad
    row (``data.bad_rows``). ``model_path``: the model the run loads when it is not ``model.path`` (the demo
    base, a checkpoint resumed from), whose recorded template ``data.template=auto`` takes."""
    if cfg.data.path:
        return _file_problems(cfg, tokenizer, log, train, limit, require_answer, held_out, response_key, model_path)
    return _task_problems(cfg, tokenizer, train, limit)


def _task_problems(cfg: Config, tokenizer: Any, train: bool, limit: int) -> Problems:
    from dapo.data.tasks import TrainStream, eval_examples, get_task

    try:
        task = get_task(cfg.data.task)
    except ValueError as e:
        raise ValueError(f"data.task: {e}") from None

    def encode(ex: Example) -> list[int]:
        return tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]

    held_out = eval_examples(task, cfg.eval_seed, limit or cfg.eval.size)
    items = [PromptItem(-1 - i, ex, encode(ex)) for i, ex in enumerate(held_out)]
    stream = TaskPromptStream(TrainStream(task, cfg.seed), encode) if train else None
    score_fn = task_score_fn(task)
    return Problems(items, score_fn, "task", task.extract_answer, stream, text_score_ids(score_fn, ResponseDecoder(tokenizer)))


def _file_problems(cfg: Config, tokenizer: Any, log: Callable[[str], None], train: bool, limit: int,
                   require_answer: bool, held_out: bool, response_key: str | None = None,
                   model_path: str | None = None) -> Problems:
    from dapo.data.files import load_examples
    from dapo.rewards import RewardRunner
    from dapo.rewards.math import vote_answer
    from dapo.rewards.runner import check_reward_call

    d = cfg.data

    def read(path: str, n: int = 0, response: str | None = None) -> list[Example]:
        exs, stats = load_examples(path, d.prompt_key, d.answer_key, bad_rows=d.bad_rows, dedup=d.dedup,
                                   require_answer=require_answer, response_key=response)
        log(f"{path}: {stats}")
        return exs[:n] if n else exs

    def encode(path: str, exs: list[Example]) -> tuple[list[Example], list[list[int]]]:
        exs, fitted, n_drop, n_trunc = encode_prompts(exs, template, tokenizer, d.max_prompt_len, d.long_prompts,
                                                      tools, log, path)
        if n_drop or n_trunc:
            log(f"{path}: {n_drop} prompts longer than data.max_prompt_len={d.max_prompt_len} dropped, {n_trunc} truncated")
        if not exs:
            raise ValueError(f"{path}: no prompts left after the length filter (data.max_prompt_len={d.max_prompt_len})")
        return exs, fitted

    rows = read(d.path, 0 if (train or held_out) else limit, response_key)
    template, why = choose_template(cfg, tokenizer, answers=all(e.answer is not None for e in rows),
                                    model_path=model_path)
    log(f"prompt template: {template} ({why})")
    tools = described_tools(cfg, template, tokenizer, log)
    if not train and not held_out:
        ev, ev_ids = encode(d.path, rows)
        exs, ids = [], []
    elif cfg.eval.path and train:
        exs, ids = encode(d.path, rows)
        ev, ev_ids = encode(cfg.eval.path, read(cfg.eval.path, cfg.eval.size))
    else:  # hold out a seeded slice of the training file (at most a tenth of it)
        exs, ids = encode(d.path, rows)
        order = list(range(len(exs)))
        random.Random(f"{cfg.eval_seed}/holdout").shuffle(order)
        held = set(order[: min(cfg.eval.size, len(exs) // 10)])
        ev, ev_ids = [exs[i] for i in order if i in held], [ids[i] for i in order if i in held]
        exs, ids = [e for i, e in enumerate(exs) if i not in held], [x for i, x in enumerate(ids) if i not in held]
        if not train:
            ev, ev_ids, exs, ids = ev[: limit or None], ev_ids[: limit or None], [], []
    rw = cfg.reward
    check_reward_call(reward_spec(cfg), _reward_inputs(rows)[1], d.path)
    if cfg.eval.path and train:
        check_reward_call(reward_spec(cfg), _reward_inputs(ev)[1], cfg.eval.path)
    decoder = ResponseDecoder(tokenizer)
    runner = RewardRunner(reward_spec(cfg), workers=rw.workers, timeout_s=rw.timeout_s, memory_mb=rw.memory_mb or None,
                          decoder=decoder.json if train else None)
    items = [PromptItem(-1 - i, e, x) for i, (e, x) in enumerate(zip(ev, ev_ids))]
    stream = ListPromptStream(exs, ids, cfg.seed, d.shuffle) if train else None
    extract = vote_answer if reward_spec(cfg) == "math" else response_vote  # what maj@k votes on
    return Problems(items, runner_score_fn(runner), template, extract, stream, runner_score_ids(runner, decoder),
                    [runner.close], tools)
