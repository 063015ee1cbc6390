"""Training on a user's files: DAPO-Math-17k Parquet with duplicates, a user reward, periodic eval@k."""
import json
from pathlib import Path

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from conftest import TINY_RUN
from dapo.config import load_config
from dapo.trainer.loop import train

FIXTURE = Path(__file__).parent / "fixtures" / "math_20.jsonl"


def test_dapo_math_parquet_with_duplicates_trains_two_steps(tiny_model_dir, tmp_path, capsys):
    rows = [json.loads(x) for x in FIXTURE.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows * 5), tmp_path / "dapo-math.parquet")  # each prompt 5 times, as published
    reward = tmp_path / "lenreward.py"
    reward.write_text("def score(response, ground_truth, **fields):\n    return 1.0 if len(response) % 2 else -1.0\n")
    cfg = load_config(overrides=[
        *TINY_RUN, f"model.path={tiny_model_dir}", f"data.path={tmp_path / 'dapo-math.parquet'}", "data.dedup=true",
        f"reward.fn={reward}:score", "data.template=none", "data.max_prompt_len=400", "optim.steps=2",
        "eval.every=2", "eval.k=3", f"log.out_dir={tmp_path}", "log.run_name=pq",
    ])
    result = train(cfg)
    assert result.steps == 2
    err = capsys.readouterr().err
    assert "100 rows, 20 kept (80 repeated prompts dropped, data.dedup=true)" in err  # 20 distinct prompts
    rows = [json.loads(x) for x in (tmp_path / "pq" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["batch/groups"] == 4 and rows[0]["actor/updates"] >= 1
    assert 0 < rows[0]["rollout/acc"] < 1  # the user reward was used: parity of the length varies
    assert "eval/avg@3" in rows[1] and "eval/pass@3" in rows[1] and rows[1]["eval/pass@3"] >= rows[1]["eval/avg@3"]
    # the held-out slice (2 of the 20 distinct prompts) is disjoint from training
    assert result.before["n"] == 2


def test_relative_paths_are_saved_absolute_and_resume_from_another_directory(tiny_model_dir, tmp_path, monkeypatch):
    """A run started with paths relative to its working directory resumes from another one: config.yaml names
    the data, the reward file and the model as absolute paths (stop 37 found --resume failing with
    'file not found' on the relative data.path it had saved)."""
    import yaml

    from dapo.cli import main

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "math.jsonl").write_text(FIXTURE.read_text())
    (project / "lenreward.py").write_text("def score(response, ground_truth, **fields):\n"
                                          "    return 1.0 if len(response) % 2 else 0.0\n")
    (project / "base").symlink_to(tiny_model_dir)
    monkeypatch.chdir(project)
    args = [*TINY_RUN, "data.template=none", "data.max_prompt_len=400", "eval.size=2", "eval.every=0",
            f"log.out_dir={tmp_path / 'runs'}", "log.run_name=rel"]
    assert main(["train", "--model", "base", "--data", "data/math.jsonl", "--reward", "lenreward.py:score",
                 "optim.steps=1", *args]) == 0
    saved = yaml.safe_load((tmp_path / "runs" / "rel" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(project / "data" / "math.jsonl")
    assert saved["reward"]["fn"] == f"{project / 'lenreward.py'}:score"
    assert saved["model"]["path"] == str(project / "base")  # the user's spelling, a symlink kept as it is
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(tmp_path / "runs" / "rel"), "optim.steps=2"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "rel" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_a_resume_judges_reward_preset_and_config_file_on_top_of_the_runs_saved_config(tiny_model_dir, tmp_path,
                                                                                       capsys):
    """--reward, --preset and --config on a resume change only what they name: stop 41 found --reward refused as
    if the run had no data file (the override was validated before the saved config was read), and --preset or
    --config starting from the defaults (a data-file run's resume ended in a KeyError; a run's own keys reset)."""
    from dapo.cli import main

    (tmp_path / "math.jsonl").write_text(FIXTURE.read_text())
    for name, odd in (("a", 1), ("b", 0)):
        (tmp_path / f"{name}.py").write_text(f"def score(response, ground_truth):\n"
                                             f"    return 1.0 if len(response) % 2 == {odd} else -1.0\n")
    run = tmp_path / "runs" / "r"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "math.jsonl"), "--reward",
                 f"{tmp_path / 'a.py'}:score", *TINY_RUN, "data.template=none", "data.max_prompt_len=400",
                 "eval.size=2", "eval.every=0", "optim.steps=1", f"log.out_dir={tmp_path / 'runs'}",
                 "log.run_name=r"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--reward", f"{tmp_path / 'b.py'}:score", "optim.steps=2"]) == 0
    err = capsys.readouterr().err
    assert (f"resumed with 2 changed key(s): reward.fn: '{tmp_path / 'a.py'}:score' -> '{tmp_path / 'b.py'}:score'; "
            f"optim.steps: 1 -> 2;") in err, err
    assert main(["train", "--resume", str(run), "--preset", "grpo", "optim.steps=3"]) == 0
    err = capsys.readouterr().err
    assert ("resumed with 7 changed key(s): preset: 'dapo' -> 'grpo'; algo.eps_high: 0.28 -> 0.2; algo.loss_agg: "
            "'token-mean' -> 'seq-mean-token-mean'; algo.dynamic_sampling: True -> False; algo.overlong_filter: True "
            "-> False; algo.soft_overlong: True -> False; optim.steps: 2 -> 3;") in err, err  # eval.size stays 2
    (tmp_path / "more.yaml").write_text("optim:\n  steps: 4\nalgo:\n  eps_high: 0.25\n")
    assert main(["train", "--config", str(tmp_path / "more.yaml"), f"ckpt.resume={run}"]) == 0
    err = capsys.readouterr().err
    assert "resumed with 2 changed key(s): algo.eps_high: 0.2 -> 0.25; optim.steps: 3 -> 4;" in err, err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_a_file_too_small_to_hold_rows_out_says_so_and_writes_standard_json(tiny_model_dir, tmp_path, capsys):
    """Under 10 rows nothing is held out: the run says why at the start and summary.json (and the line on stdout)
    hold null, which strict JSON parsers read, instead of Python's NaN token."""
    from dapo.cli import main

    rows = [json.loads(x) for x in FIXTURE.read_text().splitlines()][:8]
    data = tmp_path / "eight.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), *TINY_RUN, "data.template=none",
                 "data.max_prompt_len=400", "optim.steps=1", "eval.every=1", f"log.out_dir={tmp_path}",
                 "log.run_name=small"]) == 0
    out, err = capsys.readouterr()
    assert f"no held-out problems ({data} has 8 rows" in err and "set eval.path=FILE" in err
    assert "held-out accuracy" not in err

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    assert strict(out.strip().splitlines()[-1])["before"] is None
    summary = strict((tmp_path / "small" / "summary.json").read_text())
    assert summary["before"] == summary["after"] == {"accuracy": None, "n": 0, "k": 1}
    logged = [json.loads(x) for x in (tmp_path / "small" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1] and not any(k.startswith("eval/") for k in logged[0])


def test_a_reward_gets_every_column_of_the_row_the_prompts_too(tiny_model_dir, tmp_path):
    """``fn(response, ground_truth, **row)``: the prompt's column reaches the reward under its own name, as a
    string or as the whole conversation (TRL's reward functions get the prompts too), beside the other columns."""
    from dapo.model import load_tokenizer
    from dapo.problems import load_problems

    conv = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}, {"role": "user", "content": "+1="}]
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "1+2=", "target": "3", "level": 1}) + "\n"
                    + json.dumps({"question": conv, "target": "8", "level": 2}) + "\n")
    reward = tmp_path / "uses_prompt.py"
    reward.write_text("def score(response, ground_truth, question, level):\n"
                      "    text = question if isinstance(question, str) else ' '.join(m['content'] for m in question)\n"
                      "    return {'score': float(len(text) * 10 + level), 'correct': True}\n")
    cfg = load_config(overrides=[f"data.path={data}", "data.prompt_key=question", "data.answer_key=target",
                                 f"reward.fn={reward}:score", "data.template=none", f"model.path={tiny_model_dir}"])
    problems = load_problems(cfg, load_tokenizer(cfg.model, str(tiny_model_dir)), lambda s: None, train=False)
    try:
        examples = [it.example for it in problems.eval_items]
        assert [e.prompt if isinstance(e.prompt, str) else len(e.prompt) for e in examples] == ["1+2=", 3]
        assert problems.score_fn(["x", "x"], examples).scores == [41.0, 2 + 10 * len("3+4= 7 +1=")]
    finally:
        problems.close()


