"""Built-in tasks and the character tokenizer: hand-computed verifier cases, formats, splits, round-trips."""
from __future__ import annotations

import random
import string

import pytest
from transformers import AutoTokenizer

from dapo.data.charvocab import DEFAULT_ALPHABET, make_char_tokenizer
from dapo.data.example import Example
from dapo.data.tasks import (
    TASKS,
    TrainStream,
    eval_examples,
    get_task,
    is_heldout,
    task_splits,
    train_example,
)

# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


def test_tokenizer_one_token_per_char_including_whitespace(tok):
    s = "12 + 3\n= 15\n\n  x"
    ids = tok(s)["input_ids"]
    assert len(ids) == len(s)  # spaces and newlines are tokens, nothing added around the text
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == s


def test_tokenizer_round_trips_random_strings(tok):
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice(DEFAULT_ALPHABET) for _ in range(rng.randint(0, 40)))
        assert tok.decode(tok(s)["input_ids"]) == s


def test_tokenizer_specials_and_padding(tok):
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    assert len(tok) == 4 + len(DEFAULT_ALPHABET)
    assert tok.padding_side == "left"
    batch = tok(["1+2=", "357+68="], padding=True)["input_ids"]
    assert batch[0][:3] == [tok.pad_token_id] * 3
    ids = tok("7=")["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "7="
    assert tok.decode(ids) == "7=<eos><pad>"
    assert tok.decode(tok("a\tb")["input_ids"]) == "a<unk>b"  # outside the alphabet


def test_tokenizer_custom_alphabet():
    t = make_char_tokenizer("0123456789+=:, ")
    assert len(t) == 4 + 15
    assert t.decode(t("12 + 3 = 15")["input_ids"]) == "12 + 3 = 15"
    with pytest.raises(ValueError):
        make_char_tokenizer("")


def test_tokenizer_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    s = "357+68=15,12,04:425\n and  " + string.punctuation
    assert loaded(s)["input_ids"] == tok(s)["input_ids"]
    assert loaded.decode(loaded(s)["input_ids"]) == s
    assert loaded.padding_side == "left"
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.bos_token_id,
    )


# ---------------------------------------------------------------------------------------------- addition

ADD = get_task("addition")


@pytest.mark.parametrize(
    "prompt, response",
    [
        ("357+68=", "15,12,04:425"),  # the FINDINGS example: 7+8=15, 5+6+1=12, 3+0+1=04
        ("9+1=", "10:10"),
        ("0+0=", "00:0"),
        ("999+999=", "18,19,19:1998"),  # the final carry becomes the leading digit of the sum
        ("5+40=", "05,04:45"),
    ],
)
def test_addition_sft_response(prompt, response):
    assert ADD.sft_response(Example(prompt, "")) == response


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("15,12,04:425", "425", (1.0, True)),
        ("15,12,04:424", "425", (-1.0, False)),
        ("99,99:425", "425", (1.0, True)),  # only the text after ':' counts
        ("425", "425", (-1.0, False)),  # no ':'
        ("", "425", (-1.0, False)),
        ("15,12,04: 425 \n", "425", (1.0, True)),  # surrounding whitespace is stripped
        ("15:12:425", "425", (1.0, True)),  # the last ':' counts
        ("15,12,04:425:1", "425", (-1.0, False)),
        ("15,12,04:4 25", "425", (-1.0, False)),
        ("15,12,04:0425", "425", (-1.0, False)),
        ("15,12,04:", "425", (-1.0, False)),
    ],
)
def test_addition_score(response, answer, expected):
    assert ADD.score(response, answer) == expected


def test_addition_extract_answer():
    assert ADD.extract_answer("15,12,04: 425\n") == "425"
    assert ADD.extract_answer("425") is None


def test_addition_examples_are_consistent():
    rng = random.Random(1)
    for _ in range(500):
        ex = ADD.make_example(rng)
        a, b = (int(x) for x in ex.prompt[:-1].split("+"))
        assert 0 <= a <= 999 and 0 <= b <= 999 and ex.answer == str(a + b)
        resp = ADD.sft_response(ex)
        assert len(resp) <= ADD.max_response_len
        assert ADD.score(resp, ex.answer) == (1.0, True)


# ---------------------------------------------------------------------------------------------- multisum

MULTI = get_task("multisum")


@pytest.mark.parametrize(
    "prompt, style, response",
    [
        ("23+7+481=", "worked", "11,11,05:511"),  # 3+7+1=11, 2+8+1(carry)=11, 4+1(carry)=05
        ("23+7+481=", "direct", ":511"),
        ("99+99+99=", "worked", "27,29:297"),  # carries above 1
        ("999+999+999+999=", "worked", "36,39,39:3996"),
        ("0+0=", "worked", "00:0"),
        ("5+5=", None, "10:10"),  # no style recorded: worked
    ],
)
def test_multisum_sft_response(prompt, style, response):
    fields = {"style": style} if style else {}
    assert MULTI.sft_response(Example(prompt, "", fields=fields)) == response


