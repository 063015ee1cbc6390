"""The built-in tool task (#26.4): ``mult``'s examples and verifier, the calculator tool, the warm-up's labels
(the model's tokens only), the task's own config keys, and a 2-step ``dapo train`` with and without the tool."""
import doctest
import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RUN
from dapo.cli import main as cli_main
from dapo.config import load_config
from dapo.data.charvocab import make_char_tokenizer
from dapo.data.example import Example
from dapo.data.tasks import TrainStream, eval_examples, get_task
import dapo.envs.calculator
from dapo.envs.calculator import calc, mul
from dapo.envs.tools import ERRORS, call_tool, load_tools, parse_tool_calls
from dapo.warmup.base import task_pairs
from dapo.warmup.sft import IGNORE_INDEX, sft_batch

MULT = get_task("mult")


def test_mult_examples_and_verifier():
    tool = Example("[mul] 347*86=", "29842", fields={"style": "tool"})
    assert MULT.sft_turns(tool) == [("<tool>mul(347,86)</tool>", True), ("<result>29842</result>\n", False),
                                    (":29842", True)]
    assert MULT.sft_turns(Example("[mul] 347*86=", "29842", fields={"style": "direct"})) == [(":29842", True)]
    assert MULT.score(":29842", "29842") == (1.0, True)
    assert MULT.score(":29843", "29842") == (-1.0, False)
    assert MULT.score("<tool>mul(347,86)</tool>", "29842") == (-1.0, False)  # a call is no answer
    assert MULT.score(MULT.sft_response(tool), "29842") == (1.0, True)
    exs = TrainStream(MULT, 0).take(400)
    for e in exs:
        a, b = e.fields["a"], e.fields["b"]
        assert e.prompt == f"[mul] {a}*{b}=" and e.answer == str(a * b) and 100 <= a <= 9999
        assert (b in (1, 10, 100)) if e.data_source == "mult/easy" else (e.data_source == "mult/hard" and 10 <= b <= 999)
        model_chars = sum(len(t) + 1 for t, mine in MULT.sft_turns(e) if mine) - 1  # every eos but the last
        assert model_chars <= MULT.max_response_len
    kinds, styles = Counter(e.data_source for e in exs), Counter(e.fields["style"] for e in exs)
    assert 60 < kinds["mult/easy"] < 140 and 150 < styles["tool"] < 250  # a quarter easy, half with the call
    held = eval_examples(MULT, 0, 32)
    assert not {e.prompt for e in held} & {e.prompt for e in exs}


def test_calculator_is_exact_and_runs_no_code():
    assert mul(347, 86) == "29842" and mul(9999, 999) == "9989001" and mul(-12, 0.5) == "-6"
    assert calc("2*(3+4) - 1") == "13" and calc("7/2") == "3.5" and calc("1/3") == "0.333333333333"
    assert calc("2**64") == "18446744073709551616" and calc("-7 // 2") == "-4" and calc("0.1 + 0.2") == "0.3"
    for bad, err in [("__import__('os').system('true')", ValueError), ("x + 1", ValueError), ("9**9**9", ValueError),
                     ("1/0", ZeroDivisionError), ("'a' * 3", TypeError), ("10**99 * 10", ValueError)]:
        with pytest.raises(err):
            calc(bad)
    with pytest.raises(TypeError):
        mul(True, 2)
    assert doctest.testmod(dapo.envs.calculator).failed == 0
    tools = load_tools("calculator")
    assert sorted(tools) == ["calc", "mul"]
    text, kind = call_tool(tools, parse_tool_calls("<tool>mul(347,86)</tool>")[0], 5.0, 1000)
    # the warm-up's observation is exactly what the tool environment appends after this call
    assert (f"<result>{text}</result>\n", kind) == (MULT.sft_turns(Example("[mul] 347*86=", "29842", fields={"style": "tool"}))[1][0], "")
    text, kind = call_tool(tools, parse_tool_calls('<tool>calc("open(1)")</tool>')[0], 5.0, 1000)
    assert kind == ERRORS and text.startswith("error: calc raised ValueError")
    with pytest.raises(FileNotFoundError, match="calculator"):
        load_tools("no_such_tools.py")


