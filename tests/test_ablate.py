"""dapo ablate: progressive rows under an equal sample budget, a table over seeds, a report."""
import json
from pathlib import Path

import pytest

from conftest import TINY_RUN
from dapo.ablate import main, summarise, to_markdown


def test_summarise_mean_and_std_over_seeds():
    runs = [
        {"row": "grpo", "lr": 1e-4, "acc_before": 0.2, "acc_after": a, "entropy_end": 1.0, "len_end": 10.0,
         "samples": 100, "steps": 5, "wall_s": 1.0}
        for a in (0.4, 0.6)
    ] + [{"row": "dapo", "lr": 1e-4, "acc_before": 0.2, "acc_after": 0.7, "entropy_end": 2.0, "len_end": 12.0,
          "samples": 110, "steps": 3, "wall_s": 1.0}]
    t = summarise(runs)
    assert [x["row"] for x in t] == ["grpo", "dapo"]
    assert t[0]["acc_mean"] == pytest.approx(0.5) and t[0]["acc_std"] == pytest.approx(0.1414, abs=1e-4)
    assert t[1]["acc_std"] == 0.0 and t[1]["seeds"] == 1
    md = to_markdown(t, 100)
    assert "| grpo | 0.0001 | 0.500 ± 0.141 (n=2)" in md and "100 generated samples" in md


def test_ablate_end_to_end_tiny(tiny_model_dir, tmp_path):
    rc = main(["--rows", "grpo,dapo", "--seeds", "1", "--max-samples", "32", "--high-lr", "0", "--out", str(tmp_path),
               f"model.path={tiny_model_dir}", "algo.filter_metric=reward", *TINY_RUN])
    assert rc == 0
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert [t["row"] for t in data["table"]] == ["grpo", "dapo"]
    for r in data["runs"]:
        assert r["samples"] >= 32  # each run stopped on the sample budget, not on steps
    md = (tmp_path / "ablation.md").read_text()
    assert md.count("\n| ") >= 3 and "avg@8 (T 1) over the same 8 held-out prompts" in md
    for r in data["runs"]:  # every run scored alike: 8 samples of each of the same held-out prompts
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert summary["before"]["k"] == summary["after"]["k"] == 8
    assert (tmp_path / "report" / "report.html").exists()


def test_ablate_stops_cleanly_when_a_run_is_stopped(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM during a run: that run checkpoints and stops (no final evaluation); ablate says so and exits
    130 instead of crashing on the missing result."""
    import os
    import signal

    from dapo.trainer import loop

    real = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: real(cfg, on_step=lambda s, m: os.kill(os.getpid(), signal.SIGTERM), **kw))
    rc = main(["--rows", "grpo", "--seeds", "1", "--max-samples", "64", "--high-lr", "0", "--out", str(tmp_path),
               f"model.path={tiny_model_dir}", *TINY_RUN])
    assert rc == 130
    err = capsys.readouterr().err
    assert "stopped at step 1 before its final evaluation" in err and "0 finished runs" in err
    assert json.loads((tmp_path / "runs" / "grpo-lr0.0001-s0" / "summary.json").read_text())["stopped_by"] == "SIGTERM"

    # the same command continues it: the stopped run resumes from its step-1 checkpoint, the next one runs
    monkeypatch.setattr(loop, "train", real)
    args = ["--rows", "grpo", "--seeds", "2", "--max-samples", "64", "--high-lr", "0", "--out", str(tmp_path),
            f"model.path={tiny_model_dir}", *TINY_RUN]
    assert main(args) == 0
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert [(r["row"], r["seed"]) for r in data["runs"]] == [("grpo", 0), ("grpo", 1)]
    steps = [json.loads(x)["step"] for x in (tmp_path / "runs" / "grpo-lr0.0001-s0" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps == sorted(set(steps)) and data["runs"][0]["samples"] >= 64  # step 1 kept, not redone

    # once finished, the same command trains nothing again
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: pytest.fail("a finished run was trained again"))
    assert main(args) == 0
    # other settings into the same directory are refused
    with pytest.raises(ValueError, match="budget 64"):
        main([*args[:5], "128", *args[6:]])


def test_a_second_ctrl_c_in_an_ablation_says_the_same_command_continues_it(tiny_model_dir, tmp_path, monkeypatch):
    from dapo.trainer import loop

    def stop(step, m):
        raise KeyboardInterrupt  # as a second Ctrl-C out of the loop

    real = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: real(cfg, on_step=stop, **kw))
    with pytest.raises(KeyboardInterrupt) as info:
        main(["--rows", "grpo", "--seeds", "1", "--max-samples", "64", "--high-lr", "0", "--out", str(tmp_path),
              f"model.path={tiny_model_dir}", *TINY_RUN])
    assert info.value.dapo_hint == (f"the 0 finished runs are in {tmp_path / 'ablation.json'}; the same command with "
                                    f"--out {tmp_path} continues it (the stopped run from its newest checkpoint)")
