"""``dapo sft --out DIR`` writes a base model and replaces nothing it did not write: a directory holding a user's
files or a run is refused before training, with or without ``--force``; ``--force`` replaces only a dapo base."""
import json

import pytest

from dapo.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--threads", "1", "sft.layers=1", "sft.hidden=32", "sft.ffn=64", "sft.heads=2", "sft.batch=8",
        "sft.min_steps=1", "sft.max_steps=2", "sft.eval_every=1", "eval.size=4"]


def _pairs(path):
    path.write_text("".join(json.dumps({"prompt": f"{a} reversed:", "response": str(a)[::-1]}) + "\n"
                            for a in range(100, 160)))
    return path


@pytest.mark.parametrize("force", [False, True], ids=["plain", "--force"])
def test_an_out_dir_with_a_users_files_or_a_run_is_refused_and_kept(tmp_path, capsys, force):
    data = _pairs(tmp_path / "pairs.jsonl")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    run = tmp_path / "run"
    (run / "step_3").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    for out in (mine, run):
        rc = cli_main(["sft", "--data", str(data), "--out", str(out), *FAST, *(["--force"] if force else [])])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert f"--out {out}: already exists, is not empty and is not a dapo base" in err
    assert (mine / "notes.txt").read_text() == "important"
    assert (run / "step_3").is_dir() and (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not list(tmp_path.glob(".*"))  # no staging directory left behind


def test_an_empty_out_dir_is_filled_and_only_a_base_is_replaced_with_force(tmp_path, capsys):
    data = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "base"
    out.mkdir()
    assert cli_main(["sft", "--data", str(data), "--out", str(out), *FAST]) == 0
    first = json.loads((out / "sft.json").read_text())
    assert first["steps"] == 2 and (out / "config.json").is_file()
    capsys.readouterr()
    assert cli_main(["sft", "--data", str(data), "--out", str(out), *FAST, "sft.max_steps=3"]) == 0  # kept as is
    assert "already holds a base model made from this data; --force rebuilds it" in capsys.readouterr().out
    assert json.loads((out / "sft.json").read_text())["steps"] == 2
    other = _pairs(tmp_path / "other.jsonl")  # another file would have been answered with the first one's base
    assert cli_main(["sft", "--data", str(other), "--out", str(out), *FAST]) == 2
    assert f"already holds a base model made from data {str(data)!r} (its sft.json), not data {str(other)!r}: --force " \
           f"replaces it" in capsys.readouterr().err
    assert json.loads((out / "sft.json").read_text())["steps"] == 2
    assert cli_main(["sft", "--data", str(data), "--out", str(out), *FAST, "sft.max_steps=3", "--force"]) == 0
    assert json.loads((out / "sft.json").read_text())["steps"] == 3


def test_a_base_of_another_task_at_out_is_refused_not_returned(tmp_path, capsys):
    out = tmp_path / "base"
    assert cli_main(["sft", "--task", "addition", "--out", str(out), *FAST]) == 0
    made = (out / "sft.json").read_bytes()
    assert cli_main(["sft", "--task", "addition", "--out", str(out), *FAST]) == 0  # the same: kept as is
    assert cli_main(["sft", "--task", "mult", "--out", str(out), *FAST]) == 2
    assert "made from task 'addition' (its sft.json), not task 'mult'" in capsys.readouterr().err
    assert (out / "sft.json").read_bytes() == made
    assert cli_main(["sft", "--data", str(_pairs(tmp_path / "p.jsonl")), "--out", str(out), *FAST]) == 2
    assert f"made from task 'addition' (its sft.json), not data {str(tmp_path / 'p.jsonl')!r}" in capsys.readouterr().err


def test_a_row_without_a_response_is_named_or_skipped_under_bad_rows(tmp_path, capsys):
    data = _pairs(tmp_path / "pairs.jsonl")
    rows = data.read_text().splitlines()
    rows[4] = json.dumps({"prompt": "104 reversed:", "response": ""})
    data.write_text("\n".join(rows) + "\n")
    assert cli_main(["sft", "--data", str(data), "--out", str(tmp_path / "a"), *FAST]) == 2
    assert (f"{data}: row 5 (line 5): has no response to imitate: sft.response_key 'response' is empty"
            in capsys.readouterr().err)
    assert not (tmp_path / "a").exists()
    assert cli_main(["sft", "--data", str(data), "--out", str(tmp_path / "b"), *FAST, "data.bad_rows=skip"]) == 0
    assert f"{data}: 60 rows, 59 kept (1 bad row skipped, data.bad_rows=skip)\n" in capsys.readouterr().out


def test_a_warm_up_whose_reward_fails_the_datas_own_responses_is_refused_before_training(tmp_path, capsys):
    """Chat rows with an answer column and no --reward: the math verifier (reward.fn=auto) gives -1 to every
    response without a \\boxed{}; the target accuracy could never be met and sft ran to max_steps (stop 41). The
    held-out rows' own responses are scored first: none correct is refused, a ceiling below the target warned."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a} reversed:"},
                                                     {"role": "assistant", "content": str(a)[::-1]}],
                                        "answer": str(a)[::-1]}) + "\n" for a in range(100, 160)))
    assert cli_main(["sft", "--data", str(data), "--out", str(tmp_path / "a"), *FAST]) == 2
    err = capsys.readouterr().err
    assert (f"{data}: none of the 4 held-out rows' own responses scores as correct under reward.fn=auto (the math verifier) (e.g. "
            f"response '") in err and "--target-acc 0 to stop on held-out loss" in err, err
    assert not (tmp_path / "a").exists()
    exact = tmp_path / "exact.py"
    exact.write_text("def score(response, answer):\n    return 1.0 if response.strip() == answer else -1.0\n"
                     "calls = []\n"  # the first response ever scored is correct, no other: a ceiling of 1 in 4
                     "def once(response, answer):\n    calls.append(1)\n    return len(calls) == 1\n")
    assert cli_main(["sft", "--data", str(data), "--out", str(tmp_path / "b"), "--reward", f"{exact}:score",
                     *FAST]) == 0
    assert "held-out rows' own responses" not in capsys.readouterr().out
    assert cli_main(["sft", "--data", str(data), "--out", str(tmp_path / "c"), "--reward", f"{exact}:once",
                     "--target-acc", "0.9", *FAST]) == 0
    assert "warning: only 25% of the held-out rows' own responses score as correct under reward.fn=" in \
        capsys.readouterr().out
    assert cli_main(["sft", "--data", str(data), "--out", str(tmp_path / "d"), "--target-acc", "0", *FAST]) == 0
