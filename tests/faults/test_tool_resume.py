"""kill -9 of a ``dapo train --tools`` run, then ``--resume`` (#26): the carried-over trajectories come back from the
checkpoint with their masks (observation tokens stay out of the loss), so the resumed run reproduces the
uninterrupted one exactly, metric for metric (one thread, as every faults test)."""
import pytest
import torch

import faultkit as fk
from dapo.cli import main as cli_main
from dapo.trainer.checkpoint import is_complete, latest_checkpoint

STEPS = 3
# 32 prompts a round for 4 groups, most of them mixed by construction (tool_task's model answers "3" or "4" at
# random): the first step's surplus (trajectories with tool results) is carried over and fills the later steps
CARRY = ["algo.carry_over=true", "rollout.gen_batch_size=32", "optim.lr=1e-4", "log.report=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(task, out, name):
    return [f"log.out_dir={out}", f"log.run_name={name}", f"optim.steps={STEPS}", *fk.FAST, *task.args, *CARRY]


def test_sigkill_of_a_tool_run_resumes_its_carried_trajectories_with_their_masks(tool_task, tmp_path):
    assert cli_main(["train", *_args(tool_task, tmp_path, "ref")]) == 0
    ref = fk.metrics(tmp_path / "ref")
    # the first step samples and calls the tool; carried-over trajectories are left after every step but the last
    # (with 3/4 of the 32 groups mixed, at least 8 are carried; 9 or fewer mixed happens about once in 10^5)
    assert ref[0]["batch/gen_rounds"] > 0 and ref[0]["tool/calls"] > 0 and ref[0]["env/obs_tokens"] > 0
    assert all(r["tool/calls"] > 0 for r in ref if r["batch/gen_rounds"] > 0)
    assert all(r["batch/carried"] > 0 for r in ref[:-1])
    run = tmp_path / "k"
    p = fk.start(_args(tool_task, tmp_path, "k"), tmp_path / "k.log")
    assert fk.wait_for(lambda: is_complete(run / "step_1"), 180, p)  # mid-run: step 2 is being sampled or trained
    fk.sigkill(p)
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name != f"step_{STEPS}", (tmp_path / "k.log").read_text()[-2000:]
    st = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    carried = [c for g in st["sampler"]["carried"] for c in g["completions"]]
    assert len(st["sampler"]["carried"]) == ref[st["step"] - 1]["batch/carried"]
    masks = [c["mask"] for c in carried if "mask" in c]
    assert len(masks) == len(carried) and any(not bool(m.all()) for m in masks)  # observation tokens, marked so
    assert cli_main(["train", "--resume", str(run)]) == 0
    assert fk.first_difference(ref, fk.metrics(run)) is None
