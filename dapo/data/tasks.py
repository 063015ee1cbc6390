"""Built-in synthetic tasks with exact verifiers: the prompts of the ``dapo train`` demo.

A task makes examples (a prompt and its ground truth), scores a response exactly (+1 right, -1 wrong),
and writes the worked response that the supervised warm-up (``dapo.warmup``) imitates.

Held-out prompts are kept apart by a fixed partition of the prompt space, not by a list: a prompt is
held out when a hash of its text falls in 1/16 of the hash range (:func:`is_heldout`). Training streams
skip held-out prompts, evaluation sets draw only from them, so the split holds for every seed, every
evaluation size, the warm-up and the RL run alike, and a cached base model never trained on any prompt
that a later run evaluates on. Training example ``i`` depends only on (task, seed, i), so a resumed
run continues from a data cursor.

>>> task = get_task("addition")
>>> task.sft_response(Example("357+68=", "425"))
'15,12,04:425'
>>> task.score("15,12,04:425", "425")
(1.0, True)
"""
from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from typing import Iterator

from dapo.data.example import Example

HELDOUT_MOD = 16
"""One prompt in HELDOUT_MOD (by hash) is reserved for evaluation and never trained on."""


class Task(ABC):
    """A prompt generator with an exact verifier and a worked response format."""

    name: str = ""
    """Registry key (``data.task`` in the config)."""
    description: str = ""
    """One line for ``dapo train --help`` and reports."""
    max_response_len: int = 0
    """Characters in the longest worked response (eos excluded): a floor for ``rollout.max_new_tokens``. With
    tool calls, the model's characters over all its turns, each turn's eos but the last's counted."""
    sft_overrides: dict = {}
    """Fields of ``dapo.config.SFTConfig`` that differ for this task's demo base model."""
    train_overrides: dict = {}
    """Config keys (dotted) a run on this task defaults to: over the preset, under a YAML file and ``key=value``
    (``dapo.config.load_config``; not for a run on a file)."""
    tools: str = ""
    """The ``env.tools`` its worked responses call (``calculator``); the warm-up's probe answers them. "" = none."""

    @property
    def family(self) -> str:
        """Seeds the prompt streams and held-out sets: tasks of one family (variants that differ only in
        their warm-up data) draw exactly the same prompts."""
        return self.name

    @abstractmethod
    def make_example(self, rng: random.Random) -> Example:
        """One example drawn from the task's distribution, using only ``rng``."""

    @abstractmethod
    def score(self, response: str, answer: str) -> tuple[float, bool]:
        """(+1.0, True) when ``response`` is correct for ground truth ``answer``, else (-1.0, False)."""

    @abstractmethod
    def sft_response(self, example: Example) -> str:
        """The worked response to imitate in the warm-up, without eos."""

    def sft_turns(self, example: Example) -> list[tuple[str, bool]]:
        """The worked response as (text, the model's) segments: the model's turns, each to be followed by eos,
        and between them what the tools answer (trained on as context only). Default: one turn."""
        return [(self.sft_response(example), True)]

    def extract_answer(self, response: str) -> str | None:
        """The final answer a response commits to (for maj@k and sample logs); None if it gives none."""
        return answer_after_colon(response)


# --------------------------------------------------------------------------------------------------
# addition: the default demo task


def worked_sum(*terms: int) -> str:
    """Column addition of non-negative terms, least significant column first, then ':' and the sum.

    Each column is written as two digits, the carry out then the sum digit, columns joined by ','.
    With up to 10 terms every carry is a single digit.

    >>> worked_sum(357, 68)
    '15,12,04:425'
    >>> worked_sum(9, 1)
    '10:10'
    >>> worked_sum(99, 99, 99)
    '27,29:297'
    """
    assert 1 <= len(terms) <= 10 and min(terms) >= 0, terms
    rev = [str(t)[::-1] for t in terms]
    carry, cols = 0, []
    for i in range(max(len(r) for r in rev)):
        s = sum(int(r[i]) for r in rev if i < len(r)) + carry
        carry, digit = divmod(s, 10)
        cols.append(f"{carry}{digit}")
    return ",".join(cols) + ":" + str(sum(terms))


def answer_after_colon(response: str) -> str | None:
    """The text after the last ':' with surrounding whitespace stripped; None when there is no ':'."""
    head, sep, tail = response.rpartition(":")
    return tail.strip() if sep else None


