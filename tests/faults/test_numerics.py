"""Numerical faults: a non-finite loss or gradient skips that update (and is counted), a policy whose
own numbers turn NaN stops the run with a clear message after ``optim.max_bad_steps`` in a row, and
neither ever checkpoints bad weights over good ones."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import faultkit as fk
from dapo.cli import main as cli_main
from dapo.config import load_config
from dapo.rollout.base import SamplingParams
from dapo.trainer.checkpoint import _sha256, list_checkpoints, load_trainer_state, save_checkpoint
from dapo.trainer.build import build_run
from dapo.learner import TrainBatch, TrainingError


pytestmark = pytest.mark.usefixtures("one_thread")


def _run_args(model, out, name, *extra):
    return ["train", "--model", str(model), f"log.out_dir={out}", f"log.run_name={name}", *fk.FAST, *extra]


def test_non_finite_updates_are_skipped_counted_and_stop_after_k(tiny_model_dir, tmp_path):
    cfg = load_config(overrides=[*fk.FAST, f"model.path={tiny_model_dir}", "optim.max_bad_steps=3"])
    run = build_run(cfg, tmp_path, None, log=lambda s: None)
    learner = run.learner
    G, P = cfg.rollout.group_size, 4
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13]]
    comps = run.engine.generate(prompts, SamplingParams(n=G, max_new_tokens=6), list(range(P)))
    fb = TrainBatch.of([prompts[c.prompt_index] for c in comps], [c.token_ids for c in comps], [c.logprobs for c in comps],
                   [True] * len(comps), torch.randn(P * G), torch.ones(P * G))
    old = fb.behaviour_logp.clone()
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    fb.advantages[:G] = float("nan")  # one group's reward was NaN: only its mini-batch is skipped
    m = learner.update(fb, old, step=1)
    assert (m["actor/updates"], m["actor/skipped_updates"]) == (1, 1)
    fb.advantages[:] = float("nan")
    learner.bad_streak = 0
    after_good = {k: v.clone() for k, v in learner.model.state_dict().items()}
    opt_state = {k: {n: t.clone() for n, t in s.items()} for k, s in learner.optimizer.state_dict()["state"].items()}
    m = learner.update(fb, old, step=2)  # two mini-batches, both non-finite
    assert (m["actor/updates"], m["actor/skipped_updates"], learner.bad_streak, m["actor/bad_streak"]) == (0, 2, 2, 2)
    for k, v in learner.model.state_dict().items():  # a skipped update changes nothing: weights ...
        assert torch.equal(v, after_good[k]), k
    for k, s in learner.optimizer.state_dict()["state"].items():  # ... nor AdamW's moments
        for n, t in s.items():
            assert torch.equal(t, opt_state[k][n]), (k, n)
    with pytest.raises(TrainingError, match=r"3 optimiser updates in a row had a non-finite loss.*max_bad_steps=3"):
        learner.update(fb, old, step=3)
    assert any(not torch.equal(v, before[k]) for k, v in after_good.items())  # the good update did apply


def test_an_lr_that_blows_up_the_weights_stops_with_a_clear_message(tiny_model_dir, tmp_path, capsys):
    rc = cli_main(_run_args(tiny_model_dir, tmp_path, "r", "optim.lr=1e30", "optim.steps=8", "optim.max_bad_steps=2"))
    err = capsys.readouterr().err
    assert rc == 1 and "dapo train: error: step 3:" in err and "log-probs are NaN" in err and "Traceback" not in err
    run = tmp_path / "r"
    rows = fk.metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["actor/skipped_updates"] == 1
    assert rows[1]["rollout/nan_logprob_frac"] == 1.0
    assert [s for s, _ in list_checkpoints(run)] == [1]  # nothing saved during the bad streak


def test_nan_in_a_parameter_between_steps_keeps_the_good_checkpoints(tiny_model_dir, tmp_path, capsys):
    assert cli_main(_run_args(tiny_model_dir, tmp_path, "r", "optim.steps=3")) == 0
    run = tmp_path / "r"
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    good = {p.name: _sha256(p) for p in (run / "step_2").iterdir()}
    # a NaN appears in one weight between step 3 and step 4 (re-saved through the library, so the
    # checkpoint is valid and resumable: the fault is in the numbers, not the files)
    model = AutoModelForCausalLM.from_pretrained(run / "step_3")
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    save_checkpoint(run, 3, model, AutoTokenizer.from_pretrained(run / "step_3"), load_trainer_state(run / "step_3"), 2)
    capsys.readouterr()
    rc = cli_main(["train", "--resume", str(run), "optim.steps=8", "optim.max_bad_steps=2"])
    err = capsys.readouterr().err
    assert rc == 1 and "stopping. The last good checkpoint is kept" in err
    assert [r["step"] for r in fk.metrics(run)] == [1, 2, 3, 4]
    assert fk.metrics(run)[3]["actor/skipped_updates"] == 1
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert {p.name: _sha256(p) for p in (run / "step_2").iterdir()} == good
