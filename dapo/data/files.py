"""Prompt files: JSONL, JSON, Parquet, CSV and Hugging Face ``datasets``, read into ``Example`` rows.

The DAPO-Math-17k schema is read as it is published::

    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve ..."}], "ability": "MATH",
     "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "..."}}

``answer_key`` is dotted for nested fields (``reward_model.ground_truth``) and falls back to a top-level
``answer`` column, so a plain ``{"prompt": "...", "answer": "..."}`` file needs no options; the prompt key
falls back to a top-level ``messages`` column the same way (SFT data). A chat prompt that ends with assistant
turns (a whole conversation) is cut after its last user turn: that is the prompt a policy answers, and the
whole conversation stays in ``Example.fields[prompt_key]`` for the warm-up to imitate. Every problem
is reported with the file, the 1-based row and the key, because a 17k-row file is not read by eye.
Parquet needs ``pyarrow``, Hugging Face datasets need ``datasets`` (``pip install 'dapo[data]'``).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from dapo.data.example import Example

SUPPORTED = (".jsonl", ".json", ".parquet", ".csv", ".tsv", "a saved Hugging Face dataset directory")


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file, row and key."""


@dataclass(frozen=True)
class LoadStats:
    rows: int
    """Rows read from the file."""
    kept: int
    """Examples returned."""
    skipped_bad: int
    """Rows skipped for a missing, empty or wrong-typed prompt or answer (``bad_rows="skip"``)."""
    dropped_duplicates: int
    """Rows dropped as repeats of an earlier prompt (``dedup=True``)."""

    def __str__(self) -> str:
        """``60 rows, 59 kept (1 bad row skipped, data.bad_rows=skip)``: what the start log says of a file."""
        why = []
        if self.skipped_bad:
            why.append(f"{self.skipped_bad} bad row{'s' * (self.skipped_bad != 1)} skipped, data.bad_rows=skip")
        if self.dropped_duplicates:
            why.append(f"{self.dropped_duplicates} repeated prompt{'s' * (self.dropped_duplicates != 1)} dropped, "
                       f"data.dedup=true")
        return f"{self.rows} rows, {self.kept} kept" + (f" ({'; '.join(why)})" if why else "")


# --------------------------------------------------------------------------------------------------
# readers: each yields (where, row) with ``where`` like "row 3" or "row 3 (line 4)"


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text of a file (a leading BOM dropped); an error names the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}); "
            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    row = 0
    for line_no, line in enumerate(_decode(path, path.read_bytes()).splitlines(), start=1):
        if not line.strip():
            continue
        row += 1
        try:
            yield f"row {row} (line {line_no})", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"row {row} (line {line_no})", _BadRow(f"is not valid JSON ({e.msg} at column {e.colno})")


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _decode(path, path.read_bytes())
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # more than one value: JSON lines in a .json file
        yield from _read_jsonl(path)
        return
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: the only list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or JSON lines), got an object with keys "
                            f"{sorted(data)[:10]}")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows (or JSON lines), got {type(data).__name__}")
    for row, item in enumerate(data, start=1):
        yield f"row {row}", item


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(_decode(path, path.read_bytes()), newline=""), delimiter=delimiter)
    for row, item in enumerate(reader, start=1):
        if None in item:  # more cells than header columns
            yield f"row {row} (line {reader.line_num})", _BadRow(f"has {len(item) - 1 + len(item[None])} "
                                                                f"cells for {len(item) - 1} header columns")
            continue
        yield f"row {row} (line {reader.line_num})", item


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'dapo[data]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):  # lists of structs come back as lists of dicts
        for item in batch.to_pylist():
            row += 1
            yield f"row {row}", item


def _read_hf(path: str, is_dir: bool) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a Hugging Face dataset needs `datasets`: pip install 'dapo[data]'") from None
    try:
        data = datasets.load_from_disk(path) if is_dir else datasets.load_dataset(path)
    except Exception as e:
        where = "a directory saved with save_to_disk" if is_dir else "a hub dataset id (no such local file either)"
        raise DataError(f"{path}: cannot load it as {where}: {type(e).__name__}: {e}") from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if "train" in data:
            data = data["train"]
        elif len(splits) == 1:
            data = data[splits[0]]
        else:
            raise DataError(f"{path}: has splits {splits} and none is 'train'; save the split you want alone")
    for row, item in enumerate(data, start=1):
        yield f"row {row}", item


class _BadRow:
    """A row that could not be parsed at all; treated like a row with a bad prompt."""

    def __init__(self, reason: str):
        self.reason = reason


