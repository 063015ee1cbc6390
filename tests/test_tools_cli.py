"""``dapo train --tools`` and ``dapo eval --tools`` end to end (#26): a tiny model taught a tool call's shape
calls the tool, reads its result and answers; two RL steps train on the trajectories."""
import json

import torch
from safetensors.torch import load_file

from conftest import TINY_RUN, TOOL_TASK, build_tool_caller
from dapo.cli import main as cli_main

TOOLS, REWARD = TOOL_TASK["tools.py"], TOOL_TASK["reward.py"]


def test_train_and_eval_with_tools(tmp_path, capsys):
    model_dir = build_tool_caller(tmp_path / "caller")
    (tmp_path / "tools.py").write_text(TOOLS)
    (tmp_path / "reward.py").write_text(REWARD)
    rows = [{"prompt": f"{a}+{b}=", "answer": "3" if a % 2 else str(a + b)} for a, b in zip(range(10, 50), range(40, 80))]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(model_dir), "--data", str(tmp_path / "data.jsonl"), "--reward", f"{tmp_path / 'reward.py'}:score",
            "--tools", str(tmp_path / "tools.py")]
    rc = cli_main(["train", *args, *TINY_RUN, "optim.steps=2", "rollout.max_new_tokens=40", "algo.overlong_cache_len=4",
                   "rollout.max_turns=3", "data.template=none", "algo.dynamic_sampling=false", "optim.lr=1e-3", "log.samples_every=1",
                   "env.workers=1", "eval.size=4", f"log.out_dir={tmp_path}", "log.run_name=r"])
    assert rc == 0
    m = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == [1, 2]
    first = m[0]
    assert first["tool/calls"] >= 8 and first["tool/errors"] == first["tool/timeouts"] == 0  # it called add(1, 2)
    assert first["env/turns_mean"] > 1.5 and first["env/obs_tokens"] > 0 and 0 < first["env/obs_frac"] < 1
    assert 0 < first["rollout/acc"] < 1  # "3" is right for half of the rows, and the model says "3" or "4"
    before = load_file(str(model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "r" / "step_2" / "model.safetensors"))
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    samples = [json.loads(x) for x in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert any("<result>3</result>" in json.dumps(s) for s in samples)

    out = tmp_path / "eval.json"
    assert cli_main(["eval", *args[:2], "--data", str(tmp_path / "data.jsonl"), "--reward",
                     f"{tmp_path / 'reward.py'}:score", "--tools", str(tmp_path / "tools.py"), "--k", "2", "--limit", "4",
                     "--max-new-tokens", "40", "--template", "none", "--out", str(out), "--progress", "none"]) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["tools"] == str(tmp_path / "tools.py") and res["settings"]["max_turns"] == 4
    assert len(res["samples"]) == 8 and all("turns" in s for s in res["samples"])
    assert max(s["turns"] for s in res["samples"]) >= 2 and any("<result>3</result>" in s["response"] for s in res["samples"])