class Addition(Task):
    """``357+68=`` -> ``15,12,04:425``: a sum of two numbers below 10**max_digits, worked column by column.

    Operands are uniform over 0..999 (so 1-3 digits, mostly 3). The reward reads only the text after
    the last ':', so the model is free to get the columns wrong; the worked columns are what make the
    sum learnable for a 1M-parameter model. Uniform values rather than uniform digit counts: with
    mostly 3+3-digit prompts the columns line up the same way in most examples, and the warm-up learns
    much faster (sampled accuracy at step 250, each on its own held-out prompts: 32% vs 9%).
    """

    name = "addition"
    description = "a+b with operands 0-999; worked answer: carry+digit per column, then ':' and the sum"

    def __init__(self, max_digits: int = 3):
        self.max_digits = max_digits
        # max_digits columns of "cd," minus the last ',' then ':' and a sum of up to max_digits + 1 digits
        self.max_response_len = 3 * max_digits - 1 + 1 + max_digits + 1

    def make_example(self, rng: random.Random) -> Example:
        a, b = rng.randrange(10**self.max_digits), rng.randrange(10**self.max_digits)
        return Example(prompt=f"{a}+{b}=", answer=str(a + b), data_source=self.name, fields={"a": a, "b": b})

    def score(self, response: str, answer: str) -> tuple[float, bool]:
        ok = answer_after_colon(response) == answer.strip()
        return (1.0, True) if ok else (-1.0, False)

    def sft_response(self, example: Example) -> str:
        assert isinstance(example.prompt, str) and example.prompt.endswith("="), example.prompt
        a, b = (int(x) for x in example.prompt[:-1].split("+"))
        return worked_sum(a, b)


# --------------------------------------------------------------------------------------------------
# multisum: a task where the length of the reasoning matters

MULTISUM_SFT_STEPS = 1000


class MultiSum(Task):
    """``23+7+48=`` -> ``:78`` (direct) or ``18,07:78`` (worked): sums of several numbers.

    The warm-up imitates both styles, chosen per example (``fields["style"]``, direct with probability
    ``direct_frac``), so the base model starts by answering either way. A small model adds several
    numbers in one step less reliably than column by column, so worked answers are right more often:
    RL should shift the policy towards longer, worked responses, the demo's small version of
    reasoning growing longer during RL. With the defaults worked responses are 4-9 tokens and direct
    ones 2-4, so a ``rollout.max_new_tokens`` inside that range makes Soft Overlong Punishment and
    Overlong Filtering bite. Scoring is as for addition: the text after the last ':'.

    Harder than addition for the 1M-parameter demo model, so its warm-up runs a fixed
    ``MULTISUM_SFT_STEPS`` steps instead of stopping at 25%: measured on 2 cores, the mixed base reached
    39% sampled accuracy (41% of its answers worked, right 46% of the time; direct ones 34%) and the
    ``multisum_direct`` control 13% (never worked). ``dapo train data.task=multisum`` then turns 97% of
    the answers worked (length 6.7 -> 9.5 tokens) on an accuracy-only reward; see the README.
    """

    name = "multisum"
    description = "sums of 2-3 numbers 0-99; warm-up answers are direct (':78') or worked column by column"
    sft_overrides = {"target_accuracy": None, "max_steps": MULTISUM_SFT_STEPS, "min_steps": 100, "eval_every": 100}
    """A fixed warm-up length, the same for every variant, so bases differ only in their warm-up data."""

    def __init__(self, min_terms: int = 2, max_terms: int = 3, max_digits: int = 2, direct_frac: float = 0.5,
                 name: str = "multisum", description: str = ""):
        assert 2 <= min_terms <= max_terms <= 10 and 0.0 <= direct_frac <= 1.0
        self.min_terms, self.max_terms, self.max_digits = min_terms, max_terms, max_digits
        self.direct_frac = direct_frac
        self.name = name
        self.description = description or self.description
        sum_digits = len(str(max_terms * (10**max_digits - 1)))
        self.max_response_len = 3 * max_digits - 1 + 1 + sum_digits

    @property
    def family(self) -> str:
        return "multisum"  # every variant draws the same prompts

    def make_example(self, rng: random.Random) -> Example:
        terms = [rng.randrange(10**self.max_digits) for _ in range(rng.randint(self.min_terms, self.max_terms))]
        style = "direct" if rng.random() < self.direct_frac else "worked"
        return Example(prompt="+".join(map(str, terms)) + "=", answer=str(sum(terms)), data_source="multisum",
                       fields={"terms": terms, "style": style})

    def score(self, response: str, answer: str) -> tuple[float, bool]:
        ok = answer_after_colon(response) == answer.strip()
        return (1.0, True) if ok else (-1.0, False)

    def sft_response(self, example: Example) -> str:
        """The worked answer, or ':' and the sum when ``example.fields["style"] == "direct"``."""
        assert isinstance(example.prompt, str) and example.prompt.endswith("="), example.prompt
        terms = [int(x) for x in example.prompt[:-1].split("+")]
        if example.fields.get("style") == "direct":
            return ":" + str(sum(terms))
        return worked_sum(*terms)


