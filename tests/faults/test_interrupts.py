"""Kills and signals against a real ``dapo train`` process, then resume: nothing saved is lost, nothing
half-written is resumed from, and the resumed run reproduces the uninterrupted one exactly.

Each killed run is compared with a reference run of the same config that was never interrupted; on
CPU with one thread both are deterministic, so every per-step metric (machine timings aside) must be
identical, not close.
"""
import json
import os
import random
import signal

import psutil
import pytest
import torch

import faultkit as fk
from dapo.cli import main as cli_main
from dapo.trainer.checkpoint import is_complete, latest_checkpoint, list_checkpoints

STEPS = 5
CARRY = ["algo.carry_over=true", "rollout.gen_batch_size=6"]  # surplus mixed groups carried to the next step


pytestmark = pytest.mark.usefixtures("one_thread")


def args(model, out, name, *extra):
    return ["--model", str(model), f"log.out_dir={out}", f"log.run_name={name}", f"optim.steps={STEPS}", *fk.FAST, *extra]


@pytest.fixture(scope="module")
def ref(tiny_model_dir, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("ref")
    assert cli_main(["train", *args(tiny_model_dir, out, "ref")]) == 0
    return fk.metrics(out / "ref")


@pytest.fixture(scope="module")
def ref_carry(tiny_model_dir, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("ref_carry")
    assert cli_main(["train", *args(tiny_model_dir, out, "ref", *CARRY)]) == 0
    rows = fk.metrics(out / "ref")
    assert any(r["batch/carried"] > 0 for r in rows[:-1])  # the state under test is really there
    return rows


def resume(run_dir, *extra):
    assert cli_main(["train", "--resume", str(run_dir), *extra]) == 0


def ckpt_steps(run_dir):
    return [s for s, _ in list_checkpoints(run_dir)]


def assert_clean(run_dir):
    """No temporary checkpoint left, keep_last=2 complete checkpoints, each sample step written once."""
    assert not [p for p in os.listdir(run_dir) if p.startswith((".tmp_step_", ".old_step_"))]
    assert ckpt_steps(run_dir) == [STEPS - 1, STEPS]
    assert all(is_complete(p, verify=True) for _, p in list_checkpoints(run_dir))
    steps = [json.loads(x)["step"] for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and sorted(set(steps)) == list(range(1, STEPS + 1))


def test_sigkill_during_a_checkpoint_write_resumes_to_identical_metrics(ref, tiny_model_dir, tmp_path):
    run = tmp_path / "k"
    p = fk.start(args(tiny_model_dir, tmp_path, "k"), tmp_path / "k.log")
    assert fk.wait_for(lambda: fk.steps_logged(run) >= 2 and fk.checkpoint_in_progress(run), 180, p)
    fk.sigkill(p)
    logged = fk.steps_logged(run)
    assert fk.checkpoint_in_progress(run)  # the half-written step_{logged} is left behind ...
    assert latest_checkpoint(run) == run / f"step_{logged - 1}"  # ... and never chosen
    with open(run / "metrics.jsonl", "a") as f:  # and a line cut by a kill mid-write is dropped on resume
        f.write('{"step": %d, "rollout/acc": 0.' % (logged + 1))
    resume(run)
    assert fk.first_difference(ref, fk.metrics(run)) is None
    assert_clean(run)


def test_sigkill_at_a_random_moment_with_carried_groups(ref_carry, tiny_model_dir, tmp_path):
    """Carried-over groups (with their behaviour log-probs) and the generation counters live in the
    checkpoint: a resume must train on exactly the groups the uninterrupted run trained on."""
    rng = random.Random(os.environ.get("DAPO_FAULT_SEED", "carry"))
    after_step, delay = rng.randint(2, STEPS - 2), rng.uniform(0, 0.6)
    run = tmp_path / "k"
    p = fk.start(args(tiny_model_dir, tmp_path, "k", *CARRY), tmp_path / "k.log")
    assert fk.wait_for(lambda: fk.steps_logged(run) >= after_step, 180, p)
    fk.wait_for(lambda: False, delay, p)
    fk.sigkill(p)
    ckpt = latest_checkpoint(run)
    st = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert st["sampler"]["samples_total"] == ref_carry[st["step"] - 1]["batch/samples_total"]
    assert len(st["sampler"]["carried"]) == ref_carry[st["step"] - 1]["batch/carried"]
    resume(run)
    assert fk.first_difference(ref_carry, fk.metrics(run)) is None
    assert_clean(run)


LORA = ["model.lora_rank=4", "model.lora_alpha=8"]


def test_sigkill_of_a_lora_run_resumes_to_identical_metrics_and_adapter(tiny_model_dir, tmp_path):
    """A LoRA checkpoint (adapter + its AdamW state, on the base it names) resumes exactly as well."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from dapo.lora import ADAPTER_WEIGHTS

    assert cli_main(["train", *args(tiny_model_dir, tmp_path, "ref", *LORA)]) == 0
    ref_rows = fk.metrics(tmp_path / "ref")
    rng = random.Random(os.environ.get("DAPO_FAULT_SEED", "lora"))
    after_step, delay = rng.randint(2, STEPS - 2), rng.uniform(0, 0.6)
    run = tmp_path / "k"
    p = fk.start(args(tiny_model_dir, tmp_path, "k", *LORA), tmp_path / "k.log")
    assert fk.wait_for(lambda: fk.steps_logged(run) >= after_step, 180, p)
    fk.wait_for(lambda: False, delay, p)
    fk.sigkill(p)
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and not (ckpt / "model.safetensors").exists() and (ckpt / ADAPTER_WEIGHTS).exists()
    resume(run)
    assert fk.first_difference(ref_rows, fk.metrics(run)) is None
    assert_clean(run)
    a, b = (load_file(str(d / f"step_{STEPS}" / ADAPTER_WEIGHTS)) for d in (tmp_path / "ref", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_before_the_first_checkpoint_starts_the_run_again(ref, tiny_model_dir, tmp_path):
    run = tmp_path / "k"
    p = fk.start(args(tiny_model_dir, tmp_path, "k"), tmp_path / "k.log")
    assert fk.wait_for(lambda: (run / "config.yaml").exists(), 180, p)
    fk.sigkill(p)
    assert latest_checkpoint(run) is None
    resume(run)  # nothing was saved, so nothing is lost: the same run from step 0, in the same directory
    assert fk.first_difference(ref, fk.metrics(run)) is None
    assert_clean(run)


def _listening(pid):
    out = []
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            out += [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return out


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(ref, tiny_model_dir, tmp_path):
    run = tmp_path / "t"
    p = fk.start(args(tiny_model_dir, tmp_path, "t"), tmp_path / "t.log")
    assert fk.wait_for(lambda: fk.steps_logged(run) >= 2, 180, p)
    assert _listening(p.pid) == []  # training opens no network port unless asked to
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    log = (tmp_path / "t.log").read_text()
    stopped = fk.steps_logged(run)
    assert f"SIGTERM: stopped after step {stopped}, checkpoint saved" in log and "Traceback" not in log
    assert stopped < STEPS and latest_checkpoint(run) == run / f"step_{stopped}"
    assert json.loads((run / "summary.json").read_text())["stopped_by"] == "SIGTERM"
    resume(run)
    assert fk.first_difference(ref, fk.metrics(run)) is None
    assert_clean(run)


def test_sigint_during_a_checkpoint_write_completes_it_then_stops(tiny_model_dir, tmp_path):
    run = tmp_path / "i"
    p = fk.start(args(tiny_model_dir, tmp_path, "i"), tmp_path / "i.log")
    assert fk.wait_for(lambda: fk.checkpoint_in_progress(run), 180, p)
    os.kill(p.pid, signal.SIGINT)
    assert p.wait(timeout=120) == 0
    stopped = fk.steps_logged(run)
    assert latest_checkpoint(run) == run / f"step_{stopped}" and not fk.checkpoint_in_progress(run)
    assert "SIGINT: stopped after step" in (tmp_path / "i.log").read_text()


def test_sigterm_before_the_first_step_exits_130_without_a_traceback(tiny_model_dir, tmp_path):
    run = tmp_path / "s"
    # 64 held-out prompts: the evaluation before training takes long enough for the signal to land in it
    p = fk.start(args(tiny_model_dir, tmp_path, "s", "eval.size=64"), tmp_path / "s.log")
    assert fk.wait_for(lambda: (run / "config.yaml").exists(), 180, p)
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=60) == 130
    log = (tmp_path / "s.log").read_text()
    assert "dapo train: interrupted; it stopped before its first step: nothing was trained" in log
    assert "Traceback" not in log
    assert not run.exists()  # what it wrote (config.yaml) is gone: the same command starts it again


def test_ctrl_c_to_the_process_group_with_reward_workers_stops_cleanly(tiny_model_dir, tmp_path):
    """A terminal's Ctrl-C reaches every process in the group, reward workers included: they ignore it,
    the trainer finishes its step, checkpoints, stops the workers and exits 0, leaving no process behind."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(10, 40)))
    (tmp_path / "rw.py").write_text("def score(r, gt):\n    return 1.0 if len(r) % 2 else -1.0\n")
    run = tmp_path / "g"
    p = fk.start(args(tiny_model_dir, tmp_path, "g", "--data", str(data), "--reward", f"{tmp_path / 'rw.py'}:score",
                      "reward.workers=2", "data.template=none", "eval.size=2"), tmp_path / "g.log",
                 new_session=True)
    assert fk.wait_for(lambda: fk.steps_logged(run) >= 1, 180, p)
    workers = psutil.Process(p.pid).children(recursive=True)
    assert len(workers) >= 2
    os.killpg(p.pid, signal.SIGINT)
    assert p.wait(timeout=120) == 0
    stopped = fk.steps_logged(run)
    assert latest_checkpoint(run) == run / f"step_{stopped}"
    log = (tmp_path / "g.log").read_text()
    assert "SIGINT: stopped after step" in log and "Traceback" not in log
    assert fk.wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), 10)