def test_a_reward_function_that_cannot_score_the_rows_is_refused_at_start_by_every_command(tiny_model_dir, tmp_path,
                                                                                          capsys):
    from dapo.cli import main

    (tmp_path / "math.jsonl").write_text(FIXTURE.read_text())
    (tmp_path / "r.py").write_text("def score(response, ground_truth, difficulty):\n    return 1.0\n")
    spec = f"{tmp_path / 'r.py'}:score"
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "response": str(i + 1),
                                                              "answer": str(i + 1)}) + "\n" for i in range(30)))
    capsys.readouterr()
    for argv in (["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "math.jsonl"), "--reward", spec,
                  *TINY_RUN, "data.template=none", "data.max_prompt_len=400", f"log.out_dir={tmp_path / 'runs'}",
                  "log.run_name=r"],
                 ["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "math.jsonl"), "--reward", spec,
                  "--out", str(tmp_path / "e.json")],
                 ["sft", "--model", str(tiny_model_dir), "--data", str(tmp_path / "pairs.jsonl"), "--reward", spec,
                  "--out", str(tmp_path / "base")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        data = argv[argv.index("--data") + 1]
        assert f"reward.fn={spec}: cannot score {data}'s rows: missing a required argument: 'difficulty'" in err \
            and "Traceback" not in err, err
    assert not (tmp_path / "runs" / "r").exists() and not (tmp_path / "e.json").exists()
    assert not (tmp_path / "base").exists()


def test_a_resume_stopped_while_loading_says_how_to_continue_with_its_own_keys(tiny_model_dir, tmp_path, capsys):
    """Ctrl-C while a resume loads (before it saves its config): the hint must repeat the keys the resume
    changed, since config.yaml does not hold them yet (stop 41: the printed command then said 'nothing to do')."""
    import shlex

    from dapo.cli import main

    (tmp_path / "math.jsonl").write_text(FIXTURE.read_text())
    (tmp_path / "a.py").write_text("def score(response, ground_truth):\n    return float(len(response) % 2)\n")
    (tmp_path / "slow.py").write_text("raise KeyboardInterrupt  # the user's Ctrl-C while this file is imported\n")
    run = tmp_path / "runs" / "my run"  # a space: the printed command is quoted for the shell
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "math.jsonl"), "--reward",
                 f"{tmp_path / 'a.py'}:score", *TINY_RUN, "data.template=none", "data.max_prompt_len=400",
                 "eval.size=2", "optim.steps=1", f"log.out_dir={tmp_path / 'runs'}", "log.run_name=my run"]) == 0
    saved = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--reward", f"{tmp_path / 'slow.py'}:score", "optim.steps=3"]) == 130
    err = capsys.readouterr().err
    command = (f"dapo train --resume {shlex.quote(str(run))} reward.fn={tmp_path / 'slow.py'}:score "
               f"optim.steps=3")
    assert f"dapo train: interrupted; {run} keeps its last complete checkpoint, step_1; continue with: {command}" \
        in err, err
    assert (run / "config.yaml").read_bytes() == saved