def test_sft_labels_are_the_models_tokens_only():
    tok = make_char_tokenizer()
    pairs = task_pairs(MULT, tok, 0)(40)
    exs = TrainStream(MULT, 0).take(40)
    eos = tok.eos_token_id
    seen = set()
    for e, pair in zip(exs, pairs):
        a, b = e.fields["a"], e.fields["b"]
        p = a * b
        ids, labels = sft_batch([pair], tok.pad_token_id)  # (1, L) each
        resp = slice(len(pair[0]), len(pair[0]) + len(pair[1]))
        trained = [int(t) for t in labels[0, resp] if t != IGNORE_INDEX]
        context = [int(t) for t, l in zip(ids[0, resp], labels[0, resp]) if l == IGNORE_INDEX]
        assert (labels[0, : len(pair[0])] == IGNORE_INDEX).all()
        if e.fields["style"] == "tool":
            assert trained == tok(f"<tool>mul({a},{b})</tool>")["input_ids"] + [eos] + tok(f":{p}")["input_ids"] + [eos]
            assert context == tok(f"<result>{p}</result>\n")["input_ids"]
        else:
            assert len(pair) == 2 and trained == tok(f":{p}")["input_ids"] + [eos] and context == []
        seen.add(e.fields["style"])
    assert seen == {"tool", "direct"}


def test_task_config_keys():
    assert load_config().rollout.max_new_tokens == 24  # other tasks keep the default
    cfg = load_config(overrides=["data.task=mult"])
    assert cfg.rollout.max_new_tokens == 48 >= MULT.max_response_len + 1
    assert load_config(overrides=["data.task=mult", "rollout.max_new_tokens=40"]).rollout.max_new_tokens == 40
    assert load_config(overrides=["data.task=mult", "data.path=x.jsonl"]).rollout.max_new_tokens == 24


def test_train_on_mult_with_and_without_the_tool(tmp_path, one_thread, capsys):
    base = tmp_path / "base"
    assert cli_main(["sft", "--task", "mult", "--out", str(base), "--threads", "1", "sft.max_steps=40", "sft.batch=32",
                     "sft.layers=2", "sft.hidden=64", "sft.heads=2", "sft.ffn=128", "sft.n_probe=8", "sft.eval_every=40",
                     "sft.min_steps=40", "sft.lr=1e-2"]) == 0
    info = json.loads((base / "sft.json").read_text())
    assert info["steps"] == 40 and info["task"] == "mult"
    common = ["--model", str(base), "data.task=mult", *TINY_RUN, "rollout.max_new_tokens=48", "algo.overlong_cache_len=4",
              "optim.steps=2", "algo.dynamic_sampling=false", "eval.size=4", "env.workers=1", "log.samples_every=1", f"log.out_dir={tmp_path}"]
    capsys.readouterr()
    assert cli_main(["train", *common, "--tools", "calculator", "rollout.max_turns=2", "log.run_name=tool"]) == 0
    positions = json.loads((base / "config.json").read_text())["max_position_embeddings"]
    assert (f"multi-turn: each trajectory may hold up to {positions} tokens (prompt, turns and observations together): "
            f"the model's context (its config.json), since rollout.max_total_tokens=0; one that would run past it ends "
            f"there as 'length', which the overlong filter drops; set rollout.max_total_tokens to allow more"
            in capsys.readouterr().err)
    m = [json.loads(x) for x in (tmp_path / "tool" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == [1, 2]
    assert sum(r["tool/calls"] for r in m) > 0 and all(r["env/turns_mean"] >= 1 for r in m)
    assert any(0 < r["env/obs_frac"] < 1 for r in m)
    summary = json.loads((tmp_path / "tool" / "summary.json").read_text())
    assert {"turns_mean", "tool_calls_mean"} <= set(summary["before"])
    samples = [json.loads(x) for x in (tmp_path / "tool" / "samples.jsonl").read_text().splitlines()]
    assert any("<result>" in json.dumps(s) for s in samples)
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(tmp_path / "tool" / "step_2" / "model.safetensors"))
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2

    assert cli_main(["train", *common, "log.run_name=plain"]) == 0  # the baseline: the same task, no tool
    m = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == [1, 2] and not any("tool/calls" in r or "env/turns_mean" in r for r in m)
