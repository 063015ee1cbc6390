"""Accuracy and tool calls per trajectory of ``mult`` models, with the calculator and without it, easy and hard.

    python scripts/mult_tool.py ~/.cache/dapo/base/mult-* runs/mult-tool/step_40 runs/mult-plain/step_40

The 256 held-out prompts ``dapo train data.task=mult`` evaluates on (seed 0), one sample each at temperature
1.0 and ``rollout.max_new_tokens=48``, as training's before/after: once with ``--tools calculator`` (up to 4
turns), once without (a call is then the final answer, wrong). Without the tool the calls are counted in the
response text (``dapo.envs.parse_tool_calls``). One JSON line per model directory; the RESULTS table comes
from it.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from dapo.config import ModelConfig

from dapo.data.tasks import eval_examples, get_task
from dapo.envs import ToolEnv, ToolRunner, parse_tool_calls
from dapo.eval import evaluate
from dapo.items import PromptItem
from dapo.model import load_tokenizer
from dapo.problems import task_score_fn
from dapo.rollout.base import SamplingParams
from dapo.rollout.hf import HFEngine
from dapo.rollout.multiturn import MultiTurnRollout


def measure(path: str, runner: ToolRunner, n: int = 256) -> dict:
    task = get_task("mult")
    tok = load_tokenizer(ModelConfig(), path)  # AutoTokenizer would drop the observations' newlines
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    engine = HFEngine(model, tok.pad_token_id, [tok.eos_token_id])
    items = [PromptItem(-1 - i, ex, tok(ex.prompt, add_special_tokens=False)["input_ids"])
             for i, ex in enumerate(eval_examples(task, 0, n))]
    params = SamplingParams(n=1, max_new_tokens=48, temperature=1.0)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    out = {}
    for name, multiturn in (("tool", MultiTurnRollout(engine, tok, lambda: ToolEnv(runner), 4)), ("no_tool", None)):
        res = evaluate(engine, items, task_score_fn(task), decode, params, 0, multiturn=multiturn)
        for kind in ("mult/easy", "mult/hard", None):
            s = [x for x in res["samples"] if kind is None or x["data_source"] == kind]
            calls = [x["tool_calls"] if multiturn else len(parse_tool_calls(x["response"])) for x in s]
            key = f"{name}/{kind.split('/')[1] if kind else 'all'}"
            out[key] = {"acc": round(sum(x["correct"] for x in s) / len(s), 3),
                        "calls": round(sum(calls) / len(s), 3), "n": len(s)}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    pool = ToolRunner("calculator", workers=1)
    try:
        for p in sys.argv[1:]:
            print(p, json.dumps(measure(p, pool)), flush=True)
    finally:
        pool.close()
