"""bench/sim_scale.py at a toy shape: the real driver pieces run end to end on the stand-ins, every phase is
measured, the carried groups go through a weights-only checkpoint, and the same seeds give the same steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sim_scale.py"), "--quick", "--prompts", "4",
                          "--length-scale", "0.05", "--threads", "1", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sim_scale_runs_every_phase_of_the_real_driver_on_tensors():
    res = _run("--steps", "3")
    assert res["representation"] == "tensors" and len(res["steps"]) == 3
    for s in res["steps"]:
        assert s["responses_trained"] == 4 * 16 and s["tokens_trained"] > 0
        assert s["responses_generated"] >= s["responses_trained"] and s["tokens_generated"] >= s["tokens_trained"]
        for phase in ("decode", "reward", "flatten", "old_logp", "correction", "update", "checkpoint", "ray_ship"):
            assert s[f"{phase}_s"] > 0, phase
        assert s["step_peak_mb"] > 0 and s["driver_s"] >= s["update_s"]
    # dynamic sampling refilled at least once and carried its surplus into a checkpoint that loads back
    assert max(s["gen_rounds"] for s in res["steps"]) >= 2
    assert max(s["carried_groups"] for s in res["steps"]) > 0


def test_sim_scale_is_deterministic_packs_when_asked_and_decodes_in_reward_workers():
    a = _run("--steps", "2")
    b = _run("--steps", "2", "optim.micro_batch_tokens=4096")
    keys = ("tokens_generated", "tokens_trained", "carried_groups", "gen_rounds")
    assert [[s[k] for k in keys] for s in a["steps"]] == [[s[k] for k in keys] for s in b["steps"]]
    assert b["overrides"] == ["optim.micro_batch_tokens=4096"]
    # reward workers decode the ids themselves: the coin hashes the whole text, so the same steps mean the same texts
    c = _run("--steps", "2", "--reward-workers", "1")
    assert [[s[k] for k in keys] for s in a["steps"]] == [[s[k] for k in keys] for s in c["steps"]]
