"""Data: prompt files in every supported format, bad rows, templates with a real tokenizer, prompt fitting."""
from __future__ import annotations

import csv
import doctest
import json
from pathlib import Path

import pytest

import dapo.data.files
import dapo.data.templates
from dapo.data import (
    DataError,
    Example,
    LoadStats,
    fit_prompts,
    load_examples,
    prompt_text,
    render_prompt,
)
from dapo.data.templates import BOXED_SUFFIX, DAPO_MATH_PREFIX, DAPO_MATH_SUFFIX

FIXTURE = Path(__file__).parent / "fixtures" / "math_20.jsonl"


def dapo_row(problem: str, answer: str, source: str = "math_dapo", index: str = "0") -> dict:
    """One row exactly as DAPO-Math-17k publishes it."""
    return {
        "data_source": source,
        "prompt": [{"content": DAPO_MATH_PREFIX + problem + DAPO_MATH_SUFFIX, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------
# formats

def test_fixture_is_dapo_math_17k_schema():
    examples, stats = load_examples(FIXTURE)
    assert stats == LoadStats(rows=20, kept=20, skipped_bad=0, dropped_duplicates=0)
    first = examples[0]
    assert first.answer == "42" and first.data_source == "synthetic_a"
    assert first.prompt[0]["role"] == "user" and "What is $17 + 25$?" in first.prompt[0]["content"]
    assert first.fields == {"data_source": "synthetic_a", "ability": "MATH", "prompt": first.prompt,
                            "reward_model": {"ground_truth": "42", "style": "rule"},
                            "extra_info": {"index": "synthetic-0000"}}  # every column reaches the reward
    assert sorted({e.data_source for e in examples}) == ["synthetic_a", "synthetic_b"]
    assert {e.answer for e in examples} >= {"\\frac{3}{4}", "\\frac{2}{5}", "-5", "1024"}
    raw = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert all(list(r) == ["data_source", "prompt", "ability", "reward_model", "extra_info"] for r in raw)


def test_parquet_in_the_dapo_schema_with_repeats_and_dedup(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    unique = [dapo_row(f"What is {k} + {k}?", str(2 * k), index=str(k)) for k in range(5)]
    rows = unique * 3 + [dapo_row("What is 1 + 1?", "2", source="other")]  # a repeat from another source
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)

    examples, stats = load_examples(path)
    assert stats == LoadStats(rows=16, kept=16, skipped_bad=0, dropped_duplicates=0)

    examples, stats = load_examples(path, dedup=True)
    assert stats == LoadStats(rows=16, kept=5, skipped_bad=0, dropped_duplicates=11)
    assert [e.answer for e in examples] == ["0", "2", "4", "6", "8"]
    assert examples[1].prompt == unique[1]["prompt"]  # a list of {"content", "role"} dicts, as written
    assert examples[1].fields["extra_info"] == {"index": "1"}


def test_csv_with_answer_column_fallback_and_quoted_newlines(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "answer", "level"])
        w.writerow(["What is 2+3?", "5", "1"])
        w.writerow(["Two lines:\nwhat is 10/4?", "5/2", "2"])
    examples, stats = load_examples(path)  # no reward_model.ground_truth: falls back to "answer"
    assert stats.kept == 2
    assert examples[1] == Example("Two lines:\nwhat is 10/4?", "5/2", "", {
        "prompt": "Two lines:\nwhat is 10/4?", "answer": "5/2", "level": "2"})

    with path.open("a", newline="") as f:
        csv.writer(f).writerow(["What is 1+1?", "", "3"])
    with pytest.raises(DataError, match=r"p\.csv: row 3 \(line 5\): answer key 'answer' is empty"):
        load_examples(path)


def test_tsv_and_json_array(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("question\tsolution\nWhat is 3*3?\t9\n")
    examples, _ = load_examples(tsv, prompt_key="question", answer_key="solution")
    assert examples == [Example("What is 3*3?", "9", "", {"question": "What is 3*3?", "solution": "9"})]

    js = tmp_path / "p.json"
    js.write_text(json.dumps({"data": [{"prompt": "What is 3*3?", "meta": {"gt": 9}}]}))
    examples, _ = load_examples(js, answer_key="meta.gt")  # dotted key, and an int answer
    assert examples[0].answer == "9"


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [dapo_row("What is 6 * 7?", "42", index="a"), dapo_row("What is 6 * 7?", "42", index="b"),
            dapo_row("What is 1/2 + 1/2?", "1", index="c")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    examples, stats = load_examples(tmp_path / "ds", dedup=True)
    assert stats == LoadStats(rows=3, kept=2, skipped_bad=0, dropped_duplicates=1)
    assert [e.answer for e in examples] == ["42", "1"]
    assert examples[0].prompt == rows[0]["prompt"] and examples[0].data_source == "math_dapo"

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(tmp_path / "dd"))
    examples, _ = load_examples(tmp_path / "dd")  # a DatasetDict: its train split
    assert [e.answer for e in examples] == ["42"]


# --------------------------------------------------------------------------------------------------
# bad rows: each names the file, the 1-based row and the key; "skip" skips and counts

GOOD = {"prompt": "What is 1+1?", "answer": "2"}
BAD_ROWS = [
    ({"answer": "2"}, "prompt key 'prompt' is missing"),
    ({"prompt": None, "answer": "2"}, "prompt key 'prompt' is null"),
    ({"prompt": "   ", "answer": "2"}, "prompt key 'prompt' is empty"),
    ({"prompt": 17, "answer": "2"}, "prompt key 'prompt' must be a string or a list of chat messages, got int"),
    ({"prompt": [], "answer": "2"}, "prompt key 'prompt' is an empty list of messages"),
    ({"prompt": [{"role": "user"}], "answer": "2"}, "prompt key 'prompt' message 0 is not"),
    ({"prompt": [{"role": "user", "content": ""}], "answer": "2"}, "prompt key 'prompt' has only empty messages"),
    ({"prompt": "What is 1+1?"}, "answer key 'reward_model.ground_truth' is missing and there is no 'answer'"),
    ({"prompt": "What is 1+1?", "answer": ""}, "answer key 'answer' is empty"),
    ({"prompt": "What is 1+1?", "answer": None}, "answer key 'answer' is null"),
    ({"prompt": "x", "reward_model": {"ground_truth": None}}, "answer key 'reward_model.ground_truth' is null"),
    ({"prompt": "What is 1+1?", "answer": ["2"]}, "answer key 'answer' must be a string or a number, got list"),
    ({"prompt": "What is 1+1?", "answer": True}, "answer key 'answer' must be a string or a number, got bool"),
    ({"prompt": "What is 1+1?", "answer": float("nan")}, "answer key 'answer' is nan (an empty cell, as pandas"),
    ({"prompt": "x", "reward_model": {"ground_truth": {"v": 2}}},
     "answer key 'reward_model.ground_truth' must be a string or a number, got dict"),
    ([1, 2], "is a list, not an object"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_row_is_an_error_naming_file_row_and_key(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value).startswith(f"{path}: row 3 (line 3): {message}")
    assert isinstance(info.value, ValueError)

    examples, stats = load_examples(path, bad_rows="skip")
    assert stats == LoadStats(rows=4, kept=3, skipped_bad=1, dropped_duplicates=0)
    assert all(e.answer == "2" for e in examples)


@pytest.mark.parametrize("bad, state", [({"prompt": "2+2?", "response": " "}, "empty"),
                                         ({"prompt": "2+2?", "answer": "4"}, "missing"),
                                         ({"messages": [{"role": "user", "content": "2+2?"}]}, "missing")])
def test_a_supervised_row_without_a_response_is_a_bad_row_naming_it(tmp_path, bad, state):
    """``dapo sft``'s rows need a response (``sft.response_key``) or an assistant turn: one with neither is a bad
    row like any other, named by its row under data.bad_rows=error and skipped under skip."""
    chat = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1?", "response": "2"}, chat, bad])
    with pytest.raises(DataError) as info:
        load_examples(path, require_answer=False, response_key="response")
    assert str(info.value).startswith(f"{path}: row 3 (line 3): has no response to imitate: sft.response_key "
                                      f"'response' is {state} and there is no assistant turn")
    examples, stats = load_examples(path, bad_rows="skip", require_answer=False, response_key="response")
    assert stats == LoadStats(rows=3, kept=2, skipped_bad=1, dropped_duplicates=0)
    assert [e.prompt if isinstance(e.prompt, str) else e.prompt[0]["content"] for e in examples] == ["1+1?"] * 2
    assert load_examples(path, require_answer=False)[1].kept == 3  # dapo train's prompts need no response


def test_unparseable_json_line_is_a_bad_row_and_blank_lines_do_not_count(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"prompt": "x", "answer": \n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"rows\.jsonl: row 2 \(line 3\): is not valid JSON"):
        load_examples(path)
    assert load_examples(path, bad_rows="skip")[1] == LoadStats(rows=3, kept=2, skipped_bad=1, dropped_duplicates=0)


def test_every_row_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": ""}, {"q": 1}])
    with pytest.raises(DataError, match=r"rows\.jsonl: none of its 2 rows is usable \(2 bad\)"):
        load_examples(path, bad_rows="skip")


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode() + b"\n"
                     + '{"prompt": "Combien font 2+2 ? Réponds.", "answer": "4"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: line 3 is not valid UTF-8 \(byte 0xe9\)"):
        load_examples(path, bad_rows="skip")  # a wrongly encoded file is never silently skipped

    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes("prompt,answer\ncaf\u00e9 count?,4\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: line 2 is not valid UTF-8"):
        load_examples(csv_path)


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("header_only.csv", "prompt,answer\n"), ("empty.json", "[]"),
])
def test_empty_dataset_names_the_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"{name}: the dataset is empty"):
        load_examples(tmp_path / name)


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"p\.xlsx: unknown file type '\.xlsx'; supported: \.jsonl, \.json, \.parquet"):
        load_examples(tmp_path / "p.xlsx")
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="bad_rows"):
        load_examples(FIXTURE, bad_rows="ignore")