# --------------------------------------------------------------------------------------------------
# mult: a task where a tool matters

MULT_SFT_STEPS = 600


class Multiply(Task):
    """``[mul] 347*86=`` -> a call, the calculator's answer, the product: products too long to do in one's head.

    Hard prompts multiply 3-4 digits by 2-3 digits; a share ``easy_frac`` multiplies by 1, 10 or 100, which
    a model can answer by copying (``data_source`` ``mult/hard`` or ``mult/easy``, so held-out metrics come
    per kind). The prompt names the tool (``[mul]``); ``dapo train data.task=mult --tools calculator`` lets the
    model call it, ``dapo train data.task=mult`` is the same task without it (a call is then a final answer
    without a product: wrong). The warm-up shows the call on a share ``tool_frac`` of its examples, chosen per
    example (``fields["style"]``)::

        tool:    <tool>mul(347,86)</tool><eos> <result>29842</result>\n :29842<eos>    (the result: the tool's)
        direct:  :29842<eos>

    and trains on the model's tokens only, not the result's. Scoring is the text after the last ':' of the
    model's last turn, as for addition. A call and its answer take up to 36 model tokens, more than the default
    ``rollout.max_new_tokens``: the task's own default is 48 (``train_overrides``).
    """

    name = "mult"
    description = ("[mul] a*b= with a of 3-4 digits, b of 2-3 (a quarter: b = 1, 10, 100); the calculator tool "
                   "(--tools calculator) multiplies")
    tools = "calculator"
    train_overrides = {"rollout.max_new_tokens": 48}  # a tool call and the answer after it: up to 36 model tokens
    sft_overrides = {"target_accuracy": None, "max_steps": MULT_SFT_STEPS, "min_steps": 100, "eval_every": 100}
    """A fixed warm-up length, so the base does not depend on when a noisy probe first crosses a target. Measured
    (probe with the tool, sampled): 0.03 at step 200, 0.14 at 300, 0.26 at 600; 754 s on one thread of a busy
    2-core machine. Its calls mis-copy an operand about half the time, which RL then improves."""

    def __init__(self, tool_frac: float = 0.5, easy_frac: float = 0.25):
        assert 0.0 <= tool_frac <= 1.0 and 0.0 <= easy_frac <= 1.0
        self.tool_frac, self.easy_frac = tool_frac, easy_frac
        # <tool>mul(9999,999)</tool> (26), its eos, then :9989001 (8)
        self.max_response_len = 26 + 1 + 8

    def make_example(self, rng: random.Random) -> Example:
        a = rng.randrange(100, 10_000)
        easy = rng.random() < self.easy_frac
        b = rng.choice((1, 10, 100)) if easy else rng.randrange(10, 1000)
        style = "tool" if rng.random() < self.tool_frac else "direct"
        return Example(prompt=f"[mul] {a}*{b}=", answer=str(a * b), data_source="mult/easy" if easy else "mult/hard",
                       fields={"a": a, "b": b, "style": style})

    def score(self, response: str, answer: str) -> tuple[float, bool]:
        ok = answer_after_colon(response) == answer.strip()
        return (1.0, True) if ok else (-1.0, False)

    def sft_turns(self, example: Example) -> list[tuple[str, bool]]:
        """[call, result, answer] for the tool style, [answer] for the direct one."""
        a, b = self._operands(example)
        if example.fields.get("style") != "tool":
            return [(f":{a * b}", True)]
        return [(f"<tool>mul({a},{b})</tool>", True), (f"<result>{a * b}</result>\n", False), (f":{a * b}", True)]

    def sft_response(self, example: Example) -> str:
        """The turns' text run together (without the eos that ends the call's turn)."""
        return "".join(text for text, _ in self.sft_turns(example))

    @staticmethod
    def _operands(example: Example) -> tuple[int, int]:
        assert isinstance(example.prompt, str) and example.prompt.startswith("[mul] "), example.prompt
        a, b = example.prompt[len("[mul] "):].rstrip("=").split("*")
        return int(a), int(b)


