"""Rewards: the DAPO math verifier on hand-written cases, and the batch runner's failure handling."""
from __future__ import annotations

import doctest
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import dapo.rewards.limits
import dapo.rewards.math
import dapo.rewards.runner
from dapo.rewards.runner import BAD_TYPE, ERRORS, TIMEOUTS
from dapo.rewards import (
    MathScore,
    RewardBatch,
    RewardFnError,
    RewardRunner,
    RewardTimeout,
    call_with_time_limit,
    extract_answer,
    load_reward_fn,
    math_verify_available,
    normalize_answer,
    normalize_reward,
    score_math,
)

needs_mv = pytest.mark.skipif(not math_verify_available(), reason="math-verify not installed")


def mv(*case):
    return pytest.param(*case, marks=needs_mv)


# (response, ground truth, correct) with the default use_math_verify=None: symbolic comparison only
# for non-integer ground truths. Cases marked mv() need math-verify to be judged correct.
CASES = [
    # integers, signs, case, position of the answer line
    ("Answer: 42", "42", True),
    ("Answer: 41", "42", False),
    ("answer: 42", "42", True),
    ("ANSWER:42", "42", True),
    ("Six times seven:\n6 * 7 = 42\nAnswer: 42", "42", True),
    ("Answer: -5", "-5", True),
    ("Answer: 5", "-5", False),
    ("Answer: \u22125", "-5", True),  # unicode minus sign
    ("Answer: +7", "7", True),
    ("Answer: 42.", "42", True),
    ("Answer: $42$", "42", True),
    ("Answer: \\boxed{42}", "42", True),
    ("**Answer:** 42", "42", True),
    ("**Answer: 42**", "42", True),
    ("Answer: x = 42", "42", True),
    ("Answer: 4.0", "4", True),
    ("Answer: 8/2", "4", False),  # integer ground truth: exact match only, as DAPO
    # thousands separators
    ("Answer: 1,000", "1000", True),
    ("Answer: 1000", "1,000", True),
    ("Answer: 12,345,678", "12345678", True),
    ("Answer: 1{,}000", "1000", True),
    ("Answer: 1\\,000", "1000", True),
    ("Answer: 1,2,3", "123", False),  # a list, not a grouped number
    ("Answer: 1,00", "100", False),
    # decimals
    ("Answer: 0.5", "0.5", True),
    ("Answer: .5", "0.5", True),
    ("Answer: 2.50", "2.5", True),
    ("Answer: 3.1", "3", False),
    ("Answer: 3.14", "3.14159", False),
    # fractions
    ("Answer: \\frac{1}{2}", "\\frac{1}{2}", True),
    ("Answer: \\frac12", "\\frac{1}{2}", True),
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("Answer: 1/2", "\\frac{1}{2}", True),
    ("Answer: \\frac{1}{2}", "1/2", True),
    ("Answer: -\\frac{3}{4}", "-\\frac{3}{4}", True),
    ("Answer: \\frac{3}{4}", "-\\frac{3}{4}", False),
    mv("Answer: \\frac{2}{4}", "\\frac{1}{2}", True),
    mv("Answer: 0.75", "\\frac{3}{4}", True),
    mv("Answer: 0.75", "3/4", True),
    ("Answer: 0.33", "\\frac{1}{3}", False),
    # roots
    ("Answer: \\sqrt{2}", "\\sqrt{2}", True),
    ("Answer: \\sqrt2", "\\sqrt{2}", True),
    ("Answer: 2\\sqrt{3}", "2\\sqrt{3}", True),
    mv("Answer: \\sqrt{12}", "2\\sqrt{3}", True),
    ("Answer: \\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{2}}{2}", True),
    mv("Answer: \\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("Answer: \\sqrt{3}", "\\sqrt{2}", False),
    # \boxed{} as the fallback format
    ("so the total is \\boxed{42}.", "42", True),
    ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", True),
    ("thus $\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}", True),
    ("first \\boxed{3}, then \\boxed{4}", "4", True),
    ("first \\boxed{3}, then \\boxed{4}", "3", False),
    ("\\boxed{4", "4", False),  # never closed: the response was cut off
    ("\\fbox{7}", "7", True),
    ("\\boxed{\\boxed{9}}", "9", True),
    ("\\boxed 5", "5", True),
    ("Answer: 5\nthough one could also box \\boxed{6}", "5", True),  # the DAPO format wins
    # units and decorations
    ("Answer: 10 cm", "10", True),
    ("Answer: 10\\text{ cm}^2", "10", True),
    ("Answer: \\$12", "12", True),
    ("Answer: 12 dollars", "12", True),
    ("Answer: 90^\\circ", "90", True),
    ("Answer: 90^{\\circ}", "90", True),
    ("Answer: 50\\%", "50", True),
    ("Answer: 12 apples", "12", False),  # not a unit we know: the answer is "12apples"
    ("Answer: \\text{(B)}", "(B)", True),
    # where the answer is: the last "Answer:" in the last 300 characters
    ("Answer: 3\nHmm, wait. Let me recheck the sum once more: it is fine.", "3", True),
    ("Answer: 3\nHmm, wait, that is wrong.\nAnswer: 4", "4", True),
    ("Answer: 3\nHmm, wait, that is wrong.\nAnswer: 4", "3", False),
    ("Answer: 7\n" + "and then I kept thinking. " * 20, "7", False),  # outside the tail
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5", True),
    ("The answer: 12 is what I got", "12", False),  # the whole rest of the line is the answer
    # no answer at all
    ("I don't know.", "5", False),
    ("", "5", False),
    ("Answer:", "5", False),
    ("The answer is 5", "5", False),  # neither format
    # expressions, intervals, sets, constants
    ("Answer: y = 2x+1", "2x+1", True),
    ("Answer: (1, 2)", "(1,2)", True),
    ("Answer: [1,3)", "[1, 3)", True),
    ("Answer: (1,3]", "[1,3)", False),
    mv("Answer: \\{2, 1\\}", "\\{1,2\\}", True),
    ("Answer: \\pi", "\\pi", True),
    ("Answer: 2\\pi", "\\pi", False),
    mv("Answer: \\frac{\\pi}{2}", "\\pi/2", True),
    mv("Answer: x+1", "1+x", True),
    ("Answer: \\infty", "\\infty", True),
]


def test_case_table_is_big_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("response, ground_truth, correct", CASES)
def test_score_math_cases(response, ground_truth, correct):
    result = score_math(response, ground_truth)
    assert isinstance(result, MathScore)
    assert result.correct is correct, result
    assert result.score == (1.0 if correct else -1.0)


@pytest.mark.parametrize("response, ground_truth", [
    ("Answer: 0.75", "3/4"),
    ("Answer: \\sqrt{12}", "2\\sqrt{3}"),
    ("Answer: x+1", "1+x"),
])
def test_exact_match_only_when_math_verify_is_off(response, ground_truth):
    assert score_math(response, ground_truth, use_math_verify=False).correct is False


@needs_mv
def test_math_verify_forced_on_for_an_integer_ground_truth():
    assert score_math("Answer: 8/2", "4").correct is False  # auto: off for integers
    assert score_math("Answer: 8/2", "4", use_math_verify=True).correct is True


def test_pred_is_the_normalised_answer_or_none():
    assert score_math("blah\nAnswer: $\\dfrac12$.", "1/2") == MathScore(1.0, True, "\\frac{1}{2}")
    assert score_math("Answer: 1,000 dollars", "7") == MathScore(-1.0, False, "1000")
    assert score_math("no answer here", "7") == MathScore(-1.0, False, None)


def test_extract_answer_and_normalize_answer():
    assert extract_answer("Answer: 3\nAnswer: 4\n") == "4"
    assert extract_answer("answer: 3", tail_chars=None) == "3"
    assert extract_answer("x" * 500 + "\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{}") is None
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize_answer("\\sqrt[3]{8}") == "\\sqrt[3]{8}"
    assert normalize_answer("\\frac 1 2") == "\\frac{1}{2}"
    assert normalize_answer("-0.0") == "0"


def test_adversarial_inputs_return_quickly():
    nasty = [
        "\\boxed{" * 200_000 + "1",  # a naive recursive brace matcher would overflow or go quadratic
        "Answer: " + "{" * 100_000,
        "$" * 300_000 + "Answer: " + "\\frac" * 50_000,
        "Answer: " + "(" * 50_000 + "1" + ")" * 50_000,
    ]
    for response in nasty:
        start = time.monotonic()
        result = score_math(response, "1/2", timeout_s=1.0)
        assert result.correct is False
        assert time.monotonic() - start < 2.0, response[:40]
    start = time.monotonic()
    assert score_math("{" * 1_000_000, "1", tail_chars=None).pred is None  # linear even without the tail
    assert time.monotonic() - start < 2.0


@needs_mv
def test_a_pathological_power_tower_is_cut_by_the_time_limit():
    start = time.monotonic()
    result = score_math("Answer: 9^{9^{9^{9}}}", "1/2", timeout_s=0.5)  # sympy would not finish
    assert result == MathScore(-1.0, False, "9^{9^{9^{9}}}")
    assert time.monotonic() - start < 1.5


def test_docstring_examples_run():
    for module in (dapo.rewards.math, dapo.rewards.limits, dapo.rewards.runner):
        failed, tried = doctest.testmod(module)
        assert tried > 0 and failed == 0, module.__name__


# --------------------------------------------------------------------------------------------------
# time limits

def test_time_limit_interrupts_and_nests():
    with pytest.raises(RewardTimeout):
        call_with_time_limit(0.2, time.sleep, 5)

    def inner_times_out():
        with pytest.raises(RewardTimeout):
            call_with_time_limit(0.1, time.sleep, 5)
        return "inner done"

    assert call_with_time_limit(2.0, inner_times_out) == "inner done"  # the outer limit survives
    start = time.monotonic()
    with pytest.raises(RewardTimeout, match="took longer than 0.3 s"):  # the outer one, not the inner
        call_with_time_limit(0.3, call_with_time_limit, 10.0, time.sleep, 5)
    assert time.monotonic() - start < 1.0


def test_time_limit_is_not_swallowed_by_except_exception():
    def stubborn():
        try:
            time.sleep(5)
        except Exception:
            return "swallowed"

    with pytest.raises(RewardTimeout):
        call_with_time_limit(0.2, stubborn)


# --------------------------------------------------------------------------------------------------
# return values

@pytest.mark.parametrize("value, expected", [
    (1.0, (1.0, True, "")),
    (0, (0.0, False, "")),
    (0.5, (0.5, True, "")),
    (True, (1.0, True, "")),
    (False, (-1.0, False, "")),
    (MathScore(1.0, True, "4"), (1.0, True, "")),
    (MathScore(-1.0, False, None), (-1.0, False, "")),
    ({"score": 0.25}, (0.25, True, "")),
    ({"score": -1, "acc": False}, (-1.0, False, "")),
    ({"score": 0.0, "correct": True}, (0.0, True, "")),
    (float("nan"), (-1.0, False, "reward/bad_type")),
    (float("inf"), (-1.0, False, "reward/bad_type")),
    (None, (-1.0, False, "reward/bad_type")),
    ("abc", (-1.0, False, "reward/bad_type")),
    ("1.0", (-1.0, False, "reward/bad_type")),
    ([1.0], (-1.0, False, "reward/bad_type")),
    ({"acc": True}, (-1.0, False, "reward/bad_type")),
    ({"score": None}, (-1.0, False, "reward/bad_type")),
])
def test_normalize_reward(value, expected):
    assert normalize_reward(value)[:3] == expected


# --------------------------------------------------------------------------------------------------
# the runner

USER_FNS = textwrap.dedent('''
    import math, os, signal, time

    def echo(response, ground_truth):
        return float(response)

    def pid_after_a_while(response, ground_truth):
        time.sleep(0.6)
        return float(os.getpid())

    def by_source(response, ground_truth, data_source):
        return 1.0 if data_source == ground_truth else -1.0

    def everything(response, ground_truth, **fields):
        return {"score": float(len(fields)), "correct": "level" in fields}

    def misbehave(response, ground_truth):
        if response == "raise":
            raise ValueError("boom")
        if response == "hang":
            time.sleep(60)
        if response == "hang-hard":  # deaf to SIGALRM: only killing the process stops it
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            time.sleep(60)
        if response == "die":
            os._exit(3)
        if response == "oom":
            return len(bytearray(4 << 30))
        if response == "exit":
            raise SystemExit(1)
        return {"nan": math.nan, "inf": math.inf, "none": None, "abc": "abc", "true": True}.get(
            response, 1.0 if response == ground_truth else -1.0)
''')


@pytest.fixture(scope="module")
def fns_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fns") / "user_rewards.py"
    path.write_text(USER_FNS)
    return path


def test_in_process_scores_failures_as_wrong_and_counts_them(fns_file):
    responses = ["7", "raise", "hang", "nan", "inf", "none", "abc", "true", "exit", "8"]
    with RewardRunner(f"{fns_file}:misbehave", workers=0, timeout_s=0.5) as runner:
        start = time.monotonic()
        batch = runner.score(responses, ["7"] * len(responses), [{}] * len(responses))
    assert time.monotonic() - start < 3.0
    assert isinstance(batch, RewardBatch)
    assert batch.scores == [1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0, -1.0]
    assert batch.correct == [True, False, False, False, False, False, False, True, False, False]
    assert batch.stats == {"reward/errors": 2.0, "reward/timeouts": 1.0, "reward/bad_type": 4.0}
    assert any("ValueError: boom" in m for m in batch.messages)


def test_extra_fields_reach_functions_that_ask_for_them(fns_file):
    extras = [{"data_source": "a", "level": 3}, {"data_source": "b"}]
    with RewardRunner(f"{fns_file}:by_source") as runner:
        assert runner.score(["x", "x"], ["a", "a"], extras).scores == [1.0, -1.0]
    with RewardRunner(f"{fns_file}:everything") as runner:
        batch = runner.score(["x", "x"], ["a", "a"], extras)
        assert batch.scores == [2.0, 1.0] and batch.correct == [True, False]
    with RewardRunner(f"{fns_file}:echo") as runner:  # takes two arguments: the fields are not passed
        assert runner.score(["3"], ["a"], extras[:1]).scores == [3.0]
    with RewardRunner("math") as runner:
        batch = runner.score(["Answer: 4", "Answer: 5"], ["4", "4"], extras)
        assert batch.scores == [1.0, -1.0] and batch.stats["reward/errors"] == 0


def test_a_reward_function_the_rows_cannot_call_is_refused_before_any_sample(fns_file, tmp_path):
    """Stop 41 found fn(response) and a function naming a column the file lacks scoring every sample -1 until
    the idle stop; the call every sample makes is checked against each distinct set of columns at start."""
    from dapo.rewards.runner import RewardFnError, check_reward_call

    rows = [{"level": 3, "data_source": ""}, {"data_source": ""}]
    for ok in ("echo", "everything", "misbehave"):  # two arguments, **fields, two arguments
        check_reward_call(f"{fns_file}:{ok}", rows, "f.jsonl")
    check_reward_call(f"{fns_file}:by_source", rows, "f.jsonl")  # data_source is every row's
    check_reward_call("math", [{}], "f.jsonl")
    (tmp_path / "mine.py").write_text("def one(response):\n    return 1.0\n"
                                      "def cols(response, answer, level, extra):\n    return 1.0\n"
                                      "def kwonly(response, answer, *, level):\n    return 1.0\n"
                                      "def default(response, answer, level=0):\n    return 1.0\n")
    with pytest.raises(RewardFnError, match=r"reward.fn=.*mine.py:one: cannot score f.jsonl's rows: too many "
                                            r"positional arguments .*fn\(response, ground_truth, \*\*columns\)"):
        check_reward_call(f"{tmp_path / 'mine.py'}:one", rows, "f.jsonl")
    with pytest.raises(RewardFnError, match=r"missing a required argument: 'extra'.*a row there has the columns "
                                            r"data_source, level\)"):
        check_reward_call(f"{tmp_path / 'mine.py'}:cols", rows, "f.jsonl")
    with pytest.raises(RewardFnError, match=r"missing a required argument: 'level'.*the columns data_source\)"):
        check_reward_call(f"{tmp_path / 'mine.py'}:kwonly", rows, "f.jsonl")  # the second row lacks it
    check_reward_call(f"{tmp_path / 'mine.py'}:default", rows, "f.jsonl")
    check_reward_call(print, rows, "f.jsonl")  # no signature to read: left to the calls


def test_pool_scores_in_parallel_and_in_order(fns_file):
    with RewardRunner(f"{fns_file}:pid_after_a_while", workers=2, timeout_s=5.0) as runner:
        runner.score(["0"] * 2, ["0"] * 2)  # let both workers start
        start = time.monotonic()
        pids = runner.score(["0"] * 4, ["0"] * 4).scores
        elapsed = time.monotonic() - start
    assert len(set(pids)) == 2  # two processes shared the work
    assert elapsed < 2.0  # 4 x 0.6 s in two lanes is 1.2 s; one lane would be 2.4 s

    with RewardRunner(f"{fns_file}:echo", workers=2) as runner:
        n = 500
        batch = runner.score([str(i) for i in range(n)], ["0"] * n)
    assert batch.scores == [float(i) for i in range(n)]


def test_pool_survives_raising_hanging_dying_and_bad_values(fns_file):
    responses = ["7", "raise", "hang", "hang-hard", "die", "oom", "nan", "none", "abc", "7", "6", "7"]
    with RewardRunner(f"{fns_file}:misbehave", workers=2, timeout_s=0.5, memory_mb=2048) as runner:
        runner.score(["7", "7"], ["7", "7"])  # warm start
        start = time.monotonic()
        batch = runner.score(responses, ["7"] * len(responses))
        elapsed = time.monotonic() - start
        assert runner.score(["7", "6"], ["7", "7"]).scores == [1.0, -1.0]  # replaced workers still work
    assert batch.scores == [1.0] + [-1.0] * 8 + [1.0, -1.0, 1.0]
    assert batch.stats == {"reward/errors": 3.0, "reward/timeouts": 2.0, "reward/bad_type": 3.0}
    assert any("died" in m for m in batch.messages) and any("MemoryError" in m for m in batch.messages)
    assert elapsed < 8.0  # 0.5 s soft limit, 1.75 s hard kill, two worker restarts


def test_pool_with_the_builtin_math_verifier():
    long_thought = "Let me think about it once more. " * 2000  # only the tail travels to the workers
    responses = [long_thought + "\nAnswer: 3/4", long_thought + "\nAnswer: 0.75", "Answer: 1,000", "Answer: 7"]
    answers = ["\\frac{3}{4}", "\\frac{3}{4}", "1000", "8"]
    with RewardRunner("math", workers=2) as runner:
        assert runner.score([], []) == RewardBatch([], [], {"reward/errors": 0.0, "reward/timeouts": 0.0,
                                                            "reward/bad_type": 0.0})
        batch = runner.score(responses, answers)
    expected = [1.0, 1.0 if math_verify_available() else -1.0, 1.0, -1.0]
    assert batch.scores == expected and batch.correct == [s > 0 for s in expected]


def test_pool_rejects_what_it_cannot_send_to_a_worker():
    with pytest.raises(RewardFnError, match="picklable"):
        RewardRunner(lambda r, g: 1.0, workers=2)
    with pytest.raises(ValueError, match="workers > 0"):
        RewardRunner("math", workers=0, memory_mb=100)


def test_load_reward_fn_by_name_module_and_file(fns_file, tmp_path):
    assert load_reward_fn("math") is score_math
    assert load_reward_fn("dapo.rewards.math:score_math") is score_math
    assert load_reward_fn(f"{fns_file}:echo")("2.5", "x") == 2.5
    with pytest.raises(RewardFnError, match="'no_such_module_xyz'"):
        load_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(RewardFnError, match=r"no function 'nope'.*defines: .*score_math"):
        load_reward_fn("dapo.rewards.math:nope")
    with pytest.raises(RewardFnError, match="missing_rewards.py' not found"):
        load_reward_fn(f"{tmp_path}/missing_rewards.py:fn")
    with pytest.raises(RewardFnError, match=r"no function 'nope'.*echo"):
        load_reward_fn(f"{fns_file}:nope")
    with pytest.raises(RewardFnError, match="not a built-in"):
        load_reward_fn("mathh")
    with pytest.raises(RewardFnError, match="is a float"):
        load_reward_fn("math:pi")
    with pytest.raises(ValueError, match="one entry each"):
        RewardRunner("math").score(["a"], ["b", "c"])


def test_a_worker_ignores_sigint_from_its_first_instruction(capfd):
    """A terminal's Ctrl-C reaches every process of the group, reward workers still starting included:
    sent right after the spawn (the child is then still importing), it must neither kill the worker nor
    print a KeyboardInterrupt traceback. The parent blocks SIGINT around the spawn so the child starts with
    it blocked, then ignores it before unblocking."""
    import os
    import signal

    with RewardRunner("math", workers=2) as runner:
        for w in runner._pool:  # the processes exist but are nowhere near _worker_main yet
            assert not w.ready
            os.kill(w.proc.pid, signal.SIGINT)
        batch = runner.score(["Answer: 4", "Answer: 5"], ["4", "4"])
        assert batch.scores == [1.0, -1.0] and batch.stats["reward/errors"] == 0.0
        assert all(w.proc.is_alive() for w in runner._pool)
    err = capfd.readouterr().err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# decoding token ids for the reward: in one batch, or in the workers


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """bench/realshape.py's byte-level BPE (Qwen's special tokens at Qwen's ids, ChatML), on a small corpus."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import realshape as rs

    return rs.build_tokenizer(tmp_path_factory.mktemp("bpe"), vocab_size=600, n_docs=200)


def _responses(tok, n_random: int = 6):
    """Token ids (int64 tensors) of chat turns with markers inside and at the end, and random ids over the
    whole vocabulary (special ids and lone bytes of multi-byte characters among them)."""
    import torch

    turns = ["<|im_start|>assistant\nx = 3 + 4 so Answer: 7<|im_end|>", "café 12 ÷ 4 = 3 ✓\n\n<|im_end|><|endoftext|>",
             "<|im_start|><|im_end|>", ""]
    ids = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in turns]
    g = torch.Generator().manual_seed(0)
    ids += [torch.randint(0, len(tok), (int(n),), generator=g) for n in torch.randint(1, 400, (n_random,), generator=g)]
    return ids


def test_response_decoder_gives_the_tokenizers_own_text(bpe_tok):
    from dapo.data.charvocab import make_char_tokenizer
    from dapo.problems import ResponseDecoder

    char = make_char_tokenizer()
    cleaning = make_char_tokenizer()
    cleaning.clean_up_tokenization_spaces = True  # transformers then edits the text: the decoder must keep it
    for tok, fast in ((bpe_tok, True), (char, True), (cleaning, False)):
        dec = ResponseDecoder(tok)
        assert (dec.json is not None) is fast and (dec.backend is not None) is fast
        ids = _responses(tok)
        want = [tok.decode(x, skip_special_tokens=True) for x in ids]
        assert dec.decode(ids) == want
        assert dec.decode([x.tolist() for x in ids]) == want
    assert ResponseDecoder(bpe_tok).decode(_responses(bpe_tok)[:2]) == ["assistant\nx = 3 + 4 so Answer: 7",
                                                                          "café 12 ÷ 4 = 3 ✓\n\n"]
    dots = char("a . b", add_special_tokens=False)["input_ids"]
    assert ResponseDecoder(cleaning).decode([dots]) == ["a. b"] and ResponseDecoder(char).decode([dots]) == ["a . b"]


def test_workers_decode_token_ids_to_the_same_text_and_scores(bpe_tok, fns_file):
    from dapo.problems import ResponseDecoder

    dec = ResponseDecoder(bpe_tok)
    ids = _responses(bpe_tok, n_random=40)
    texts = [bpe_tok.decode(x, skip_special_tokens=True) for x in ids]
    with RewardRunner(f"{fns_file}:misbehave", workers=2, decoder=dec.json) as runner:
        assert runner.decodes
        exact = runner.score_ids(dec.pack(ids), texts)  # correct iff the worker's text is exactly the driver's
        wrong = runner.score_ids(dec.pack(ids[:1]), ["x = 3 + 4 so Answer: 7"])
    assert exact.scores == [1.0] * len(ids) and exact.stats == {ERRORS: 0.0, TIMEOUTS: 0.0, BAD_TYPE: 0.0}
    assert wrong.scores == [-1.0]  # the chat marker is dropped, the "assistant\n" role text is not
    assert dec.pack(ids[:1])[0].dtype.name == "int32"
    assert not RewardRunner(f"{fns_file}:misbehave", workers=0, decoder=dec.json).decodes  # no workers: here


def test_decoding_in_workers_keeps_failures_timeouts_and_crashes_as_they_were(fns_file):
    from dapo.data.charvocab import make_char_tokenizer
    from dapo.problems import ResponseDecoder

    tok = make_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789-")
    dec = ResponseDecoder(tok)
    responses = ["7", "raise", "hang", "die", "nan", "abc", "7", "6"]
    ids = [torch.tensor(tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for r in responses]
    with RewardRunner(f"{fns_file}:misbehave", workers=2, timeout_s=0.5, decoder=dec.json) as runner:
        by_ids = runner.score_ids(dec.pack(ids), ["7"] * len(ids))
        by_text = runner.score(dec.decode(ids), ["7"] * len(ids))
    assert by_ids.scores == by_text.scores == [1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0]
    assert by_ids.stats == by_text.stats == {ERRORS: 2.0, TIMEOUTS: 1.0, BAD_TYPE: 2.0}
    assert by_ids.errors == by_text.errors and any("died" in m for m in by_ids.messages)


def test_training_problems_score_token_ids_in_the_reward_workers(bpe_tok, tmp_path):
    import json

    from dapo.config import load_config
    from dapo.problems import load_problems

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {k} + 4?", "answer": str(k + 4)}) + "\n" for k in range(20)))
    cfg = load_config(overrides=[f"data.path={data}", "reward.workers=1", "data.template=none"], notify=lambda s: None)
    probs = load_problems(cfg, bpe_tok, log=lambda s: None)
    try:
        ex = probs.stream.take(1)[0].example
        ids = [torch.tensor(bpe_tok(f"so Answer: {a}<|im_end|>", add_special_tokens=False)["input_ids"]) for a in (ex.answer, "0")]
        assert probs.closers[0].__self__.decodes  # the runner's close: its workers take the ids
        assert probs.score_ids(ids, [ex, ex]).scores == [1.0, -1.0]
    finally:
        probs.close()
