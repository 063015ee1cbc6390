"""Bad data files and misbehaving reward functions, end to end through ``dapo train --data FILE
--reward module:fn``: each is a clear error (exit 2) naming the file, row and key, or is skipped and
counted as configured; a reward that raises, hangs, returns NaN / None / a string, exhausts memory or
kills its process scores as wrong, is counted in the step's metrics, and the run goes on."""
import json

import pytest
import torch

import faultkit as fk
from dapo.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = [{"prompt": f"{a}+{a + 1}=", "answer": str(2 * a + 1)} for a in range(10, 40)]


def _jsonl(path, rows, extra_lines=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + extra_lines)
    return path


def _train(tiny_model_dir, tmp_path, data, *extra):
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), f"log.out_dir={tmp_path / 'runs'}",
            "log.run_name=r", "optim.steps=1", "data.template=none", "data.max_prompt_len=32", "eval.size=2",
            *fk.FAST, *extra]
    return cli_main(argv)


# (case, rows, raw bytes appended, extra args, what the error says); every one exits 2
DATA_ERRORS = [
    ("missing prompt", [{"question": "1+1=", "answer": "2"}], b"", [], ["row 31", "prompt key 'prompt' is missing"]),
    ("missing answer", [{"prompt": "1+1="}], b"", [], ["row 31", "answer key 'reward_model.ground_truth' is missing"]),
    ("prompt of the wrong type", [{"prompt": 12, "answer": "2"}], b"", [], ["must be a string or a list of chat"]),
    ("answer of the wrong type", [{"prompt": "1+1=", "answer": ["2"]}], b"", [], ["must be a string or a number"]),
    ("broken chat message", [{"prompt": [{"role": "user"}], "answer": "2"}], b"", [], ["message 0 is not"]),
    ("invalid JSON line", [], b'{"prompt": "1+1=", "answer": \n', [], ["row 31 (line 31)", "not valid JSON"]),
    ("non-UTF-8 bytes", [], b'{"prompt": "caf\xe9", "answer": "1"}\n', [], ["line 31 is not valid UTF-8", "0xe9"]),
    ("every prompt too long", [], b"", ["data.max_prompt_len=3"], ["no prompts left after the length filter"]),
]


@pytest.mark.parametrize("case,rows,raw,extra,says", DATA_ERRORS, ids=[c[0] for c in DATA_ERRORS])
def test_bad_rows_are_errors_naming_file_row_and_key(case, rows, raw, extra, says, tiny_model_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD + rows, raw)
    assert _train(tiny_model_dir, tmp_path, data, *extra) == 2
    err = capsys.readouterr().err
    assert "dapo train: error: " in err and "Traceback" not in err
    for s in says:
        assert s in err, (s, err)
    run = tmp_path / "runs" / "r"
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize("content,says", [(b"", "the dataset is empty"), (b"\n\n", "the dataset is empty"),
                                          (None, "no such file")], ids=["empty file", "blank lines", "no file"])