def _rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    p = Path(path).expanduser()
    if p.is_dir():
        return _read_hf(str(p), is_dir=True)
    suffix = p.suffix.lower()
    if not p.exists():
        if not suffix and str(path).count("/") == 1:  # "org/name": a hub dataset id
            return _read_hf(str(path), is_dir=False)
        raise DataError(f"{path}: no such file or directory")
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".parquet": _read_parquet,
        ".csv": lambda q: _read_csv(q, ","),
        ".tsv": lambda q: _read_csv(q, "\t"),
    }
    if suffix not in readers:
        raise DataError(f"{path}: unknown file type {suffix or '(no extension)'!r}; supported: {', '.join(SUPPORTED)}")
    return readers[suffix](p)


# --------------------------------------------------------------------------------------------------
# fields


_MISSING = object()


def get_field(row: dict[str, Any], key: str, default: Any = None) -> Any:
    """``row[key]``, following dots into nested dicts (``reward_model.ground_truth``); a column whose
    name itself contains the dots wins; ``default`` when absent.

    >>> get_field({"reward_model": {"ground_truth": "34"}}, "reward_model.ground_truth")
    '34'
    """
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def prompt_error(prompt: Any) -> str | None:
    """Why ``prompt`` is not a usable prompt (a non-empty string, or chat messages), or None if it is."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "is empty"
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            return "is an empty list of messages"
        why = messages_error(prompt)
        if why:
            return why
        if not any((m.get("content") or "").strip() or m.get("tool_calls") for m in prompt):
            return "has only empty messages"
        return None
    return f"must be a string or a list of chat messages, got {type(prompt).__name__}"


def messages_error(messages: Sequence[Any]) -> str | None:
    """Which of ``messages`` is not a chat message a template can render (``{'role': str, 'content': str}``, or an
    assistant turn with only ``tool_calls``), in words; None when each is one. Empty content is allowed."""
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"message {k} is not {{'role': str, 'content': str}}"
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls is not None and m.get("content") is None:
            if not isinstance(calls, list) or not calls:  # an assistant turn that only calls tools
                return f"message {k}'s tool_calls is not a non-empty list"
        elif not isinstance(m.get("content"), str):
            return f"message {k} is not {{'role': str, 'content': str}}"
    return None


def tools_error(tools: Any) -> str | None:
    """Why a row's ``tools`` column is not tool schemas for a chat template (a list of JSON objects, or its
    JSON text; null or empty: none), or None if it is."""
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except ValueError:
            return "is a string but not JSON"
    if tools is None or (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
        return None
    return f"must be a list of tool schemas (JSON objects), or its JSON text, got {type(tools).__name__}"


def _answer_text(answer: Any) -> str | None:
    """The ground truth as text: strings as they are, ints and finite floats through str()."""
    if isinstance(answer, str):
        return answer.strip() or None
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int) or (isinstance(answer, float) and math.isfinite(answer)):
        return str(answer)
    return None


def prompt_key_text(prompt: str | list[dict[str, Any]]) -> str:
    """A prompt as one string, for de-duplication: the text, or the messages' roles and contents."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# --------------------------------------------------------------------------------------------------
# the loader


def load_examples(
    path: str | Path,
    prompt_key: str = "prompt",
    answer_key: str = "reward_model.ground_truth",
    bad_rows: str = "error",
    dedup: bool = False,
    require_answer: bool = True,
    response_key: str | None = None,
) -> tuple[list[Example], LoadStats]:
    """Read a prompt file into examples.

    path: .jsonl, .json, .parquet, .csv, .tsv, a directory saved with ``datasets.save_to_disk``, or a
    hub dataset id (``org/name``, where the hub is reachable). prompt_key / answer_key: column names,
    dotted for nested fields; ``answer_key`` falls back to a top-level ``answer`` column when absent.
    bad_rows: ``error`` raises DataError naming the file, 1-based row and key of the first bad row;
    ``skip`` skips and counts them. dedup: keep only the first row of each prompt. require_answer=False
    (supervised data): a row without an answer is kept with ``Example.answer`` None. response_key (``dapo sft``'s
    ``sft.response_key``): a row must also hold a response to imitate there, or an assistant turn in its
    conversation; one with neither is a bad row.

    Returns (examples, LoadStats). ``Example.fields`` holds every column of the row, the prompt's (a whole
    conversation, where ``Example.prompt`` is its turns up to the last user one) included; ``data_source`` is
    the row's ``data_source`` column, if it has one.
    """
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    examples: list[Example] = []
    seen: set[str] = set()
    rows = skipped = duplicates = 0
    for where, row in _rows(path):
        rows += 1
        column = _prompt_column(row, prompt_key)
        problem = _row_problem(row, column, answer_key, require_answer, response_key)
        if problem is not None:
            if bad_rows == "error":
                raise DataError(f"{path}: {where}: {problem} (bad_rows='skip' skips such rows)")
            skipped += 1
            continue
        prompt = conversation = get_field(row, column, _MISSING)
        if not isinstance(prompt, str):
            conversation = [dict(m) for m in prompt]  # tool_calls, name, tool_call_id kept for the template
            prompt = until_last_user_turn(conversation)
        if dedup:
            key = prompt_key_text(prompt)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        answer = get_field(row, answer_key, _MISSING)
        if answer is _MISSING:
            answer = row.get("answer")
        source = row.get("data_source")
        fields = dict(row)  # the prompt's column too: a reward gets every column (TRL passes the prompts too)
        if conversation is not prompt and column in fields:
            fields[column] = conversation
        examples.append(Example(
            prompt=prompt,
            answer=_answer_text(answer),
            data_source=source if isinstance(source, str) else "",
            fields=fields,
        ))
    if rows == 0:
        raise DataError(f"{path}: the dataset is empty (no rows)")
    if not examples:
        raise DataError(f"{path}: none of its {rows} rows is usable ({skipped} bad)")
    return examples, LoadStats(rows=rows, kept=len(examples), skipped_bad=skipped, dropped_duplicates=duplicates)


