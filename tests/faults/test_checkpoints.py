"""Checkpoint files under damage, on real files: what ``resume`` picks, and what pruning cleans up."""
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapo.trainer.checkpoint import (
    MANIFEST, is_complete, latest_checkpoint, list_checkpoints, load_trainer_state, prune_checkpoints, save_checkpoint,
)


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A run directory with complete checkpoints step_1 .. step_4 (keep_last=10)."""
    run = tmp_path_factory.mktemp("run")
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    for step in range(1, 5):
        save_checkpoint(run, step, model, tok, {"step": step, "rng": torch.get_rng_state()}, keep_last=10)
    return run


@pytest.fixture
def run(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "r")
    return tmp_path / "r"


def _flip(path, at=100):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["no manifest", "file missing", "file truncated", "byte flipped", "manifest cut"])
def test_resume_skips_a_damaged_newest_checkpoint(run, damage):
    ck = run / "step_4"
    if damage == "no manifest":
        (ck / MANIFEST).unlink()
    elif damage == "file missing":
        (ck / "trainer_state.pt").unlink()
    elif damage == "file truncated":
        os.truncate(ck / "model.safetensors", 1000)
    elif damage == "byte flipped":  # same size: only the sha256 catches it
        _flip(ck / "model.safetensors")
        assert is_complete(ck) and not is_complete(ck, verify=True)
    else:
        (ck / MANIFEST).write_text((ck / MANIFEST).read_text()[:40])
    assert latest_checkpoint(run) == run / "step_3"
    assert load_trainer_state(latest_checkpoint(run))["step"] == 3


def test_prune_keeps_the_newest_complete_and_removes_what_killed_saves_left(run):
    (run / ".tmp_step_5_123").mkdir()  # a save killed before its rename
    (run / ".tmp_step_5_123" / "model.safetensors").write_bytes(b"half")
    shutil.copytree(run / "step_2", run / ".old_step_2_77")  # a re-save killed between its two renames
    (run / "step_1" / MANIFEST).unlink()  # a prune killed half-way through step_1
    (run / "step_9").mkdir()  # a newer partial directory is never deleted (nor resumed from)
    prune_checkpoints(run, keep_last=2)
    assert [s for s, _ in list_checkpoints(run)] == [3, 4, 9]
    assert sorted(os.listdir(run)) == ["step_3", "step_4", "step_9"]
    assert latest_checkpoint(run) == run / "step_4"


def test_a_resave_of_the_same_step_replaces_it_atomically(run, tiny_model_dir):
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    save_checkpoint(run, 4, model, tok, {"step": 4, "again": True}, keep_last=2)
    assert load_trainer_state(run / "step_4")["again"] is True and is_complete(run / "step_4", verify=True)
    assert sorted(os.listdir(run)) == ["step_3", "step_4"]