# --------------------------------------------------------------------------------------------------
# templates

@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "<|user|>", "<|assistant|>", "What", "is", "2+3?"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                   chat_template=template)


def test_templates_on_plain_and_chat_prompts():
    plain = Example("What is 2+3?", "5")
    chat = Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}], "5")
    assert render_prompt(plain, "none") == "What is 2+3?"
    assert render_prompt(chat, "none") == "What is 2+3?"  # user turns only
    assert prompt_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}]) == "a\n\nc"
    dapo_text = DAPO_MATH_PREFIX + "What is 2+3?" + DAPO_MATH_SUFFIX
    assert render_prompt(plain, "dapo_math") == dapo_text
    assert render_prompt(chat, "dapo_math") == dapo_text
    assert dapo_text.startswith("Solve the following math problem step by step. The last line of your response "
                                "should be of the form Answer: $Answer (without quotes) where $Answer is the "
                                "answer to the problem.\n\nWhat is 2+3?\n\nRemember to put your answer on its "
                                'own line after "Answer:".')
    assert render_prompt(plain, "boxed") == "What is 2+3?" + BOXED_SUFFIX
    assert "\\boxed{}" in BOXED_SUFFIX
    assert render_prompt("What is 2+3?", "none") == "What is 2+3?"  # a bare prompt works too
    with pytest.raises(ValueError, match="unknown prompt template 'dapo'; valid: none, dapo_math, boxed, chat"):
        render_prompt(plain, "dapo")


