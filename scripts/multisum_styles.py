"""Worked vs direct answers of multisum models: share, accuracy of each, mean length.

    python scripts/multisum_styles.py ~/.cache/dapo/base/multisum-* runs/len-multisum-s0/step_120

4 samples (temperature 1.0) on each of the 256 held-out prompts of seed 0, the set `dapo train`
evaluates on; one JSON line per model directory. The README's length-experiment table comes from it.
"""
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from dapo.data.tasks import get_task, eval_examples
from dapo.rollout.hf import HFEngine
from dapo.rollout.base import SamplingParams, derive_seed
torch.set_num_threads(1)
task = get_task("multisum")
out = {}
for path in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(path); model = AutoModelForCausalLM.from_pretrained(path).eval()
    probe = eval_examples(task, 0, 256)
    eng = HFEngine(model, tok.pad_token_id, [tok.eos_token_id])
    ps = tok([e.prompt for e in probe], add_special_tokens=False)["input_ids"]
    comps = eng.generate(ps, SamplingParams(n=4, max_new_tokens=24, temperature=1.0), [derive_seed(11, i) for i in range(len(ps))])
    st = {"direct": [0, 0], "worked": [0, 0]}; L = 0
    for c in comps:
        ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        txt = tok.decode(ids); L += len(c.token_ids)
        s = "direct" if txt.startswith(":") else "worked"
        st[s][0] += 1; st[s][1] += task.score(txt, probe[c.prompt_index].answer)[1]
    n = len(comps)
    r = {"acc": round((st["direct"][1] + st["worked"][1]) / n, 3), "worked_frac": round(st["worked"][0] / n, 3),
         "acc_direct": round(st["direct"][1] / max(1, st["direct"][0]), 3), "acc_worked": round(st["worked"][1] / max(1, st["worked"][0]), 3),
         "len": round(L / n, 2), "n": n}
    print(path, json.dumps(r), flush=True); out[path] = r