def test_multisum_examples_mix_styles_and_score():
    rng = random.Random(2)
    exs = [MULTI.make_example(rng) for _ in range(400)]
    styles = [e.fields["style"] for e in exs]
    assert 120 < styles.count("direct") < 280  # direct_frac 0.5
    for e in exs:
        terms = [int(x) for x in e.prompt[:-1].split("+")]
        assert 2 <= len(terms) <= 3 and max(terms) < 100 and e.answer == str(sum(terms)) and e.fields["terms"] == terms
        resp = MULTI.sft_response(e)
        assert len(resp) <= MULTI.max_response_len and MULTI.score(resp, e.answer) == (1.0, True)
        assert resp.startswith(":") == (e.fields["style"] == "direct")
    assert MULTI.score("11,11,05:512", "511") == (-1.0, False)
    ev, stream = task_splits("multisum", seed=0, n_eval=64)
    assert not {e.prompt for e in ev} & {e.prompt for e in stream.take(500)}


def test_multisum_direct_draws_the_same_prompts_and_answers_directly():
    direct = get_task("multisum_direct")
    assert direct.family == MULTI.family and direct.sft_overrides == MULTI.sft_overrides
    ev_m, st_m = task_splits("multisum", seed=4, n_eval=32)
    ev_d, st_d = task_splits("multisum_direct", seed=4, n_eval=32)
    assert [e.prompt for e in ev_m] == [e.prompt for e in ev_d]
    train_m, train_d = st_m.take(300), st_d.take(300)
    assert [e.prompt for e in train_m] == [e.prompt for e in train_d]
    assert all(direct.sft_response(e).startswith(":") for e in train_d)  # the worked pattern never appears
    assert 90 < sum(not MULTI.sft_response(e).startswith(":") for e in train_m) < 210
    e = train_d[0]
    assert direct.score(":" + e.answer, e.answer) == MULTI.score(":" + e.answer, e.answer) == (1.0, True)


def test_get_task_error_lists_names():
    assert get_task("addition") is TASKS["addition"]
    with pytest.raises(ValueError, match="addition, mult, multisum"):
        get_task("additoin")


# ---------------------------------------------------------------------------------------------- splits


def test_eval_and_train_are_disjoint_and_deterministic():
    ev, stream = task_splits("addition", seed=3, n_eval=256)
    prompts = [e.prompt for e in ev]
    assert len(set(prompts)) == 256 and all(is_heldout(p) for p in prompts)
    train = stream.take(3000)
    assert not {e.prompt for e in train} & set(prompts)
    assert not any(is_heldout(e.prompt) for e in train)
    # the same seed gives the same split; another seed another one
    ev2, stream2 = task_splits(ADD, seed=3, n_eval=256)
    assert ev2 == ev and stream2.take(50) == train[:50]
    assert [e.prompt for e in task_splits(ADD, seed=4, n_eval=256)[0]] != prompts
    # a fixed eval seed: the same held-out prompts under every training seed, the training streams still differ
    ev5, st5 = task_splits(ADD, seed=5, n_eval=256, eval_seed=3)
    assert ev5 == ev and st5.take(50) != train[:50]
    # an independent probe set (another tag) is held out too, but drawn separately
    probe = eval_examples(ADD, 3, 256, tag="sft-probe")
    assert all(is_heldout(e.prompt) for e in probe) and [e.prompt for e in probe] != prompts


def test_train_stream_resumes_from_cursor():
    full = TrainStream(ADD, seed=7).take(40)
    s = TrainStream(ADD, seed=7)
    s.take(25)
    state = s.state_dict()
    assert state["cursor"] == 25
    resumed = TrainStream(ADD, seed=7)
    resumed.load_state_dict(state)
    assert resumed.take(15) == full[25:]
    assert TrainStream(ADD, seed=7, start=30).take(10) == full[30:]
    assert train_example(ADD, 7, 12) == full[12]
    with pytest.raises(ValueError):
        TrainStream(ADD, seed=8).load_state_dict(state)


def test_a_data_cursor_of_the_other_kind_of_stream_is_refused_naming_both():
    """A task run's cursor loaded by a file's stream said 'saved for None prompts'; a file run's cursor loaded by
    a task's stream raised KeyError 'task' (stop 41)."""
    from dapo.problems import ListPromptStream, TaskPromptStream

    _, train = task_splits("addition", 0, 4)
    task_stream = TaskPromptStream(train, lambda ex: [1])
    file_stream = ListPromptStream([Example(prompt="1+1=", answer="2")] * 3, [[1]] * 3, seed=0)
    with pytest.raises(ValueError, match=r"saved for the built-in task 'addition', and this run reads a prompt "
                                         r"file's 3 prompts"):
        file_stream.load_state_dict(task_stream.state_dict())
    with pytest.raises(ValueError, match=r"saved for a prompt file's 3 prompts, and this run reads the built-in "
                                         r"task 'addition'"):
        task_stream.load_state_dict(file_stream.state_dict())
    task_stream.load_state_dict(task_stream.state_dict())  # its own kind loads
    file_stream.load_state_dict(file_stream.state_dict())
