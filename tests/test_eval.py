"""dapo eval: the estimators by hand, and avg@k / pass@k / maj@k of a real tiny model recomputed from
the per-sample records evaluate_k returns."""
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from dapo.eval import EVAL_SEED_TAG, _vote, as_metrics, evaluate, format_table, majority_vote, pass_at_k, pass_ks
from dapo.rollout.base import Completion, SamplingParams, derive_seed
from dapo.items import PromptItem
from dapo.rewards import RewardBatch

MATH_20 = Path(__file__).parent / "fixtures" / "math_20.jsonl"

# outcome varies with the sample: correct iff the first character has an even code point
REWARD_PY = '''
def reward(response, ground_truth):
    return bool(response) and ord(response[0]) % 2 == 0
'''


def first_char(text):
    return text[:1] or None


# ------------------------------------------------------------------------------------------ estimators


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2)) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(32, 0, 32) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0 and pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw has a hit
    assert pass_at_k(32, 32, 1) == 1.0
    assert pass_at_k(32, 1, 32) == 1.0 and pass_at_k(32, 1, 1) == pytest.approx(1 / 32)
    # large n stays finite and matches the binomial form
    assert pass_at_k(1024, 3, 16) == pytest.approx(1 - math.comb(1021, 16) / math.comb(1024, 16))
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_ks():
    assert pass_ks(32) == [1, 2, 4, 8, 16, 32] and pass_ks(1) == [1] and pass_ks(12) == [1, 2, 4, 8, 12]


def test_majority_vote_ties_and_missing_answers():
    assert majority_vote(["5", "4", "4"], [False, True, True]) is True
    assert majority_vote(["4", "5", "5"], [True, False, False]) is False
    # ties go to the answer seen first, whichever is right
    assert majority_vote(["a", "b", "b", "a"], [False, True, True, False]) is False
    assert majority_vote(["b", "a", "a", "b"], [True, False, False, True]) is True
    assert _vote(["x", "y", "z"]) == 0 and _vote([None, "y", "z", "z"]) == 2
    # no answer does not vote; no answers at all is wrong
    assert majority_vote([None, None, None, "7"], [False, False, False, True]) is True
    assert majority_vote([None, None], [True, True]) is False
    assert majority_vote([], []) is False


# ------------------------------------------------------------------------------------------ evaluate_k


class SeedEchoEngine:
    """A fake engine whose sample is a pure function of its seed: shows which seed each sample got."""

    def __init__(self, max_batch):
        self.max_batch = max_batch

    def generate(self, prompts, params, seeds):
        out = []
        for i, s in enumerate(seeds):
            for j in range(params.n):
                x = derive_seed(s, j)
                out.append(Completion(i, [x % 7, (x >> 8) % 7], [0.0, 0.0], "stop"))
        return out


def _fake_items(n):
    from dapo.data.example import Example

    return [PromptItem(-1 - i, Example(f"q{i}", str(i % 7), "src_a" if i % 3 else "src_b"), [1, 2, 3]) for i in range(n)]


def _fake_score(texts, exs):
    correct = [t[0] == e.answer for t, e in zip(texts, exs)]
    return RewardBatch([1.0 if c else -1.0 for c in correct], correct, {"reward/errors": 0.0})


def test_samples_depend_on_problem_index_not_on_batching():
    items = _fake_items(10)
    decode = lambda ids: "".join(map(str, ids))  # noqa: E731
    runs = [evaluate(SeedEchoEngine(mb), items[:n], _fake_score, decode, SamplingParams(n=4), 3)
            for mb, n in [(4, 10), (1000, 10), (8, 6)]]
    resp = [[s["response"] for s in r["samples"]] for r in runs]
    assert resp[0] == resp[1] and resp[2] == resp[0][: 6 * 4]
    # problem i, sample j was seeded from derive_seed(seed, EVAL_SEED_TAG, i), j
    x = derive_seed(derive_seed(3, EVAL_SEED_TAG, 5), 2)
    assert resp[0][5 * 4 + 2] == f"{x % 7}{(x >> 8) % 7}"
    assert set(runs[0]["by_source"]) == {"src_a", "src_b"}
    assert sum(m["problems"] for m in runs[0]["by_source"].values()) == 10


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    from dapo.config import Config
    from dapo.rollout.hf import HFEngine
    from dapo.model import eos_ids, load_model, load_tokenizer

    import torch

    model = load_model(Config().model, str(tiny_model_dir), torch.device("cpu"))
    tok = load_tokenizer(Config().model, str(tiny_model_dir))
    return HFEngine(model, tok.pad_token_id, eos_ids(model, tok), max_batch=64), tok