# --------------------------------------------------------------------------------------------------
# registry

TASKS: dict[str, Task] = {t.name: t for t in (
    Addition(),
    MultiSum(),
    MultiSum(direct_frac=1.0, name="multisum_direct",
             description="multisum prompts; the warm-up data has direct answers only (the length experiment's control)"),
    Multiply(),
)}
"""Built-in tasks by name. A new task is one class and one entry here."""


def get_task(name: str) -> Task:
    """The built-in task called ``name``; the error lists the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (valid: {', '.join(sorted(TASKS))})") from None


# --------------------------------------------------------------------------------------------------
# held-out split and the deterministic training stream


def is_heldout(prompt: str) -> bool:
    """True for the 1/HELDOUT_MOD of prompts reserved for evaluation (a fixed hash, same in every process)."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little")
    return h % HELDOUT_MOD == 0


def eval_examples(task: Task, seed: int, n: int, tag: str = "eval") -> list[Example]:
    """``n`` distinct held-out examples, deterministic in (task, seed, tag).

    Use another ``tag`` for a second held-out set drawn independently of the first (the warm-up's
    stopping probe uses ``"sft-probe"``, so choosing when to stop does not tune on the RL eval set).
    """
    rng = random.Random(f"{task.family}/{seed}/{tag}")  # str seeds hash with sha512: stable across processes
    out: list[Example] = []
    seen: set[str] = set()
    for _ in range(1000 + 200 * HELDOUT_MOD * n):
        if len(out) == n:
            return out
        ex = task.make_example(rng)
        if is_heldout(ex.prompt) and ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    if len(out) == n:
        return out
    raise ValueError(f"task {task.name!r}: found only {len(out)} distinct held-out prompts, {n} asked for")


def train_example(task: Task, seed: int, index: int) -> Example:
    """Training example number ``index`` of the stream seeded by ``seed``; never a held-out prompt."""
    rng = random.Random(f"{task.family}/{seed}/train/{index}")
    for _ in range(1000):
        ex = task.make_example(rng)
        if not is_heldout(ex.prompt):
            return ex
    raise RuntimeError(f"task {task.name!r}: 1000 draws in a row were held-out prompts")


class TrainStream:
    """An endless iterator of training examples; ``cursor`` is the index of the next one.

    Save ``state_dict()`` with a checkpoint and pass ``start=cursor`` (or ``load_state_dict``) to resume:
    the resumed stream yields exactly what the uninterrupted one would have.
    """

    def __init__(self, task: Task, seed: int, start: int = 0):
        self.task, self.seed, self.cursor = task, seed, start

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        ex = train_example(self.task, self.seed, self.cursor)
        self.cursor += 1
        return ex

    def take(self, n: int) -> list[Example]:
        """The next ``n`` examples."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, int | str]:
        return {"task": self.task.name, "seed": self.seed, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        if state["task"] != self.task.name or state["seed"] != self.seed:
            raise ValueError(f"data cursor is for task {state['task']!r} seed {state['seed']}, "
                             f"not {self.task.name!r} seed {self.seed}: resume with the run's own data.task and "
                             f"seed (its config.yaml), or start a new run from the checkpoint (model.path=...)")
        self.cursor = int(state["cursor"])


def task_splits(task: Task | str, seed: int, n_eval: int, eval_seed: int | None = None) -> tuple[list[Example], TrainStream]:
    """(``n_eval`` held-out examples, the training stream from index 0), deterministic in ``seed``
    (the held-out ones in ``eval_seed`` when given).

    No training prompt is ever a held-out prompt, whatever ``n_eval`` (see :func:`is_heldout`).
    """
    task = get_task(task) if isinstance(task, str) else task
    return eval_examples(task, seed if eval_seed is None else eval_seed, n_eval), TrainStream(task, seed)