def test_dapo_math_template_is_not_doubled_on_dapo_math_17k_prompts():
    examples, _ = load_examples(FIXTURE)
    for e in examples:
        text = render_prompt(e, "dapo_math")
        assert text == e.prompt[0]["content"]
        assert text.count("Solve the following math problem") == 1 and text.count("Remember to put") == 1


def test_chat_template_with_a_real_tokenizer(tokenizer):
    plain = Example("What is 2+3?", "5")
    assert render_prompt(plain, "chat", tokenizer) == "<|user|> What is 2+3?\n<|assistant|>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    assert render_prompt(Example(messages, "5"), "chat", tokenizer) == (
        "<|system|> Be brief.\n<|user|> What is 2+3?\n<|assistant|>")
    assert render_prompt(plain, "boxed+chat", tokenizer) == (
        "<|user|> What is 2+3?" + BOXED_SUFFIX + "\n<|assistant|>")
    assert messages[1]["content"] == "What is 2+3?"  # the example's messages are not modified
    assert render_prompt(plain, "dapo_math+chat", tokenizer).count("Solve the following") == 1

    ids = tokenizer(render_prompt(plain, "chat", tokenizer), add_special_tokens=False)["input_ids"]
    assert ids == [2, 4, 5, 6, 3]  # <|user|> What is 2+3? <|assistant|>