def _expected(problems_samples, k):
    """avg@k, pass@j, maj@k from per-sample records, by hand."""
    by_problem = {}
    for s in problems_samples:
        by_problem.setdefault(s["problem"], []).append(s)
    avg = sum(s["correct"] for s in problems_samples) / len(problems_samples)
    pass_j = {}
    for j in pass_ks(k):
        vals = []
        for recs in by_problem.values():
            n, c = len(recs), sum(r["correct"] for r in recs)
            vals.append(1.0 - math.comb(n - c, j) / math.comb(n, j))
        pass_j[j] = sum(vals) / len(vals)
    maj = []
    for recs in by_problem.values():
        counts = Counter(r["pred"] for r in recs if r["pred"] is not None)
        if not counts:
            maj.append(False)
            continue
        top = max(counts.values())
        winner = next(r for r in recs if counts.get(r["pred"]) == top)  # ties: the first seen
        maj.append(winner["correct"])
    return avg, pass_j, sum(maj) / len(maj), by_problem


def test_evaluate_k_on_math_20_matches_hand_computation(tiny_engine, tmp_path):
    from dapo.data.files import load_examples
    from dapo.data.templates import render_prompt
    from dapo.rewards import RewardRunner

    engine, tok = tiny_engine
    (tmp_path / "my_reward.py").write_text(REWARD_PY)
    exs, _ = load_examples(MATH_20)
    items = [PromptItem(-1 - i, e, tok(render_prompt(e, "dapo_math"))["input_ids"]) for i, e in enumerate(exs)]
    runner = RewardRunner(f"{tmp_path / 'my_reward.py'}:reward")

    def score_fn(texts, examples):
        return runner.score(texts, [e.answer for e in examples])

    k = 4
    # top-k 3 and short responses: few distinct first characters, so votes collide and tie
    params = SamplingParams(n=k, max_new_tokens=3, temperature=1.0, top_k=3)
    seen = []
    res = evaluate(engine, items, score_fn, lambda ids: tok.decode(ids, skip_special_tokens=True), params, seed=1,
                   extract=first_char, progress=lambda d, t, a: seen.append((d, t)))
    assert seen[-1] == (20, 20)
    samples, problems = res["samples"], res["problems"]
    assert len(samples) == 20 * k and len(problems) == 20
    for s in samples:  # the records are what the reward and extractor say about the response
        assert s["correct"] == (bool(s["response"]) and ord(s["response"][0]) % 2 == 0)
        assert s["pred"] == first_char(s["response"])
    avg, pass_j, maj, by_problem = _expected(samples, k)
    m = res["metrics"]
    assert m["problems"] == 20
    assert m[f"avg@{k}"] == pytest.approx(avg) and m["pass@1"] == pytest.approx(avg)
    for j, v in pass_j.items():
        assert m[f"pass@{j}"] == pytest.approx(v), j
    assert m[f"maj@{k}"] == pytest.approx(maj)
    for p in problems:
        assert p["c"] == sum(r["correct"] for r in by_problem[p["problem"]])
    # the outcome really varies, so pass@k, avg@k and maj@k are not trivially equal
    assert any(0 < p["c"] < k for p in problems)
    assert 0 < avg < m[f"pass@{k}"] <= 1
    # per data_source: the same computation on each source's records
    assert set(res["by_source"]) == {"synthetic_a", "synthetic_b"}
    for src, sm in res["by_source"].items():
        a, pj, mj, _ = _expected([s for s in samples if s["data_source"] == src], k)
        assert sm["problems"] == 10
        assert sm[f"avg@{k}"] == pytest.approx(a) and sm[f"maj@{k}"] == pytest.approx(mj)
        assert sm[f"pass@{k}"] == pytest.approx(pj[k])
    flat = as_metrics(res)
    assert flat[f"eval/avg@{k}"] == pytest.approx(avg) and f"eval/maj@{k}" in flat
    table = format_table(res)
    assert "synthetic_a" in table and f"pass@{k}" in table and f"{avg:.3f}" in table