def test_empty_or_missing_dataset_is_an_error(content, says, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    if content is not None:
        data.write_bytes(content)
    assert _train(tiny_model_dir, tmp_path, data) == 2
    assert says in capsys.readouterr().err


def test_bad_rows_and_long_prompts_are_skipped_and_counted_when_asked(tiny_model_dir, tmp_path, capsys):
    bad = [{"prompt": "", "answer": "1"}, {"prompt": "1+1=", "answer": None}, {"prompt": 3, "answer": "3"}]
    long = [{"prompt": "9" * 40 + "+1=", "answer": "1"}] * 2
    data = _jsonl(tmp_path / "d.jsonl", GOOD + bad + long, b'{"prompt": \n')
    assert _train(tiny_model_dir, tmp_path, data, "data.bad_rows=skip") == 0
    err = capsys.readouterr().err
    assert "kept (4 bad rows skipped, data.bad_rows=skip)" in err and "2 prompts longer than data.max_prompt_len=32 dropped" in err
    assert [r["step"] for r in fk.metrics(tmp_path / "runs" / "r")] == [1]


REWARDS = '''
import math, os, re

def _ok(r):
    return 1.0 if len(r) % 2 else -1.0

def _bad(r):  # about a third of the responses trigger the fault; the rest score by length parity
    return len(r) % 3 == 0

def raises(r, gt):
    if _bad(r):
        raise RuntimeError("verifier crashed")
    return _ok(r)

def hangs(r, gt):
    while _bad(r):
        pass
    return _ok(r)

def hangs_in_c(r, gt):  # a catastrophic regex: C code that no signal interrupts
    if _bad(r):
        re.match(r"(a+)+$", "a" * 64 + "b")
    return _ok(r)

def nan(r, gt):
    return float("nan") if _bad(r) else _ok(r)

def none(r, gt):
    return None if _bad(r) else _ok(r)

def string(r, gt):
    return "1.0" if _bad(r) else _ok(r)

def hog(r, gt):
    if _bad(r):
        return len(bytearray(6 * 2**30))
    return _ok(r)

def dies(r, gt):
    if _bad(r):
        os._exit(3)
    return _ok(r)
'''

# (function, extra args, the metric that counts it)
REWARD_FAULTS = [
    ("raises", [], "reward/errors"),
    ("hangs", ["reward.timeout_s=0.2"], "reward/timeouts"),
    ("nan", [], "reward/bad_type"),
    ("none", [], "reward/bad_type"),
    ("string", [], "reward/bad_type"),
    ("hangs_in_c", ["reward.workers=1", "reward.timeout_s=0.2"], "reward/timeouts"),
    ("hog", ["reward.workers=1", "reward.memory_mb=2048"], "reward/errors"),  # MemoryError in the worker
    ("dies", ["reward.workers=1"], "reward/errors"),
]


@pytest.mark.parametrize("fn,extra,metric", REWARD_FAULTS, ids=[c[0] for c in REWARD_FAULTS])
def test_a_misbehaving_reward_scores_wrong_is_counted_and_the_run_goes_on(fn, extra, metric, tiny_model_dir, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    assert _train(tiny_model_dir, tmp_path, data, "--reward", f"{tmp_path / 'rewards.py'}:{fn}", *extra) == 0
    (row,) = fk.metrics(tmp_path / "runs" / "r")
    assert row[metric] > 0, row
    assert row.get("actor/skipped_updates", 0) == 0  # nothing non-finite reached the update


@pytest.mark.parametrize("spec,says", [
    ("rewards.py:nope", "has no function 'nope'"),
    ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
    ("rewards:score", "rewards.py is in the working directory, which the dapo command does not import from: name "
                      "the file instead: rewards.py:score"),
    ("missing.py:score", "not found"),
    ("score", "not a built-in"),
], ids=["no such function", "no such module", "a file in the cwd named as a module", "no such file",
        "not module:function"])
def test_a_reward_that_cannot_be_loaded_is_a_clear_error(spec, says, tiny_model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    assert _train(tiny_model_dir, tmp_path, _jsonl(tmp_path / "d.jsonl", GOOD), "--reward", spec) == 2
    assert says in capsys.readouterr().err


BROKEN = {
    "syntax.py": "def score(response, ground_truth:\n    return 1.0\n",
    "needs.py": "import math\nimport no_such_dependency_xyz\n\ndef score(response, ground_truth):\n    return 1.0\n",
    "raises.py": "LIMIT = {}['limit']\n\ndef score(response, ground_truth):\n    return 1.0\n",
}


@pytest.mark.parametrize("spec,says", [
    ("syntax.py:score", "SyntaxError at {d}/syntax.py, line 1: '(' was never closed: def score(response, ground_truth:"),
    ("needs.py:score", "ModuleNotFoundError: No module named 'no_such_dependency_xyz' at {d}/needs.py, line 2: "
                       "import no_such_dependency_xyz"),
    ("raises.py:score", "KeyError: 'limit' at {d}/raises.py, line 1: LIMIT = {{}}['limit']"),
    ("needs:score", "importing module 'needs' ('needs:score') failed: ModuleNotFoundError: No module named "
                    "'no_such_dependency_xyz' at {d}/needs.py, line 2"),
], ids=["syntax error", "missing dependency", "raises on import", "module with a missing dependency"])
def test_a_reward_file_that_fails_to_import_names_its_line_not_a_traceback(spec, says, tiny_model_dir, tmp_path,
                                                                            capsys, monkeypatch):
    for name, text in BROKEN.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _train(tiny_model_dir, tmp_path, _jsonl(tmp_path / "d.jsonl", GOOD), "--reward", spec) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and says.format(d=tmp_path.resolve()) in err, err
    if spec.endswith(".py:score"):
        assert f"reward function: importing '{tmp_path.resolve() / spec.split(':')[0]}' failed" in err


def test_a_tools_file_with_a_syntax_error_is_refused_at_start(tiny_model_dir, tmp_path, capsys):
    tools = tmp_path / "tools.py"
    tools.write_text("def mul(a, b)\n    return a * b\n")
    rc = _train(tiny_model_dir, tmp_path, _jsonl(tmp_path / "d.jsonl", GOOD), "--tools", str(tools))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"env.tools: importing '{tools.resolve()}' failed: SyntaxError at {tools.resolve()}, line 1: expected ':'" in err


def test_a_reward_for_the_built_in_task_is_refused_not_ignored(tiny_model_dir, tmp_path, capsys):
    rc = cli_main(["train", "--model", str(tiny_model_dir), "--reward", "math", f"log.out_dir={tmp_path}", *fk.FAST])
    assert rc == 2 and "reward.fn: 'math' scores prompt files" in capsys.readouterr().err


def _gpt2(path, n_positions):
    """A tiny GPT-2 (learned position embeddings: a sequence past ``n_positions`` indexes off the table) with the
    project's character tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dapo.data.charvocab import make_char_tokenizer

    tok = make_char_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_prompts_past_a_learned_position_table_are_refused_at_start_and_fit_with_the_key_it_names(tmp_path, capsys):
    from dapo.model import model_context

    model = _gpt2(tmp_path / "gpt2", n_positions=40)
    assert model_context(str(model)) == (40, True)
    rows = [{"prompt": "1" * n + "+1=", "answer": "2"} for n in (10, 20, 30, 40)] * 3  # 13-43 characters
    data = _jsonl(tmp_path / "d.jsonl", rows)
    argv = ["train", "--model", str(model), "--data", str(data), f"log.out_dir={tmp_path / 'runs'}", "optim.steps=1",
            "data.template=none", "eval.size=2", *fk.FAST]
    assert cli_main([*argv, "log.run_name=long"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert ("the longest prompt (43 tokens) + rollout.max_new_tokens (8) = 51 positions, but the model has learned "
            "position embeddings for 40 (its config.json): set data.max_prompt_len=32 (6 of the 12 prompts fit; the "
            "longer are dropped or truncated, data.long_prompts)\n") in err, err
    # what it names always fits: no max_prompt_len that keeps no prompt, no new-token count of 0 or less
    assert cli_main([*argv, "log.run_name=long", "rollout.max_new_tokens=36"]) == 2
    assert ("rollout.max_new_tokens (36) = 79 positions, but the model has learned position embeddings for 40 (its "
            "config.json): set data.max_prompt_len=13 and rollout.max_new_tokens=27 (3 of the 12 prompts fit)\n"
            ) in capsys.readouterr().err
    short = _jsonl(tmp_path / "short.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(10, 22)])
    assert cli_main([*argv, "log.run_name=long", "--data", str(short), "rollout.max_new_tokens=40"]) == 2
    assert ("the longest prompt (5 tokens) + rollout.max_new_tokens (40) = 45 positions, but the model has learned "
            "position embeddings for 40 (its config.json): lower rollout.max_new_tokens to 35\n"
            ) in capsys.readouterr().err
    assert cli_main([*argv, "log.run_name=long", "--data", str(short), "--tools", "calculator",
                     "rollout.max_total_tokens=60"]) == 2
    assert ("the longest prompt (5 tokens) + rollout.max_total_tokens (60) = 65 positions, but the model has learned "
            "position embeddings for 40 (its config.json): lower rollout.max_total_tokens to 35, or set "
            "rollout.max_total_tokens=0 (each trajectory then ends at the model's positions)\n"
            ) in capsys.readouterr().err
    assert not (tmp_path / "runs" / "long" / "step_1").exists()
    assert cli_main([*argv, "log.run_name=fits", "data.max_prompt_len=32"]) == 0  # the longer prompts dropped
    assert "prompts longer than data.max_prompt_len=32 dropped" in capsys.readouterr().err
    assert (tmp_path / "runs" / "fits" / "metrics.jsonl").is_file()


def test_a_rotary_model_past_its_configured_context_warns_and_runs(tiny_model_dir, tmp_path, capsys):
    from dapo.model import model_context

    assert model_context(str(tiny_model_dir)) == (128, False)  # Qwen2: rotary positions
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1" * 120 + f"+{a}=", "answer": "x"} for a in range(12)])
    assert _train(tiny_model_dir, tmp_path, data, "data.max_prompt_len=200") == 0
    assert ("warning: the longest prompt (124 tokens) + rollout.max_new_tokens (8) = 132 positions, past the 128 the "
            "model was built for") in capsys.readouterr().err


ENV_HEAD = "from dapo.envs import StepResult\n\nclass Env:\n"
BAD_ENVS = {
    "init raises": (ENV_HEAD + "    def __init__(self):\n        self.budget = 1 / 0\n",
                    "env.path: Env() raised: ZeroDivisionError: division by zero at {f}, line 5: self.budget = 1 / 0"),
    "reset raises": (ENV_HEAD + "    def reset(self, row):\n        return row['question']\n",
                     "env.path: Env.reset raised: KeyError: 'question' at {f}, line 5: return row['question']"),
    "reset gives a number": (ENV_HEAD + "    def reset(self, row):\n        return 7\n",
                             "the environment's reset returned int 7, which is neither a string nor a list: a string, chat messages"),
    "nan reward": (ENV_HEAD + "    def reset(self, row):\n        return None\n"
                   "    def step(self, text):\n        return StepResult(reward=float('nan'), done=True)\n",
                   "Env.step returned reward=nan: a finite number or None"),
    "step hangs": ("import threading\n" + ENV_HEAD + "    def reset(self, row):\n        return None\n"
                   "    def step(self, text):\n        threading.Event().wait()\n",
                   "env.path: Env.step did not return within 1 s (env.step_timeout_s): the run stops"),
}


@pytest.mark.parametrize("case, mode", [(c, "sync") for c in BAD_ENVS] + [("step hangs", "async")])
def test_an_environment_that_raises_hangs_or_scores_nan_stops_the_run_naming_it(case, mode, tiny_model_dir, tmp_path,
                                                                                 capsys):
    text, says = BAD_ENVS[case]
    env = tmp_path / "env.py"
    env.write_text(text)
    on = ["dist.async_steps=1", "dist.rollout_workers=1", "reward.workers=1"] if mode == "async" else []  # Ray
    rc = _train(tiny_model_dir, tmp_path, _jsonl(tmp_path / "d.jsonl", GOOD), "--env", f"{env}:Env",
                "rollout.max_turns=2", "env.step_timeout_s=1", *on)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert says.format(f=env.resolve()) in err, err
    assert ":Env's reset(row) may give another, which samples.jsonl shows)" in err  # the start log's prompt is the row's
    # a new run that failed before its first step leaves no directory: the same command, mended, runs again
    assert not (tmp_path / "runs" / "r").exists()


def test_a_run_that_fails_before_its_first_step_keeps_the_users_own_directory_empty(tiny_model_dir, tmp_path,
                                                                                     capsys):
    """The user made runs/r (empty) for the run: a failure at the first rollout leaves it, empty, not removed;
    a failure after a step was logged keeps everything."""
    env = tmp_path / "env.py"
    env.write_text(BAD_ENVS["reset gives a number"][0])
    (tmp_path / "runs" / "r").mkdir(parents=True)
    assert _train(tiny_model_dir, tmp_path, _jsonl(tmp_path / "d.jsonl", GOOD), "--env", f"{env}:Env") == 2
    assert (tmp_path / "runs" / "r").is_dir() and not any((tmp_path / "runs" / "r").iterdir())
    env = tmp_path / "env2.py"  # another file: this process has imported env.py
    env.write_text(ENV_HEAD + "    n = 0\n    def reset(self, row):\n        Env.n += 1\n"
                   "        if Env.n > 40:\n            raise KeyError('late')\n        return None\n"
                   "    def step(self, text):\n        return StepResult(reward=float(len(text) % 2), done=True)\n")
    rc = _train(tiny_model_dir, tmp_path, _jsonl(tmp_path / "d2.jsonl", GOOD), "--env", f"{env}:Env",
                "optim.steps=3", "eval.size=0")
    err = capsys.readouterr().err
    assert rc == 2 and "KeyError: 'late'" in err, err
    metrics = (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) >= 1 and (tmp_path / "runs" / "r" / "config.yaml").is_file()


@pytest.mark.parametrize("template, fits", [("chat", "none"), ("dapo_math+chat", "dapo_math"), ("boxed+chat", "boxed")])
def test_a_chat_template_asked_of_a_tokenizer_without_one_is_refused(template, fits, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(tiny_model_dir).chat_template  # the project's character tokenizer
    rc = _train(tiny_model_dir, tmp_path, _jsonl(tmp_path / "d.jsonl", GOOD), f"data.template={template}")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"data.template={template!r} renders prompts with the tokenizer's chat template" in err
    assert f"set data.template={fits} (or auto)" in err
    assert not (tmp_path / "runs" / "r" / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.parametrize("case", ["missing", "file", "run directory", "no config.json"])
def test_a_model_path_that_is_not_a_model_directory_says_what_it_is(case, tiny_model_dir, tmp_path, capsys):
    """transformers answers these with a message about hub repo ids; dapo says what the local path is."""
    run = tmp_path / "runs" / "old"
    (run / "step_3").mkdir(parents=True)
    (run / "step_12").mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "empty").mkdir()
    model, says = {
        "missing": (tiny_model_dir / "model", f"no such directory (in {tiny_model_dir}: config.json,"),
        "file": (tiny_model_dir / "config.json", "a file, not a model directory"),
        "run directory": (run, f"a run directory, not a model: pass one of its checkpoints, e.g. {run / 'step_12'} "
                               f"(the latest)"),
        "no config.json": (tmp_path / "empty", "no config.json in it: not a Hugging Face model directory"),
    }[case]
    rc = cli_main(["train", "--model", str(model), "--data", str(_jsonl(tmp_path / "d.jsonl", GOOD)),
                   f"log.out_dir={tmp_path / 'runs'}", *fk.FAST])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot load model.path={str(model)!r}: {says}" in err, err


def test_a_tokenizer_directory_keeps_transformers_own_error(tiny_model_dir, tmp_path, capsys):
    """A tokenizer directory needs no config.json: transformers' own load error is what is said."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizerXyz"}')
    rc = cli_main(["train", "--model", str(tiny_model_dir), f"model.tokenizer={tok}", "--data",
                   str(_jsonl(tmp_path / "d.jsonl", GOOD)), f"log.out_dir={tmp_path / 'runs'}", *fk.FAST])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot load model.tokenizer={str(tok)!r}: " in err and "no config.json" not in err, err