def until_last_user_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages up to and including the last user turn: what a policy is asked to continue.

    >>> until_last_user_turn([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    [{'role': 'user', 'content': '2+2?'}]
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    return messages[: last + 1]


def _prompt_column(row: Any, prompt_key: str) -> str:
    """``prompt_key``, or a top-level ``messages`` column when the row has no ``prompt_key``."""
    if isinstance(row, dict) and get_field(row, prompt_key, _MISSING) is _MISSING and "messages" in row:
        return "messages"
    return prompt_key


def row_conversation(fields: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The row's chat conversation: its ``key`` column (``data.prompt_key``) when that holds messages, else its
    ``messages`` column; [] when neither does."""
    for value in (get_field(fields, key, None), fields.get("messages")):
        if isinstance(value, list) and all(isinstance(m, dict) for m in value):
            return value
    return []


def response_value(fields: dict[str, Any], response_key: str) -> Any:
    """The row's response to imitate at ``response_key`` (dotted for nested fields); None when it is missing,
    null or blank text."""
    value = get_field(fields, response_key, None)
    return None if isinstance(value, str) and not value.strip() else value


def response_problem(fields: dict[str, Any], conversation_key: str, response_key: str) -> str | None:
    """Why a supervised row teaches nothing: no ``response_value`` and no assistant turn in the conversation at
    ``conversation_key`` (or ``messages``); None when it has one."""
    if response_value(fields, response_key) is not None:
        return None
    value = get_field(fields, response_key, None)
    if any(m.get("role") == "assistant" for m in row_conversation(fields, conversation_key)):
        return None
    state = "empty" if value is not None else "missing"
    return (f"has no response to imitate: sft.response_key {response_key!r} is {state} and there is no assistant "
            f"turn in a 'messages' conversation (columns: {', '.join(sorted(fields))}); set sft.response_key to "
            f"the column holding the response")


def _row_problem(row: Any, prompt_key: str, answer_key: str, require_answer: bool = True,
                 response_key: str | None = None) -> str | None:
    """What is wrong with a row, naming the key; None when it is usable."""
    if isinstance(row, _BadRow):
        return row.reason
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object with named fields"
    prompt = get_field(row, prompt_key, _MISSING)
    if prompt is None:
        return f"prompt key {prompt_key!r} is null"
    if prompt is _MISSING:
        return (f"prompt key {prompt_key!r} is missing and there is no 'messages' column (columns: "
                f"{', '.join(sorted(row))}): set data.prompt_key to the column holding the prompt")
    why = prompt_error(prompt)
    if why:
        return f"prompt key {prompt_key!r} {why}"
    if not isinstance(prompt, str) and not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        return f"prompt key {prompt_key!r} has no user message with content"
    why = tools_error(row.get("tools"))
    if why:
        return f"tools column {why}"
    if response_key is not None:
        why = response_problem(row, prompt_key, response_key)
        if why:
            return why
    answer, key = get_field(row, answer_key, _MISSING), answer_key
    if answer is _MISSING and "answer" in row:
        answer, key = row["answer"], "answer"
    if not require_answer and (answer is _MISSING or answer is None or answer == ""):
        return None
    if answer is None:  # the column is there, this row's value is not: data.answer_key is right
        return f"answer key {key!r} is null"
    if answer is _MISSING:
        fallback = "" if answer_key == "answer" else " and there is no 'answer' column"
        return (f"answer key {answer_key!r} is missing{fallback} (columns: {', '.join(sorted(row))}): set "
                f"data.answer_key to the column holding the ground truth")
    if _answer_text(answer) is None:
        if isinstance(answer, str):
            return f"answer key {key!r} is empty"
        if isinstance(answer, float) and not math.isfinite(answer):  # pandas/pyarrow write an empty cell as NaN
            return f"answer key {key!r} is {answer} (an empty cell, as pandas writes one), not an answer"
        return f"answer key {key!r} must be a string or a number, got {type(answer).__name__}"
    return None