# ------------------------------------------------------------------------------------------ the command


def test_cli_on_jsonl_with_user_reward(tiny_model_dir, tmp_path, capsys):
    from dapo.eval import main

    (tmp_path / "my_reward.py").write_text(REWARD_PY)
    out = tmp_path / "res.json"
    rc = main(["--model", str(tiny_model_dir), "--data", str(MATH_20), "--k", "3", "--max-new-tokens", "2",
               "--reward", f"{tmp_path / 'my_reward.py'}:reward", "--out", str(out), "--limit", "6", "--progress", "plain"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "avg@3" in cap.out and "pass@3" in cap.out and "maj@3" in cap.out and str(out) in cap.out
    assert "6/6 problems" in cap.err
    res = json.loads(out.read_text())
    # eval.top_p's default; template auto with a user's reward and no chat template: the prompt as it is
    assert res["settings"]["top_p"] == 1.0 and res["settings"]["template"] == "none"
    assert len(res["samples"]) == 6 * 3
    avg, pass_j, maj, _ = _expected(res["samples"], 3)
    assert res["metrics"]["avg@3"] == pytest.approx(avg) and res["metrics"]["pass@3"] == pytest.approx(pass_j[3])
    assert res["metrics"]["maj@3"] == pytest.approx(maj)


def test_maj_at_1_is_avg_at_1_under_a_users_reward_whose_answers_have_no_format(tiny_model_dir, tmp_path):
    """A user's reward: dapo cannot read an answer out of the response, so the whole (whitespace-normalised)
    response votes; with k=1 the vote is the one sample, so maj@1 = avg@1, and only empty responses have no
    answer (the math answer extraction gave None for all of them: maj@1 0, no_ans 1)."""
    from dapo.eval import main

    (tmp_path / "my_reward.py").write_text(REWARD_PY)
    out = tmp_path / "res.json"
    assert main(["--model", str(tiny_model_dir), "--data", str(MATH_20), "--k", "1", "--max-new-tokens", "3",
                 "--reward", f"{tmp_path / 'my_reward.py'}:reward", "--out", str(out), "--limit", "12"]) == 0
    res = json.loads(out.read_text())
    m, samples = res["metrics"], res["samples"]
    assert 0 < m["avg@1"] < 1 and m["maj@1"] == pytest.approx(m["avg@1"])
    assert m["no_answer_frac"] == pytest.approx(sum(not s["response"].strip() for s in samples) / len(samples))
    assert all(s["pred"] == " ".join(s["response"].split()) for s in samples if ":" not in s["response"])


def test_cli_on_builtin_task_default_output(tiny_model_dir, tmp_path, capsys):
    import shutil

    from dapo.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert main(["eval", "--model", str(model), "--data", "task:addition", "--k", "2", "--limit", "5",
                 "--max-new-tokens", "4", "--no-samples"]) == 0
    res = json.loads((model / "eval_task-addition.json").read_text())
    assert res["metrics"]["problems"] == 5 and "samples" not in res and res["settings"]["reward"] == "task:addition"
    assert "maj@2" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tiny_model_dir, tmp_path, capsys):
    from dapo.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--data", "task:nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    for bad, says in (("-3", "must be 0 or more, got -3"), ("ten", "'ten' is not a whole number")):
        with pytest.raises(SystemExit) as stop:  # argparse's own exit, before anything is loaded
            main(["eval", "--model", str(tiny_model_dir), "--data", "task:addition", "--limit", bad])
        assert stop.value.code == 2 and f"argument --limit: {says}" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", "task:addition"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_the_reward_functions_failures_are_kept_for_the_reader():
    items = _fake_items(4)

    def failing(texts, exs):
        return RewardBatch([-1.0] * len(texts), [False] * len(texts), {"reward/errors": float(len(texts))},
                           ["raised KeyError: 'answer'"], ["raised KeyError: 'answer'"] * len(texts))

    res = evaluate(SeedEchoEngine(8), items, failing, lambda ids: "".join(map(str, ids)), SamplingParams(n=2), 0)
    assert res["reward_messages"] == ["raised KeyError: 'answer'"] and res["reward_stats"]["reward/errors"] == 8
    assert all(s["reward_error"] == "raised KeyError: 'answer'" for s in res["samples"])


def test_eval_on_a_runs_own_file_that_held_nothing_out_says_so(tiny_model_dir, tmp_path, capsys):
    """A file under 10 rows trains on every row (the held-out slice is at most a tenth): evaluating the run on its
    own file has no problem to score, which is an error that says why, not a table of nothing."""
    from dapo.cli import main

    data = tmp_path / "five.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(1, 6)))
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), f"log.out_dir={tmp_path}",
                 "log.run_name=r", "optim.steps=1", "data.template=none", "rollout.group_size=4",
                 "optim.train_batch_size=2", "optim.mini_batch_size=2", "rollout.max_new_tokens=4",
                 "algo.dynamic_sampling=false", "algo.soft_overlong=false", "log.progress=plain", "log.tensorboard=false",
                 "log.report=false",
                 "ckpt.every=1"]) == 0
    capsys.readouterr()
    step = tmp_path / "r" / "step_1"
    assert main(["eval", "--model", str(step), "--data", str(data), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nothing to evaluate: the run trained on" in err and "held none of its rows out" in err
    assert not list(step.glob("eval_*.json"))  # no result file of nothing
    assert main(["eval", "--model", str(step), "--data", str(data), "--max-new-tokens", "4", "--all-rows",
                 "--no-samples"]) == 0
    assert json.loads((step / "eval_five.json").read_text())["metrics"]["problems"] == 5


@pytest.mark.parametrize("own", ["training file", "eval.path"])
def test_eval_on_a_runs_own_file_reproduces_its_after(own, tiny_model_dir, tmp_path, capsys):
    """dapo eval on a run's checkpoint with the file the run measured on (its training file's held-out rows, or
    the first eval.size rows of its eval.path) evaluates those problems with its settings: the run's "after"."""
    from dapo.cli import main

    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 50)]
    data, ev = tmp_path / "train.jsonl", tmp_path / "held.csv"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.write_text("prompt,answer\n" + "".join(f"{a}+{a + 1}=,{2 * a + 1}\n" for a in range(60, 90)))
    extra = [f"eval.path={ev}"] if own == "eval.path" else []
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), f"log.out_dir={tmp_path}",
                 "log.run_name=r", "optim.steps=1", "data.template=none", "rollout.group_size=4",
                 "optim.train_batch_size=2", "optim.mini_batch_size=2", "rollout.max_new_tokens=6", "eval.size=4",
                 "eval.k=2", "algo.overlong_cache_len=2", "algo.dynamic_sampling=false", "log.progress=plain",
                 "log.tensorboard=false",
                 "log.report=false", "ckpt.every=1", *extra]) == 0
    after = json.loads((tmp_path / "r" / "summary.json").read_text())["after"]
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "r" / "step_1"), "--data", str(ev if extra else data)]) == 0
    name = "eval_held.csv.json" if extra else "eval_train.json"  # the format kept but for .jsonl: no collisions
    res = json.loads((tmp_path / "r" / "step_1" / name).read_text())
    assert res["metrics"]["problems"] == after["n"] == 4
    assert res["metrics"]["avg@2"] == pytest.approx(after["accuracy"])
    assert ("its first eval.size=4 rows" if extra else "evaluating the rows it held out") in capsys.readouterr().err
