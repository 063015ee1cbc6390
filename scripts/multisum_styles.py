"""Worked vs direct answers of multisum models: share, accuracy of each, mean length.

    python scripts/multisum_styles.py ~/.cache/dapo/base/multisum-* runs/len-multisum-s0/step_120

4 samples (temperature 1.0) on each of the 256 held-out prompts of seed 0, the set `dapo train`
evaluates on; one JSON line per model directory. The README's length-experiment table comes from it.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapo.data.tasks import eval_examples, get_task
from dapo.rollout.base import SamplingParams, derive_seed
from dapo.rollout.hf import HFEngine


def styles(path: str, task, probe) -> dict:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    engine = HFEngine(model, tok.pad_token_id, [tok.eos_token_id])
    prompts = tok([e.prompt for e in probe], add_special_tokens=False)["input_ids"]
    comps = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=24, temperature=1.0),
                            [derive_seed(11, i) for i in range(len(prompts))])
    count = {"direct": 0, "worked": 0}
    right = {"direct": 0, "worked": 0}
    tokens = 0
    for c in comps:
        text = tok.decode(c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids)
        style = "direct" if text.startswith(":") else "worked"
        count[style] += 1
        right[style] += task.score(text, probe[c.prompt_index].answer)[1]
        tokens += len(c.token_ids)
    n = len(comps)
    return {"acc": round(sum(right.values()) / n, 3), "worked_frac": round(count["worked"] / n, 3),
            "acc_direct": round(right["direct"] / max(1, count["direct"]), 3),
            "acc_worked": round(right["worked"] / max(1, count["worked"]), 3), "len": round(tokens / n, 2), "n": n}


if __name__ == "__main__":
    torch.set_num_threads(1)
    task = get_task("multisum")
    probe = eval_examples(task, 0, 256)
    for path in sys.argv[1:]:
        print(path, json.dumps(styles(path, task, probe)), flush=True)
