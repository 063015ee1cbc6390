"""A user's own task on the defaults: their file (own column names), their reward, a base made by
``dapo sft --data``, then ``dapo train`` with no template key: the template is chosen from what the run
knows, printed with the first prompt as the model sees it, and held-out accuracy rises. A run that cannot
learn says why and stops; a reward function's errors reach the log and samples.jsonl."""
import json
import random
import tomllib
from pathlib import Path

import pytest

from conftest import TINY_RUN
from dapo.cli import main as cli_main
from dapo.config import load_config
from dapo.problems import TEMPLATE_FILE, choose_template, save_template

REPO = Path(__file__).resolve().parents[1]
REVERSE_REWARD = "def score(response, ground_truth, n=None, **fields):\n    return 1.0 if response.strip() == ground_truth else -1.0\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _reverse_task(path: Path, n: int = 3000) -> None:
    """Reverse a list of 2-4 digits: "6 0 4 reversed:" -> "4 0 6" (spaces matter: a char tokenizer that
    dropped them could never be right)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            xs = [str(rng.randint(0, 9)) for _ in range(rng.randint(2, 4))]
            out = " ".join(reversed(xs))
            f.write(json.dumps({"question": " ".join(xs) + " reversed:", "solution": out, "target": out,
                                "n": len(xs)}) + "\n")


def test_own_task_sft_then_train_on_the_defaults(tmp_path, capsys):
    data, reward = tmp_path / "rev.jsonl", tmp_path / "rev_reward.py"
    _reverse_task(data)
    reward.write_text(REVERSE_REWARD)
    keys = ["--data", str(data), "--reward", f"{reward}:score", "data.prompt_key=question", "data.answer_key=target",
            "eval.size=64", "rollout.max_new_tokens=12"]
    base = tmp_path / "base"
    # --threads 1: the warm-up's default thread count follows the machine's idle cores, and another count
    # rounds differently (a different base)
    assert cli_main(["sft", *keys, "--out", str(base), "--threads", "1", "sft.response_key=solution", "sft.layers=2", "sft.hidden=64",
                     "sft.ffn=128", "sft.heads=2", "sft.batch=32", "sft.min_steps=20", "sft.eval_every=10"]) == 0
    assert json.loads((base / TEMPLATE_FILE).read_text()) == {"template": "none"}
    assert json.loads((base / "sft.json").read_text())["stopped"] == "target"
    capsys.readouterr()
    assert cli_main(["train", "--model", str(base), *keys, "optim.steps=30", "optim.lr=1e-3", "eval.k=4",
                     "algo.overlong_cache_len=4", f"log.out_dir={tmp_path}", "log.run_name=r", "log.report=false"]) == 0
    err = capsys.readouterr().err
    # the template, and the first prompt decoded from the ids the model gets: spaces and all
    assert "prompt template: none (auto: the template" in err
    assert "the first training prompt, decoded from its token ids: '" in err
    first = err.split("decoded from its token ids: '")[1].split("'")[0]
    assert first.endswith(" reversed:") and " " in first.removesuffix(" reversed:")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    before, after = summary["before"]["accuracy"], summary["after"]["accuracy"]
    assert 0.1 < before < 0.5 and after >= before + 0.05, (before, after)


def _tok(chat: bool):
    from dapo.data.charvocab import make_char_tokenizer

    tok = make_char_tokenizer()
    if chat:
        tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    return tok


@pytest.mark.parametrize("reward,chat,template", [
    ("auto", False, "dapo_math"), ("math", True, "dapo_math+chat"),
    ("my.py:score", False, "none"), ("my.py:score", True, "chat"),
])
def test_template_auto_follows_the_reward_and_the_tokenizer(reward, chat, template):
    cfg = load_config(overrides=["data.path=x.jsonl", f"reward.fn={reward}"])
    assert choose_template(cfg, _tok(chat))[0] == template


def test_template_auto_keeps_the_models_own_and_an_explicit_one_wins(tmp_path):
    save_template(tmp_path, "boxed")
    cfg = load_config(overrides=["data.path=x.jsonl", f"model.path={tmp_path}"])
    assert choose_template(cfg, _tok(True)) == ("boxed", f"auto: the template {tmp_path} was trained with "
                                                         f"(its {TEMPLATE_FILE})")
    cfg = load_config(overrides=["data.path=x.jsonl", f"model.path={tmp_path}", "data.template=none"])
    assert choose_template(cfg, _tok(True))[0] == "none"


def _numbers_file(path: Path) -> None:
    path.write_text("".join(json.dumps({"q": f"{a}+{a}=", "a": str(2 * a)}) + "\n" for a in range(10, 60)))


def test_a_run_that_cannot_learn_says_why_and_stops(tiny_model_dir, tmp_path, capsys):
    data, reward = tmp_path / "d.jsonl", tmp_path / "r.py"
    _numbers_file(data)
    reward.write_text("def score(response, ground_truth):\n    return -1.0\n")
    rc = cli_main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--reward", f"{reward}:score",
                   "data.prompt_key=q", "data.answer_key=a", f"log.out_dir={tmp_path}", "log.run_name=idle",
                   "optim.steps=20", "ckpt.every=2", *TINY_RUN])
    err = capsys.readouterr().err
    run = tmp_path / "idle"
    plain = tmp_path / "plain.jsonl"  # answers in a top-level 'answer' column: data.answer_key's fallback
    plain.write_text(data.read_text().replace('"a":', '"answer":'))
    rc0 = cli_main(["train", "--model", str(tiny_model_dir), "--data", str(plain), "--reward", f"{reward}:score",
                    "data.prompt_key=q", f"log.out_dir={tmp_path}", "log.run_name=idle0",
                    "optim.steps=20", "ckpt.every=0", "algo.max_idle_steps=2", *TINY_RUN])
    err0 = capsys.readouterr().err
    assert rc0 == 1 and (f"the run directory {tmp_path / 'idle0'} holds no checkpoint (ckpt.every=0: only the last "
                         f"step saves one)") in err0
    assert "the answer column (the file's 'answer' column: it has no data.answer_key=reward_model.ground_truth)" in err0
    assert rc == 1 and "Traceback" not in err
    assert err.count("no group with mixed outcomes to train on (0% of") == 5  # the evidence, every idle step
    assert "e.g. prompt '" in err and "(answer '" in err
    msg = err.split("dapo train: error: ")[1]
    for cause in ("5 steps in a row", "data.template: none", f"reward.fn={reward}:score", "data.answer_key=a",
                  "rollout.max_new_tokens", str(run)):
        assert cause in msg, cause
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in run.glob("step_*")) == ["step_2", "step_4"]  # the checkpoints are kept
    assert f"the run directory {run} keeps its last checkpoint, step_4." in msg
    rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {1, 2, 3, 4, 5} and all(r["score"] == -1.0 for r in rows)
    assert not any(r["trained"] for r in rows)


def test_a_run_whose_every_sample_is_correct_stops_as_solved_not_as_a_failure(tiny_model_dir, tmp_path, capsys):
    """Every group all correct for algo.max_idle_steps steps: nothing left to learn, which is success (stop 41 saw
    exit 1 and the wording of a failure): a checkpoint of the last step, the final evaluation, exit 0."""
    data, reward = tmp_path / "d.jsonl", tmp_path / "r.py"
    _numbers_file(data)
    reward.write_text("def score(response, ground_truth):\n    return True\n")
    rc = cli_main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--reward", f"{reward}:score",
                   "data.prompt_key=q", "data.answer_key=a", f"log.out_dir={tmp_path}", "log.run_name=solved",
                   "optim.steps=20", "ckpt.every=0", "algo.max_idle_steps=2", *TINY_RUN])
    out, err = capsys.readouterr()
    assert rc == 0 and "error" not in err, err
    assert ("step 2: every sample of the last step was correct, and 2 steps in a row had no group with mixed "
            "outcomes: the policy solves these prompts") in err
    run = tmp_path / "solved"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in run.glob("step_*")) == ["step_2"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["after"]["accuracy"] == 1.0
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2


def test_reward_errors_reach_the_log_once_and_samples_jsonl(tiny_model_dir, tmp_path, capsys):
    data, reward = tmp_path / "d.jsonl", tmp_path / "r.py"
    _numbers_file(data)
    reward.write_text("def score(response, ground_truth):\n"
                      "    if len(response) % 2:\n        raise ValueError('cannot parse ' + ground_truth[:0] + 'odd')\n"
                      "    return 1.0\n")
    assert cli_main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--reward", f"{reward}:score",
                     "data.prompt_key=q", "data.answer_key=a", f"log.out_dir={tmp_path}", "log.run_name=e",
                     "optim.steps=3", "log.samples_every=1", *TINY_RUN]) == 0
    err = capsys.readouterr().err
    assert err.count("raised ValueError: cannot parse odd (scored as wrong)") == 1
    rows = [json.loads(x) for x in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    failed = [r for r in rows if "reward_error" in r]
    assert failed and all(r["reward_error"] == "raised ValueError: cannot parse odd" for r in failed)
    assert all(len(r["response"]) % 2 == 1 and r["score"] == -1.0 for r in failed)
    assert all(len(r["response"]) % 2 == 0 and r["score"] == 1.0 for r in rows if "reward_error" not in r)


def test_math_verify_is_a_default_dependency_and_grades_equivalent_answers():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("math-verify") for d in deps)
    from dapo.rewards import score_math

    for pred, gold in [("Answer: 0.75", "3/4"), ("Answer: 1/2", "0.5"), ("Answer: \\sqrt{12}", "2\\sqrt{3}")]:
        assert score_math(pred, gold).correct, (pred, gold)


def test_a_train_run_writes_its_report_and_a_clean_screen(tiny_model_dir, tmp_path):
    """A real process: what a user sees. No library warning they cannot act on (transformers' deprecations,
    progress bars, a missing optional TensorBoard), and the report's path at the end."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    args = [sys.executable, "-m", "dapo.cli", "train", "--model", str(tiny_model_dir), f"log.out_dir={tmp_path}",
            "log.run_name=r", "optim.steps=2", "algo.filter_metric=reward", *[a for a in TINY_RUN if "tensorboard" not in a]]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    screen = out.stdout + out.stderr
    for noise in ("Warning", "warning", "deprecated", "Writing model shards", "Loading weights", "tensorboard not"):
        assert noise not in screen, (noise, screen)
    report = tmp_path / "r" / "report" / "report.html"
    assert f"report: {report}" in screen and report.is_file()
    assert len(list(report.parent.glob("*.png"))) >= 4
    assert json.loads(out.stdout.strip().splitlines()[-1])["report"] == str(report)


def test_pyproject_license_is_an_spdx_string():
    """setuptools prints a BuildBackendWarning block at every install for a license table."""
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"


def test_the_install_prints_no_build_backend_warning(tmp_path):
    """What `make install` shows a new user: pip's output of building dapo (the build backend, hatchling, is
    in the test extra, so this needs no network)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                          str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stdout + out.stderr.replace("WARNING: Location", "")
