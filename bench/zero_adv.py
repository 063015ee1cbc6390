"""What skipping the backward of zero-advantage responses buys (``optim.skip_zero_adv``), per mini-batch.

    python bench/zero_adv.py                    # tiny and 25m shapes, half the groups all-equal
    python bench/zero_adv.py --zero-groups 0 1 2 3 --models 25m

Without dynamic sampling (naive GRPO, or DAPO with it off) a group whose G rewards are all equal has
advantage 0 at every token: its gradient is exactly zero, but a plain trainer still runs its backward.
With the switch on, those responses get a forward pass without autograd (their entropy and ratio
metrics) and no backward. One mini-batch of P prompt groups x G responses (random-init model,
random 10-17-token responses), ``minibatch_backward`` timed alternately with the switch off and on;
seconds are medians over ``--repeats``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_SHAPES, build_char_model, emit_json, machine, set_threads, summary, table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-rand", "25m"], choices=sorted(MODEL_SHAPES))
    p.add_argument("--zero-groups", nargs="+", type=int, default=[2], help="all-equal groups of the 4 in the mini-batch")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()

    import torch

    from dapo.config import load_config
    from dapo.trainer.build import build_run
    from dapo.learner import TrainBatch

    threads = set_threads(a.threads)
    P, G = 4, a.G
    rows = []
    for kind in a.models:
        path = build_char_model(Path(tempfile.mkdtemp(prefix="bench-zero-")) / kind, **MODEL_SHAPES[kind])
        cfg = load_config(overrides=[f"model.path={path}", f"optim.micro_batch_size={P * G}", f"rollout.group_size={G}",
                                     "eval.size=0"])
        learner = build_run(cfg, Path(tempfile.mkdtemp(prefix="bench-zero-run-")), None, log=lambda s: None).learner
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(5, 60, (7,), generator=g).tolist() for _ in range(P)]
        resps = [torch.randint(5, 60, (int(torch.randint(10, 18, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(P * G)]
        old = [[-1.0] * len(r) for r in resps]
        for zero in a.zero_groups:
            adv = torch.randn(P * G, generator=g)
            adv[: zero * G] = 0.0
            fb = TrainBatch.of([prompts[i // G] for i in range(P * G)], resps, old, [True] * (P * G), adv, torch.ones(P * G))
            old_r = fb.behaviour_logp
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(a.repeats + 1):  # the first round warms up
                for skip in (False, True):
                    learner.cfg = replace(cfg, optim=replace(cfg.optim, skip_zero_adv=skip))
                    learner.model.zero_grad(set_to_none=True)
                    t = time.perf_counter()
                    learner.minibatch_backward(fb, old_r, list(range(P * G)), with_entropy=True)
                    times[skip].append(time.perf_counter() - t)
            off, on = summary(times[False][1:]), summary(times[True][1:])
            rows.append({"model": kind, "zero groups": f"{zero}/{P}", "full s": off["median"], "skip s": on["median"],
                         "skip/full": on["median"] / off["median"], "skip min": on["min"], "full min": off["min"]})
    print(f"one mini-batch of {P} x {G} responses, fwd+bwd, {threads} threads\n")
    print(table(rows))
    emit_json({"bench": "zero_adv", "machine": machine(), "threads": threads, "G": G, "P": P, "rows": rows})


if __name__ == "__main__":
    main()