def test_chat_template_falls_back_to_plain_text(tokenizer):
    base = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
    assert not base.chat_template
    assert render_prompt(Example("What is 2+3?", "5"), "chat", base) == "What is 2+3?"
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt(Example("What is 2+3?", "5"), "chat")


# --------------------------------------------------------------------------------------------------
# prompt lengths

def test_fit_prompts_drop_and_truncate():
    ids = [[1, 2, 3], [1, 2, 3, 4, 5], [], [9, 8, 7, 6]]
    assert fit_prompts(ids, max_len=4) == ([0, 2, 3], [[1, 2, 3], [], [9, 8, 7, 6]], 1, 0)
    assert fit_prompts(ids, max_len=4, mode="truncate") == (
        [0, 1, 2, 3], [[1, 2, 3], [2, 3, 4, 5], [], [9, 8, 7, 6]], 0, 1)
    assert fit_prompts(ids, max_len=1, mode="truncate") == ([0, 1, 2, 3], [[3], [5], [], [6]], 0, 3)
    assert fit_prompts([], max_len=4) == ([], [], 0, 0)
    with pytest.raises(ValueError, match="max_len"):
        fit_prompts(ids, max_len=0)
    with pytest.raises(ValueError, match="mode"):
        fit_prompts(ids, max_len=4, mode="left")


def test_docstring_examples_run():
    for module in (dapo.data.templates, dapo.data.files):
        failed, tried = doctest.testmod(module)
        assert tried > 0 and failed == 0, module.__name__


def test_the_fields_are_every_column_with_dedup_on_as_off(tmp_path):
    """The fields hold every column, the prompt's too (what a reward's ``**row`` gets), with de-duplication on as
    off (its key once overwrote the column's name); a conversation cut at its last user turn keeps the whole
    conversation under its column."""
    p = tmp_path / "d.jsonl"
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    p.write_text(json.dumps({"prompt": "1+1?", "answer": "2", "n": 1}) + "\n"
                 + json.dumps({"prompt": "1+1?", "answer": "2", "n": 2}) + "\n"
                 + json.dumps({"messages": conv, "answer": "4"}) + "\n")
    for dedup in (False, True):
        exs, stats = load_examples(p, dedup=dedup)
        assert [e.fields for e in exs][0] == {"prompt": "1+1?", "answer": "2", "n": 1}
        assert exs[-1].prompt == conv[:1] and exs[-1].fields == {"answer": "4", "messages": conv}
        assert stats.dropped_duplicates == int(dedup)


def test_prompts_with_characters_the_tokenizer_lacks_are_counted_with_examples():
    """A character tokenizer encodes what it does not know as <unk>: stop 41 saw 'renversé' reach the model as
    'renvers<unk>' without a word. A byte-level tokenizer has no unknown token: nothing to say."""
    from dapo.data.charvocab import make_char_tokenizer
    from dapo.problems import encode_prompts

    tok = make_char_tokenizer()
    exs = [Example(prompt=p, answer="1") for p in ("6 6 0 renversé :", "1 2 3 reversed:", "7 8 9 à l'envers ü")]
    said = []
    kept, ids, _, _ = encode_prompts(exs, "none", tok, 64, log=said.append, where="f.jsonl")
    assert len(kept) == 3 and sum(tok.unk_token_id in x for x in ids) == 2
    assert len(said) == 1 and said[0].startswith(f"warning: f.jsonl: 2 of 3 prompts hold characters the tokenizer "
                                                 f"does not know, which it encodes as {tok.unk_token} (e.g. 'é', 'à', "
                                                 f"'ü'): the model never sees them"), said
    said.clear()
    encode_prompts(exs[1:2], "none", tok, 64, log=said.append, where="f.jsonl")
    assert said == []
