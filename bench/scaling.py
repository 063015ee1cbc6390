"""How an RL step's cost grows with G, response length and prompt batch; and LM-head memory at a 152k vocabulary.

    python bench/scaling.py                 # all sweeps and the vocabulary part (~20 min on 2 shared cores)
    python bench/scaling.py --quick         # smaller grid
    python bench/scaling.py --only vocab    # just the log-prob memory comparison
    python bench/scaling.py --only kv       # just the rollout KV-cache memory comparison (~1 min)

Sweeps: a Qwen2 of the demo's shape (1.06M parameters, random init) with room for 2048 positions. EOS
is ignored (the engine gets no stop tokens), so every response is exactly L tokens long and the work
is known: P prompts x G responses x L tokens. Overlong filtering is off (every response trains; it
would otherwise mask all of them) and dynamic sampling is off. One RL step = generate, score, old
log-probs, min(P, 4) optimiser steps: ``dapo.trainer.loop.train_step`` on a run whose engine has its EOS
switched off. Each configuration runs in its own
child process; its peak memory is the kernel's peak RSS (VmHWM, reset after setup) over its steps minus
the RSS before them. The machine is shared and noisy: CPU seconds (process time) are reported beside
wall seconds, and the growth summary (cost ratio against token ratio, per sweep) uses them.

Vocab: log-probs and entropy of B x T response tokens under a model with a 151,936-token vocabulary
(Qwen2.5's), two ways: dapo's ``response_logprobs`` (response positions only, LM head in chunks of at
most 128 MiB of logits, gradient formed chunk by chunk in backward) and the naive way (full
``model(...).logits`` in fp32, ``log_softmax``, gather, entropy from the full softmax). Peak RSS over
the call, for no-grad (old log-probs) and forward + backward (the update).

KV: peak memory of one ``HFEngine.generate`` with max_new_tokens=4096 whose responses stop near 200
tokens, the KV storage reserved in full before the first token (``kv_headroom=None``, the engine's old
behaviour) against storage that grows with the longest live row (the default). A random Qwen2 (4 layers
x 256, fp32: 8 KiB of keys/values per token) with a bias on the EOS logit (see ``eos_bias``), 8 prompts
x 8 samples. Each mode runs in its own child process under ``MALLOC_PERTURB_``: Linux commits untouched
pages lazily, so on CPU an empty reservation would not show in RSS at all, while a GPU allocator's
blocks are resident; glibc writing every allocation once makes peak RSS count what was reserved, as GPU
memory would. Reported: peak RSS over the call minus RSS before it, the child's lifetime peak RSS
(ru_maxrss), and the KV bytes the cache layers held at their peak (counted from their storage).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if "--omp-passive" in sys.argv:  # before torch loads OpenMP; the children inherit it (RESULTS.md, "Two facts")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PeakRSS, build_char_model, emit_json, machine, peak_rss_mb, reset_peak_rss, rss_mb, set_threads, summary, table,
)

SHAPE = dict(layers=4, hidden=128, heads=4, ffn=512, max_pos=2048)
BASE = dict(P=4, G=8, L=128)


# --------------------------------------------------------------------------------------------------
# RL step sweeps


def rl_step_costs(model_path: Path, P: int, G: int, L: int, steps: int, tmp: str) -> dict[str, Any]:
    """One configuration, in this process: a warm-up step, then ``steps`` timed ones."""
    from dapo.config import load_config
    from dapo.trainer.build import build_run
    from dapo.trainer.loop import train_step

    mini = max(1, P // 4)
    cfg = load_config(overrides=[
        f"model.path={model_path}", "model.device=cpu", f"rollout.group_size={G}", f"rollout.max_new_tokens={L}",
        f"optim.train_batch_size={P}", f"optim.mini_batch_size={mini}", "optim.micro_batch_size=64",
        "algo.dynamic_sampling=false", "algo.overlong_filter=false", "algo.soft_overlong=false", "eval.size=0",
        f"log.out_dir={tmp}", f"log.run_name=s-{P}-{G}-{L}", "log.tensorboard=false",
    ])
    run_dir = Path(tmp) / f"s-{P}-{G}-{L}"
    run_dir.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, run_dir, None, log=lambda s: None)
    run.engine.eos_token_ids = ()  # never stop early: every response is exactly L tokens
    import gc

    gc.collect()
    base_mb = rss_mb()  # model, optimiser state (empty until the first step), engine: before any step
    reset_peak_rss()
    rows = []
    for step in range(1, steps + 2):  # the first is a warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        groups, m = train_step(run, step)
        t3, c3 = time.perf_counter(), time.process_time()
        tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
        assert tokens == P * G * L, (tokens, P * G * L)
        if step > 1:
            rows.append({"step_s": t3 - t0, "cpu_s": c3 - c0, "gen_s": m["time/gen"], "old_logp_s": m["time/old_logp"],
                         "update_s": m["time/update"]})
    peak = peak_rss_mb() - base_mb
    run.close()
    med = {k: summary([r[k] for r in rows])["median"] for k in rows[0]}
    tokens = P * G * L
    return {"P": P, "G": G, "L": L, "gen_tokens": tokens, **med, "cpu_ms_per_token": med["cpu_s"] / tokens * 1000,
            "gen_tok_per_s": tokens / med["gen_s"], "step_min_s": min(r["step_s"] for r in rows),
            "peak_mb": peak, "peak_kb_per_token": peak * 1024 / tokens}


def sweeps(a: argparse.Namespace, tmp: str) -> dict[str, list[dict]]:
    """Each configuration in a fresh child process, so its peak memory is its own."""
    path = build_char_model(Path(tmp) / "model", **SHAPE)
    grid = {
        "G": [4, 8, 16] + ([] if a.quick else [32]),
        "L": [64, 128, 256] + ([] if a.quick else [512, 1024]),
        "P": [2, 4, 8] + ([] if a.quick else [16]),
    }
    out: dict[str, list[dict]] = {}
    for var, values in grid.items():
        out[var] = []
        for v in values:
            kw = {**BASE, var: v}
            cmd = [sys.executable, __file__, "--one", str(kw["P"]), str(kw["G"]), str(kw["L"]), "--model", str(path),
                   "--steps", str(a.steps), "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[scaling] {var}={v}: {r['step_s']:.2f}s/step ({r['cpu_s']:.2f} CPU-s), "
                  f"{r['cpu_ms_per_token']:.3f} CPU-ms per token, peak +{r['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
            out[var].append(r)
    return out


def growth(rows: list[dict]) -> dict[str, float]:
    """From the smallest to the largest configuration of a sweep: how much the work and the cost grew."""
    a, b = rows[0], rows[-1]
    return {"tokens_x": b["gen_tokens"] / a["gen_tokens"], "cpu_s_x": b["cpu_s"] / a["cpu_s"],
            "step_s_x": b["step_s"] / a["step_s"], "ms_per_token_first": a["cpu_ms_per_token"],
            "ms_per_token_last": b["cpu_ms_per_token"]}


# --------------------------------------------------------------------------------------------------
# LM-head memory at a large vocabulary


def naive_logprobs(model, sb, temperature: float = 1.0):
    """What dapo does not do: every position's fp32 logits at once, then log_softmax over all of them."""
    import torch

    T = sb.n_resp
    pos = (sb.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=sb.input_ids, attention_mask=sb.attention_mask, position_ids=pos).logits.float()  # (B, L, V)
    logp_all = torch.log_softmax(logits[:, -T - 1 : -1] / temperature, dim=-1)  # (B, T, V)
    lp = logp_all.gather(-1, sb.input_ids[:, -T:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, ent.detach()


def vocab_memory(a: argparse.Namespace, tmp: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from dapo.learner.policy import make_seq_batch, response_logprobs

    V = 151936
    path = build_char_model(Path(tmp) / "bigvocab", layers=2, hidden=256, heads=4, ffn=512, max_pos=2048, vocab_size=V)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    g = torch.Generator().manual_seed(0)
    rows = []
    for B, T in [(2, 256), (4, 256), (8, 256)] if not a.quick else [(2, 256), (4, 256)]:
        Lp = 32
        prompts = [torch.randint(4, V, (Lp,), generator=g).tolist() for _ in range(B)]
        resps = [torch.randint(4, V, (T,), generator=g).tolist() for _ in range(B)]
        sb = make_seq_batch(prompts, resps, 0)
        full_gb = B * (Lp + T) * V * 4 / 2**30
        for how in ("dapo", "naive"):
            for mode in ("no_grad", "fwd_bwd"):
                model.zero_grad(set_to_none=True)
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    if mode == "no_grad":
                        with torch.no_grad():
                            lp, ent = (response_logprobs(model, sb, 1.0, with_entropy=True) if how == "dapo"
                                       else naive_logprobs(model, sb))
                    else:
                        lp, ent = (response_logprobs(model, sb, 1.0, with_entropy=True) if how == "dapo"
                                   else naive_logprobs(model, sb))
                        (lp * sb.response_mask).sum().backward()
                    dt = time.perf_counter() - t0
                keep = (lp.detach().clone(), ent.clone())
                del lp, ent
                rows.append({"B": B, "T": T, "V": V, "method": how, "mode": mode, "peak_mb": mem.delta_mb,
                             "full_logits_mb": full_gb * 1024, "seconds": dt})
                if how == "dapo" and mode == "no_grad":
                    ref = keep
                elif how == "naive" and mode == "no_grad":  # the two must agree
                    rows[-1]["max_abs_diff_logp"] = float((keep[0] - ref[0]).abs().max())
                print(f"[vocab] B={B} T={T} {how} {mode}: peak +{mem.delta_mb:.0f} MB ({dt:.1f}s)",
                      file=sys.stderr, flush=True)
    model.zero_grad(set_to_none=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Rollout KV memory: reserved in full vs grown with the longest live row

KV_SHAPE = dict(layers=4, hidden=256, heads=4, ffn=512, max_pos=8192)
KV_RUN = dict(P=8, G=8, prompt_len=16, max_new_tokens=4096, mean_len=200)


def eos_bias(model, eos_id: int, mean_len: int, prompts) -> float:
    """A bias on the EOS logit that makes a random model stop after ~``mean_len`` tokens on average.

    A random model's next-token distribution is close to uniform over the 77 characters, so EOS would
    come after ~77 tokens; a bias b on its logit gives p(EOS) = sigmoid(z_eos + b - logsumexp(z_others)),
    and b is chosen so that this is 1 / mean_len on average over positions of the given prompts. The
    lengths are then roughly geometric (mean ~mean_len, a straggler or two several times longer),
    which is what compaction and growth must handle.
    """
    import math

    import torch

    with torch.no_grad():
        z = model(input_ids=torch.tensor(prompts)).logits.float().reshape(-1, model.config.vocab_size)  # (N, V)
    others = torch.cat([z[:, :eos_id], z[:, eos_id + 1 :]], dim=1).logsumexp(-1)
    gap = float((z[:, eos_id] - others).mean())
    p = 1.0 / mean_len
    return math.log(p / (1 - p)) - gap


def kv_one(model_path: Path, mode: str) -> dict[str, Any]:
    """A child: one generate() in ``mode`` (full | grow); peak RSS and the KV storage at its largest."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    from dapo.rollout import HFEngine, SamplingParams
    from dapo.rollout import hf as hf_mod

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = int(model.config.eos_token_id)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, model.config.vocab_size, (KV_RUN["prompt_len"],), generator=g).tolist()
               for _ in range(KV_RUN["P"])]
    V = model.config.vocab_size
    bias = torch.zeros(V)
    bias[eos] = eos_bias(model, eos, KV_RUN["mean_len"], prompts)
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)  # tied weight untouched; F.linear adds it

    held: dict[int, int] = {}  # id(layer) -> bytes of its key + value storage
    peak_kv = [0]
    real_expose = hf_mod._BufferedLayer._expose

    def expose(self):  # called after every allocation (init, growth, compaction) and every append
        held[id(self)] = (self._k.numel() + self._v.numel()) * self._k.element_size()
        peak_kv[0] = max(peak_kv[0], sum(held.values()))
        real_expose(self)

    hf_mod._BufferedLayer._expose = expose
    eng = HFEngine(model, 0, [eos], max_batch=KV_RUN["P"] * KV_RUN["G"],
                   **({"kv_headroom": None} if mode == "full" else {}))  # "grow": the engine's default
    params = SamplingParams(n=KV_RUN["G"], max_new_tokens=KV_RUN["max_new_tokens"])
    with PeakRSS() as mem:
        comps = eng.generate(prompts, params, seeds=list(range(KV_RUN["P"])))
    lens = sorted(len(c.token_ids) for c in comps)
    return {"mode": mode, "kv_headroom": eng.kv_headroom, "peak_mb": mem.delta_mb,
            "child_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kv_peak_mb": peak_kv[0] / 2**20, "mean_len": sum(lens) / len(lens), "median_len": lens[len(lens) // 2],
            "max_len": lens[-1], "stopped": sum(c.finish_reason == "stop" for c in comps), "rows": len(comps),
            "samples_sha1": hashlib.sha1(json.dumps([c.token_ids.tolist() for c in comps]).encode()).hexdigest()}


def kv_memory(a: argparse.Namespace, tmp: str) -> list[dict]:
    path = build_char_model(Path(tmp) / "kvmodel", **KV_SHAPE)
    rows = []
    for mode in ("full", "grow"):
        cmd = [sys.executable, __file__, "--kv-one", mode, "--model", str(path), "--threads", str(a.threads)]
        env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_PERTURB_="85")  # see the module docstring
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[kv] {mode}: peak +{r['peak_mb']:.0f} MB, KV storage {r['kv_peak_mb']:.0f} MB, "
              f"lengths mean {r['mean_len']:.0f} max {r['max_len']}", file=sys.stderr, flush=True)
        rows.append(r)
    if rows[0]["samples_sha1"] != rows[1]["samples_sha1"]:
        raise RuntimeError("full and growing KV storage sampled different completions")
    return rows


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller grid")
    ap.add_argument("--steps", type=int, default=3, help="timed RL steps per configuration (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["sweeps", "vocab", "kv"], help="run one part")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE: for a machine other busy processes share; on an idle one it costs "
                         "every parallel op a thread wake-up (default: the environment's policy, as dapo train)")
    ap.add_argument("--one", nargs=3, type=int, metavar=("P", "G", "L"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--kv-one", choices=["full", "grow"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    set_threads(a.threads)
    if a.one:  # a child: one configuration, one JSON line
        with tempfile.TemporaryDirectory(prefix="bench-scaling-one-") as tmp:
            emit_json(rl_step_costs(Path(a.model), *a.one, a.steps, tmp))
        return 0
    if a.kv_one:
        emit_json(kv_one(Path(a.model), a.kv_one))
        return 0
    res: dict[str, Any] = {"bench": "scaling", "machine": machine(), "shape": SHAPE, "base": BASE}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        if a.only in (None, "sweeps"):
            res["sweeps"] = sweeps(a, tmp)
            res["growth"] = {var: growth(rows) for var, rows in res["sweeps"].items()}
            cols = ["P", "G", "L", "gen_tokens", "step_s", "cpu_s", "gen_s", "update_s", "cpu_ms_per_token",
                    "gen_tok_per_s", "peak_mb", "peak_kb_per_token"]
            for var, rows in res["sweeps"].items():
                print(f"\nRL step cost as {var} grows ({SHAPE['layers']} layers x {SHAPE['hidden']}, EOS ignored; "
                      f"median of {a.steps} steps; peak = peak RSS over the steps minus RSS before them)")
                print(table(rows, cols))
            print("\nGrowth, smallest -> largest configuration of each sweep (CPU seconds; wall in brackets)")
            for var, g in res["growth"].items():
                print(f"  {var}: tokens x{g['tokens_x']:.0f} -> cost x{g['cpu_s_x']:.1f} (wall x{g['step_s_x']:.1f}); "
                      f"CPU-ms per generated token {g['ms_per_token_first']:.2f} -> {g['ms_per_token_last']:.2f}")
        if a.only in (None, "vocab"):
            res["vocab"] = vocab_memory(a, tmp)
            print("\nLog-probs + entropy of B x T response tokens at V = 151,936: peak RSS over the call")
            print(table(res["vocab"], ["B", "T", "method", "mode", "peak_mb", "full_logits_mb", "seconds",
                                       "max_abs_diff_logp"], nd=1))
        if a.only in (None, "kv"):
            res["kv"] = kv_memory(a, tmp)
            print(f"\nRollout KV memory: {KV_RUN['P']} prompts x {KV_RUN['G']} samples, max_new_tokens="
                  f"{KV_RUN['max_new_tokens']}, EOS biased to ~{KV_RUN['mean_len']} tokens "
                  f"({KV_SHAPE['layers']} layers x {KV_SHAPE['hidden']}, fp32); same samples both ways")
            print(table(res["kv"], ["mode", "kv_headroom", "peak_mb", "child_maxrss_mb", "kv_peak_mb", "mean_len",
                                    "median_len", "max_len", "stopped", "rows"], nd=1))
    emit_json(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
