"""LoRA generation from merged weights against unmerged adapters and the full model, one run, A/B/C alternating.

    python bench/lora_sampling.py                   # the 1M and 25M shapes, 2 threads, rank 16 on every projection
    python bench/lora_sampling.py --quick           # checks the script runs (seconds; its times mean nothing)
    python bench/lora_sampling.py --device cuda --dtype bfloat16

The same prompts, seeds and ``SamplingParams`` for three HF engines on one random-init model (``bench/common.py``
shapes): ``full`` the plain model, ``unmerged`` the model with LoRA adapters sampled through peft's layers
(``HFEngine(merge_lora=False)``, what dapo did before), ``merged`` the same adapted model sampled from merged
weights (``dapo.lora.MergedSampler``, the default). The adapters are random (B not zero), so the adapted policy is
not the base's; no stop token, so every row decodes ``--max-new`` tokens and the three do equal work. Each round
times one ``generate`` of each engine, in an order that rotates every round, so all three see the same machine
load; seconds are medians over ``--repeats`` rounds after one warm-up round. ``merge s`` is one
``MergedSampler.refresh`` (what each weight push adds). ``merged/full`` is the number issue 27 asks to be <= 1.1.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_SHAPES, build_char_model, emit_json, machine, set_threads, summary, table  # noqa: E402

ENGINES = ("full", "unmerged", "merged")


def engines(path: Path, a: argparse.Namespace):
    """The three engines on the model at ``path``: plain, LoRA unmerged, LoRA merged (the last two share one model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dapo.lora import adapter_state_dict, apply_lora
    from dapo.rollout import HFEngine

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    load = lambda: AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(a.device).eval()  # noqa: E731
    adapted = apply_lora(load(), a.rank, 2.0 * a.rank).eval()
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        for p in adapter_state_dict(adapted).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    kw = dict(pad_token_id=0, eos_token_ids=[], max_batch=a.prompts * a.G, compute_dtype=dtype)
    return {"full": HFEngine(load(), **kw), "unmerged": HFEngine(adapted, merge_lora=False, **kw),
            "merged": HFEngine(adapted, **kw)}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_shape(kind: str, a: argparse.Namespace) -> dict:
    import torch

    from dapo.rollout import SamplingParams

    path = build_char_model(Path(tempfile.mkdtemp(prefix="bench-lora-")) / kind, **MODEL_SHAPES[kind])
    eng = engines(path, a)
    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(5, 60, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    params, seeds = SamplingParams(n=a.G, max_new_tokens=a.max_new), list(range(a.prompts))
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    for r in range(a.repeats + 1):  # round 0 warms up
        for name in ENGINES[r % 3:] + ENGINES[: r % 3]:
            sync(a.device)
            t = time.perf_counter()
            eng[name].generate(prompts, params, seeds)
            sync(a.device)
            if r:
                times[name].append(time.perf_counter() - t)
    merge = []
    for _ in range(max(1, a.repeats)):
        sync(a.device)
        t = time.perf_counter()
        eng["merged"].merged.refresh()
        sync(a.device)
        merge.append(time.perf_counter() - t)
    s = {e: summary(times[e]) for e in ENGINES}
    tokens = a.prompts * a.G * a.max_new
    row = {"model": kind, **{f"{e} s": s[e]["median"] for e in ENGINES},
           "unmerged/full": s["unmerged"]["median"] / s["full"]["median"],
           "merged/full": s["merged"]["median"] / s["full"]["median"],
           "merged tok/s": tokens / s["merged"]["median"], "merge s": summary(merge)["median"]}
    return {"row": row, "times": times, "merge": merge, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-rand", "25m"], choices=sorted(MODEL_SHAPES))
    p.add_argument("--prompts", type=int, default=16, help="prompts per generate")
    p.add_argument("--G", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--max-new", type=int, default=24, help="tokens decoded per row (no stop token)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank), every projection adapted")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the script, times mean nothing")
    a = p.parse_args(argv)
    if a.quick:
        a.prompts, a.G, a.max_new, a.repeats = 2, 2, 4, 1
    threads = set_threads(a.threads)
    res = {kind: bench_shape(kind, a) for kind in a.models}
    print(f"generate {a.prompts} prompts x {a.G} samples x {a.max_new} tokens, LoRA rank {a.rank}, {a.dtype} on "
          f"{a.device}, {threads} threads, median of {a.repeats}{' (--quick: not a measurement)' if a.quick else ''}\n")
    print(table([r["row"] for r in res.values()]))
    emit_json({"bench": "lora_sampling", "machine": machine(), "threads": threads, "args": vars(a),
               "results": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
