"""Packed micro-batches (``optim.micro_batch_tokens``) against padded ones (``optim.micro_batch_size``): training
tokens per second on a long-tailed length mix.

    python bench/packing.py                               # 25M-parameter Qwen2, budgets 1024 and 2048 tokens
    python bench/packing.py --shape tiny --repeats 3      # a quick look

One mini-batch of P prompts x G responses, ``Learner.minibatch_backward`` (every micro-batch's forward
and backward, entropy on, as the first epoch of an update runs it), timed alternately padded / packed
after a warm-up round. Lengths as in DAPO's recipe, scaled down: responses log-normal (median
``--median``, sigma ``--sigma``) capped at ``--max-len``, prompts uniform in ``--prompt-len``. Tokens per
second count real tokens (prompt + response of every row), whatever a layout computes besides; the
table also shows how many positions each layout ran through the decoder (padding included).

On a CPU the packed rows go through sdpa with a block-diagonal mask, whose attention costs the square
of the row's length (flash_attention_2 on a GPU runs each sequence alone): the budget trades fewer,
fuller micro-batches against that.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_char_model, emit_json, machine, set_threads, table  # noqa: E402

SHAPES = {"tiny": dict(layers=4, hidden=128, heads=4, ffn=512), "25m": dict(layers=6, hidden=512, heads=8, ffn=2048)}


def make_batch(a: argparse.Namespace):
    import torch

    from dapo.learner import TrainBatch

    g = torch.Generator().manual_seed(a.seed)
    lo, hi = a.prompt_len
    prompts = [torch.randint(5, 90, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
               for _ in range(a.prompts)]
    n = a.prompts * a.G
    lens = (a.median * torch.exp(a.sigma * torch.randn(n, generator=g))).round().clamp(1, a.max_len).long().tolist()
    resps = [torch.randint(5, 90, (k,), generator=g) for k in lens]
    return TrainBatch.of([prompts[i // a.G] for i in range(n)], resps, [-torch.rand(k, generator=g) for k in lens],
                         [True] * n, torch.randn(n, generator=g), torch.ones(n))


def positions_run(batch, mbs, packed: bool) -> int:
    """Positions the decoder runs for these micro-batches: the padded layout pads every row to its
    micro-batch's longest prompt + longest response (prompts shared by several rows run once)."""
    if packed:
        return sum(len(batch.prompts[i]) + len(batch.responses[i]) for mb in mbs for i in mb)
    total = 0
    for mb in mbs:
        Lp = max(len(batch.prompts[i]) for i in mb)
        T = max(len(batch.responses[i]) for i in mb)
        uniq = len({tuple(batch.prompts[i]) for i in mb})
        shared = 2 * uniq <= len(mb) and len(mb) > 1  # policy.response_hidden's shared-prompt prefill
        total += (uniq if shared else len(mb)) * Lp + len(mb) * T
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="25m", choices=sorted(SHAPES))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--median", type=float, default=64)
    p.add_argument("--sigma", type=float, default=0.9)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 64])
    p.add_argument("--micro", type=int, nargs="+", default=[8, 2], help="padded: responses per micro-batch (each a row)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048], help="packed: token budgets")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--vocab", type=int, default=0, help="pad the LM head to this many rows (0: the character vocabulary)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()

    import torch

    from dapo.config import load_config
    from dapo.model import load_model, make_optimizer
    from dapo.learner import LocalLearner
    from dapo.learner.plan import micro_batches_of

    threads = set_threads(a.threads)
    path = build_char_model(Path(tempfile.mkdtemp(prefix="bench-packing-")) / a.shape, **SHAPES[a.shape],
                            max_pos=max(a.max_len + a.prompt_len[1], max(a.tokens)) + 8, vocab_size=a.vocab or None)
    cfg = load_config(overrides=[f"model.path={path}", f"rollout.group_size={a.G}", f"optim.train_batch_size={a.prompts}",
                                 f"optim.mini_batch_size={a.prompts}",
                                 f"rollout.max_new_tokens={a.max_len}", f"algo.overlong_cache_len={a.max_len // 4}",
                                 f"model.attn_implementation={a.attn}", "model.dtype=float32"], notify=lambda s: None)
    model = load_model(cfg.model, str(path), torch.device("cpu"))
    opt, sched = make_optimizer(cfg.optim, model)
    learner = LocalLearner(cfg, model, opt, sched, pad_id=0, device=torch.device("cpu"))
    batch = make_batch(a)
    old = batch.behaviour_logp
    idx = list(range(len(batch.responses)))
    real = sum(batch.seq_lengths)
    modes = [(f"padded {m}", m, 0) for m in a.micro] + [(f"packed {t}", cfg.optim.micro_batch_size, t) for t in a.tokens]
    times: dict[str, list[float]] = {m: [] for m, _, _ in modes}
    model.train()
    for rep in range(a.repeats + 1):  # the first round warms up
        for name, micro, tokens in modes:
            learner.cfg = replace(cfg, optim=replace(cfg.optim, micro_batch_size=micro, micro_batch_tokens=tokens))
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            learner.minibatch_backward(batch, old, idx, with_entropy=True)
            if rep:
                times[name].append(time.perf_counter() - t0)
        print(f"round {rep}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m, _, _ in modes if times[m]), file=sys.stderr)
    rows = []
    lengths = batch.seq_lengths
    first = modes[0][0]
    base = statistics.median(times[first])
    for name, micro, tokens in modes:
        mbs = micro_batches_of(idx, lengths, micro, tokens)
        med = statistics.median(times[name])
        ratios = [p / x for p, x in zip(times[first], times[name])]  # per round: the load moves between rounds
        rows.append({"layout": name, "micro-batches": len(mbs), "positions run": positions_run(batch, mbs, tokens > 0),
                     "median s": med, "min s": min(times[name]), "tokens/s": real / med,
                     f"vs {first} (median of rounds)": statistics.median(ratios), f"vs {first} (medians)": base / med})
    lens = batch.responses.lengths.float()
    print(f"\n{a.shape}: {a.prompts} prompts x G={a.G}, {real} real tokens (responses: median {lens.median():.0f}, "
          f"mean {lens.mean():.0f}, max {lens.max():.0f}; prompts {a.prompt_len[0]}-{a.prompt_len[1]}), "
          f"LM head {model.get_output_embeddings().weight.shape[0]} rows, attention "
          f"{a.attn}, {threads} threads; padded N: N responses a micro-batch; packed N: N tokens; median of "
          f"{a.repeats} rounds\n")
    print(table(rows, nd=2))
    emit_json({"bench": "packing", "machine": machine(), "args": vars(a), "real_tokens": real, "rows": rows,
               "times": times})


if __name__ == "__main__":
    main()
