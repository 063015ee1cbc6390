"""Bad input through the real command line: each is a clear error naming what is wrong (exit 2), or
is skipped and counted as configured, and none leaves a half-made or altered run directory behind.

``docs/reliability.md`` tabulates these cases and how each is handled."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import faultkit as fk
from dapo.cli import main as cli_main
from dapo.trainer.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")
MATH_FILE = Path(__file__).parents[1] / "fixtures" / "math_20.jsonl"

# (case, extra arguments, config-file text or None, what the error must say)
CONFIG_CASES = [
    ("mistyped key", ["algo.eps_hihg=0.3"], None, ["unknown config key 'algo.eps_hihg'", "did you mean 'algo.eps_high'"]),
    ("key without its section", ["eps_high=0.3"], None, ["unknown config key 'eps_high'", "'algo.eps_high'"]),
    ("unknown section", ["optimizer.lr=1e-3"], None, ["unknown config key 'optimizer.lr'", "'optim.lr'"]),
    ("mistyped key in a YAML file", [], "algo:\n  eps_hihg: 0.3\n", ["'algo.eps_hihg' in ", "did you mean 'algo.eps_high'"]),
    ("wrong type", ["optim.steps=ten"], None, ["optim.steps: expected int, got 'ten'"]),
    ("fractional int", ["optim.steps=2.5"], None, ["optim.steps: expected int"]),
    ("not key=value", ["optim.steps"], None, ["not of the form key=value"]),
    ("batch not divisible", ["optim.train_batch_size=6", "optim.mini_batch_size=4"], None,
     ["optim.mini_batch_size", "must be divisible"]),
    ("L_cache >= L_max", ["rollout.max_new_tokens=8", "algo.overlong_cache_len=8"], None,
     ["algo.overlong_cache_len", "L_cache must be > 0 and < L_max"]),
    ("G < 2", ["rollout.group_size=1"], None, ["rollout.group_size", "G must be >= 2"]),
    ("unknown preset", ["--preset", "dapoo"], None, ["unknown preset 'dapoo'", "did you mean 'dapo'"]),
    ("YAML not a mapping", [], "- optim.steps=3\n", ["must be a mapping"]),
    ("YAML syntax error", [], "algo: {eps_high: [\n", ["cannot read config"]),
    ("non-UTF-8 config file", [], b"algo:\n  eps_high: 0.3 \xff\xfe\n", ["cannot read config", "utf-8"]),
    ("unknown task", ["data.task=subtraktion"], None, ["data.task"]),
    ("missing model directory", ["--model", "/nonexistent/model"], None, ["cannot load model.path='/nonexistent/model'"]),
    ("CUDA asked, none here", ["model.device=cuda"], None, ["model.device=cuda: CUDA is not available"]),
    ("unknown dtype", ["model.dtype=float8"], None, ["model.dtype='float8'"]),
    ("reward memory limit without workers", ["reward.memory_mb=512"], None,
     ["reward.memory_mb", "set reward.workers >= 1"]),
]


@pytest.mark.parametrize("case,extra,text,says", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_a_clear_error_and_leaves_no_run(case, extra, text, says, tiny_model_dir, tmp_path, capsys):
    if case == "CUDA asked, none here" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["train", "--model", str(tiny_model_dir), f"log.out_dir={tmp_path / 'runs'}", "log.run_name=r", *fk.FAST]
    if text is not None:
        cfg = tmp_path / "c.yaml"
        cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
        argv += ["--config", str(cfg)]
    rc = cli_main(argv + extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "dapo train: error: " in err and "Traceback" not in err
    for s in says:
        assert s.lower() in err.lower(), (s, err)
    run = tmp_path / "runs" / "r"
    assert not run.exists()  # the run directory made for it is removed again, as it holds nothing


def test_a_refused_run_keeps_the_empty_directory_the_user_made(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    rc = cli_main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl"),
                   f"log.out_dir={tmp_path / 'runs'}", "log.run_name=mine", *fk.FAST])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    assert (tmp_path / "runs" / "mine").is_dir()


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("done")
    assert cli_main(["train", "--model", str(tiny_model_dir), f"log.out_dir={out}", "log.run_name=r", "optim.steps=2",
                     *fk.FAST]) == 0
    return out / "r"


def _snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


RESUME_CASES = [
    ("resume with another seed (other data order)", lambda run: [f"--resume={run}", "seed=1", "optim.steps=3"],
     ["data cursor is for task 'addition' seed 0, not 'addition' seed 1: resume with the run's own data.task and seed"]),
    ("resume a task's run on a prompt file", lambda run: [f"--resume={run}", f"--data={MATH_FILE}", "optim.steps=3",
                                                          "data.max_prompt_len=400"],
     ["data cursor was saved for the built-in task 'addition', and this run reads a prompt file's 18 prompts: resume "
      "with the run's own data.path / data.task"]),
    ("resume with an impossible batch", lambda run: [f"--resume={run}", "optim.mini_batch_size=3", "optim.steps=3"],
     ["must be divisible"]),
    ("resume from a damaged checkpoint", lambda run: [f"--resume={run / 'step_2'}"], ["not a complete checkpoint"]),
    ("resume from nothing", lambda run: [f"--resume={run}_missing"], ["no such directory"]),
    ("start over a finished run", lambda run: [f"log.out_dir={run.parent}", "log.run_name=r"],
     ["already exists and is not empty", "ckpt.resume="]),
    ("resume with fewer steps than done", lambda run: [f"--resume={run}", "optim.steps=1"],
     ["step_2 is 2 steps in, and optim.steps=1: nothing left to train", "optim.steps=N, N > 2"]),
    ("branch a finished run with no more steps", lambda run: [f"--resume={run}", f"log.out_dir={run.parent}",
                                                              "log.run_name=branch"], ["nothing left to train"]),
]


@pytest.mark.parametrize("case,argv,says", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_a_refused_resume_changes_nothing_in_the_run(case, argv, says, finished_run, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    if "damaged" in case:
        with open(run / "step_2" / "model.safetensors", "r+b") as f:  # one flipped byte, same size
            f.seek(200)
            b = f.read(1)
            f.seek(200)
            f.write(bytes([b[0] ^ 0xFF]))
    before = _snapshot(run)
    capsys.readouterr()
    rc = cli_main(["train", *argv(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for s in says:
        assert s in err, (s, err)
    assert _snapshot(run) == before
    assert not (run.parent / "branch").exists()  # a refused branch leaves no directory behind


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(finished_run, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    (run / "step_2" / "trainer_state.pt").write_bytes(b"")  # truncated to nothing by a full disk, say
    assert cli_main(["train", "--resume", str(run), "optim.steps=2"]) == 0
    assert "resuming from step_1" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(run)] == [1, 2] and (run / "step_2" / "trainer_state.pt").stat().st_size > 0
    assert [r["step"] for r in fk.metrics(run)] == [1, 2]


def test_a_resume_with_changed_keys_says_so_and_keeps_the_config_the_earlier_steps_ran_with(finished_run, tmp_path,
                                                                                           capsys):
    import yaml

    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    original = (run / "config.yaml").read_bytes()
    assert cli_main(["train", "--resume", str(run), "optim.steps=3"]) == 0  # only longer: continuing
    err = capsys.readouterr().err
    assert "resumed with 1 changed key(s): optim.steps: 2 -> 3" in err and "config.upto_step" not in err
    assert not list(run.glob("config.upto_step_*.yaml"))
    steps3 = (run / "config.yaml").read_bytes()
    assert cli_main(["train", "--resume", str(run), "optim.steps=4", "algo.eps_high=0.3"]) == 0
    err = capsys.readouterr().err
    assert "resumed with 2 changed key(s): algo.eps_high: 0.28 -> 0.3; optim.steps: 3 -> 4" in err, err
    assert "the config of steps 1..3 is kept as config.upto_step_3.yaml" in err
    assert (run / "config.upto_step_3.yaml").read_bytes() == steps3 != original
    assert yaml.safe_load((run / "config.yaml").read_text())["algo"]["eps_high"] == 0.3
    # a branch names what it changes from its source too, and keeps the source's config beside its own
    assert cli_main(["train", "--resume", str(run), "optim.steps=5", "algo.eps_high=0.25", f"log.out_dir={tmp_path}",
                     "log.run_name=b"]) == 0
    err = capsys.readouterr().err
    assert "resumed with 2 changed key(s): algo.eps_high: 0.3 -> 0.25; optim.steps: 4 -> 5" in err, err
    assert (run.parent / "b" / "config.upto_step_4.yaml").read_bytes() == (run / "config.yaml").read_bytes()


def test_resuming_a_finished_run_in_place_does_nothing_and_succeeds(finished_run, tmp_path, capsys):
    """A requeued job (the same --resume command after the run finished) exits 0 and rewrites nothing."""
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    assert cli_main(["train", "--resume", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"{run} finished at step 2 of optim.steps=2: nothing to do" in err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2
    assert _snapshot(run) == before


def test_a_run_killed_after_its_last_checkpoint_resumes_to_its_final_evaluation(finished_run, tmp_path, capsys):
    """Killed between the last step's checkpoint and the evaluation after it (no summary.json yet): the resume has
    no step to train but still finishes the run; the 'nothing left to train' refusal is for a finished run."""
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    assert cli_main(["train", "--resume", str(run)]) == 0
    assert "held-out accuracy after" in capsys.readouterr().err
    again = json.loads((run / "summary.json").read_text())
    assert again["steps"] == 2 and again["after"]["n"] == summary["after"]["n"] and again["before"] == summary["before"]


def test_a_pruned_checkpoint_keeps_the_results_dapo_eval_wrote_into_it(finished_run, tmp_path, capsys):
    """dapo eval writes MODEL/eval_*.json; a later resume's keep_last prune deleted them with the checkpoint
    (stop 41). Whatever a checkpoint holds beyond its manifest moves to RUN/kept/step_N/, and the log says so."""
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    assert cli_main(["eval", "--model", str(run / "step_1"), "--data", "task:addition", "--limit", "2",
                     "--progress", "none"]) == 0
    results = sorted(p.name for p in (run / "step_1").glob("eval_*.json"))
    assert results, list((run / "step_1").iterdir())
    (run / "step_1" / "my_notes.txt").write_text("lr too high?")
    wrote = {name: (run / "step_1" / name).read_bytes() for name in [*results, "my_notes.txt"]}
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "optim.steps=3"]) == 0  # keep_last=2: step_1 goes
    err = capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert {name: (run / "kept" / "step_1" / name).read_bytes() for name in wrote} == wrote
    assert (f"step_1 pruned (ckpt.keep_last=2); the files it held beyond the checkpoint (e.g. dapo eval's results) "
            f"are kept in {run / 'kept' / 'step_1'}") in err, err
    assert cli_main(["train", "--resume", str(run), "optim.steps=4"]) == 0  # step_2 goes, holding nothing else
    assert [s for s, _ in list_checkpoints(run)] == [3, 4] and sorted(p.name for p in (run / "kept").iterdir()) == [
        "step_1"] and "step_2 pruned" not in capsys.readouterr().err
