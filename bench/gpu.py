"""dapo on one GPU, on the path a run takes, against the hardware's limits.

    python bench/gpu.py                   # needs CUDA; a Qwen2.5-0.5B-shaped model, random init
    python bench/gpu.py --smoke           # the same code on CPU with a toy shape: checks the script, not the GPU

What runs is what ``dapo train`` builds on one GPU with ``model.dtype=bfloat16`` (the default there):
``dapo.model.load_policy`` (float32 master weights), ``dapo.model.make_optimizer`` (float32 fused AdamW),
a ``LocalLearner`` whose forward and backward run under bf16 autocast with the float32 LM head, and the
default sampler: an ``HFEngine`` on the trained model object itself, under the same autocast, its KV cache
in bf16. Nothing is switched on globally (no TF32 for every matmul); the head's TF32 is the A/B below.

Rollout: B prompts x G samples, EOS ignored so every response is exactly L tokens. A decode step reads

    weights (in the compute dtype: autocast casts the float32 masters once per generate and keeps the copy)
    + each row's KV cache at its mean length (KV bytes per token x context)
    + the sampler's vocabulary traffic per row: the (rows, V) logits written in bf16 and read back as
      float32 (2 + 2 + 4), log-softmax (4 + 4), softmax (4 + 4) and its cumulative sum (4 + 4):
      32 bytes x V per row, 4.9 MB at V = 151,936, as much as 2.4M bf16 weights

so tokens/s <= rows x bandwidth / step bytes, with the bandwidth measured here (a device-to-device copy)
and the datasheet's beside it. The peak memory of one rollout is measured at a DAPO-like length.

Training: ``LocalLearner.update`` on a synthetic batch of R responses (random advantages, every token
trained): mini-batch forward + backward + AdamW step, as a run does. FLOPs per token = 6 N + 12 x layers x
hidden x context; MFU = achieved / the datasheet's dense bf16 peak (a measured bf16 GEMM rate beside it).
``model.head_tf32`` off and on: the update's time and how far the head's log-probs move (the mismatch it
would add), so the default can be chosen on figures.

Without CUDA the script says so and exits with status 2 (``--smoke`` runs everywhere).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, machine, table  # noqa: E402

# Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B): 494M parameters with tied embeddings
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
                  tie_word_embeddings=True, rms_norm_eps=1e-6)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1000, max_position_embeddings=4096, rope_theta=1_000_000.0, tie_word_embeddings=True,
             rms_norm_eps=1e-6)
VOCAB_BYTES_PER_ROW = 32
"""Bytes the sampler moves per vocabulary entry per row per decode step (see the module docstring)."""

# datasheet dense (no sparsity) bf16 tensor-core peak in TFLOP/s, and HBM bandwidth in TB/s, by name substring
DATASHEET = [
    ("H200", 989.0, 4.8), ("H100 SXM", 989.0, 3.35), ("H100 80GB HBM3", 989.0, 3.35), ("H100 NVL", 835.0, 3.9),
    ("H100 PCIe", 756.0, 2.0), ("H100", 756.0, 2.0), ("A100-SXM4-80GB", 312.0, 2.04), ("A100-SXM4-40GB", 312.0, 1.56),
    ("A100 80GB PCIe", 312.0, 1.94), ("A100", 312.0, 1.56), ("L40S", 362.0, 0.86), ("L4", 121.0, 0.3),
    ("A10G", 70.0, 0.6), ("A10", 125.0, 0.6), ("RTX 4090", 165.0, 1.0), ("RTX 3090", 71.0, 0.94),
]


def datasheet(name: str) -> tuple[float | None, float | None]:
    for key, tflops, tbs in DATASHEET:
        if key.lower() in name.lower():
            return tflops, tbs
    return None, None


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(dev, gib: float = 1.0) -> float:
    """Achieved device memory bandwidth in bytes/s: a large copy reads and writes every byte once."""
    import torch

    n = int(gib * 2**30) // 4
    a = torch.empty(n, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(dev)
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        b.copy_(a)
    sync(dev)
    return 2 * a.numel() * 4 * reps / (time.perf_counter() - t0)


def measure_gemm(dev, dtype, n: int = 8192) -> float:
    """Achieved dense GEMM FLOP/s at n x n x n."""
    import torch

    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def save_model(shape: dict, out: Path) -> Path:
    """A random Qwen2 of ``shape`` saved in Hugging Face format (float32): what ``load_policy`` reads."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def run_config(path: Path, device: str, head_tf32: bool, micro: int):
    from dapo.config import load_config

    return load_config(overrides=[f"model.path={path}", f"model.device={device}", "model.dtype=bfloat16",
                                  f"model.head_tf32={str(head_tf32).lower()}", "model.attn_implementation=sdpa",
                                  f"optim.micro_batch_size={micro}", "optim.lr=1e-6", "rollout.group_size=8"])


def build(cfg, dev):
    """Model, optimiser and learner exactly as ``dapo.trainer.build`` makes them for one process."""
    from dapo.learner import LocalLearner
    from dapo.model import compute_dtype, load_policy, make_optimizer

    dtype = compute_dtype(cfg.model.dtype, dev)
    model = load_policy(cfg.model, cfg.model.path, dev)
    opt, sched = make_optimizer(cfg.optim, model)
    return model, LocalLearner(cfg, model, opt, sched, 0, dev, dtype, sampler_shares_model=True), dtype


def kv_bytes_per_token(model, kv_dtype) -> int:
    import torch

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.empty(0, dtype=kv_dtype).element_size()


def rollout(model, dtype, dev, B: int, G: int, Lp: int, L: int) -> dict[str, Any]:
    import torch

    from dapo.rollout.base import SamplingParams, derive_seed
    from dapo.rollout.hf import HFEngine

    V = model.config.vocab_size
    g = torch.Generator().manual_seed(B)
    prompts = [torch.randint(3, V, (Lp,), generator=g).tolist() for _ in range(B)]
    eng = HFEngine(model, pad_token_id=0, eos_token_ids=[], max_batch=B * G, compute_dtype=dtype)  # the default
    seeds = [derive_seed(0, i) for i in range(B)]
    eng.generate(prompts, SamplingParams(n=G, max_new_tokens=8), seeds)  # warm-up
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    comps = eng.generate(prompts, SamplingParams(n=G, max_new_tokens=L), seeds)  # no EOS: exactly L tokens each
    sync(dev)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for c in comps)
    assert tokens == B * G * L, (tokens, B * G * L)
    rows = B * G
    w_bytes = sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()
    kv_tok = kv_bytes_per_token(model, eng.kv_dtype or dtype)
    vocab_row = VOCAB_BYTES_PER_ROW * V
    step_bytes = w_bytes + rows * (kv_tok * (Lp + L / 2) + vocab_row)
    out = {"rows": rows, "prompt_len": Lp, "resp_len": L, "seconds": dt, "tokens_per_s": tokens / dt,
           "kv_bytes_per_token": kv_tok, "step_gb": step_bytes / 1e9, "weights_gb": w_bytes / 1e9,
           "vocab_share": rows * vocab_row / step_bytes, "kv_dtype": str(eng.kv_dtype or dtype)}
    if dev.type == "cuda":
        out["peak_gb_over_model"] = (torch.cuda.max_memory_allocated() - base_mem) / 1e9
        out["kv_gb_at_end"] = rows * kv_tok * (Lp + L) / 1e9
    return out


def train_batch(V: int, rows: int, Lp: int, T: int, G: int = 8):
    import torch

    from dapo.learner import TrainBatch

    g = torch.Generator().manual_seed(rows)
    base = [torch.randint(3, V, (Lp,), generator=g).tolist() for _ in range(max(1, rows // G))]
    prompts = [p for p in base for _ in range(G)][:rows]
    resps = [torch.randint(3, V, (T,), generator=g) for _ in range(rows)]
    adv = torch.randn(rows, generator=g).sign()
    return TrainBatch.of(prompts, resps, [torch.full((T,), -2.0) for _ in range(rows)], [True] * rows, adv,
                         torch.ones(rows)), len(base)


def training(learner, dev, rows: int, Lp: int, T: int, steps: int = 3) -> dict[str, Any]:
    import torch

    model = learner.model
    batch, n_prompts = train_batch(model.config.vocab_size, rows, Lp, T)
    old = learner.old_logp(batch)  # the run's own recompute, bf16 autocast + float32 head
    learner.cfg = dataclasses.replace(learner.cfg, optim=dataclasses.replace(
        learner.cfg.optim, train_batch_size=rows // 8, mini_batch_size=rows // 8))  # one optimiser step
    learner.update(batch, old, 0)  # warm-up (allocates AdamW's state)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for s in range(steps):
        learner.update(batch, old, s + 1)
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    c = model.config
    n = sum(p.numel() for p in model.parameters())  # the tied embedding counts once, as the LM head
    tokens = n_prompts * Lp + rows * T  # prompts once per group (shared prefill), responses once per row
    flops = tokens * (6 * n + 12 * c.num_hidden_layers * c.hidden_size * (Lp + T))
    out = {"rows": rows, "prompt_len": Lp, "resp_len": T, "head_tf32": learner.cfg.model.head_tf32,
           "seconds_per_update": dt, "train_tokens_per_s": tokens / dt, "tflops": flops / dt / 1e12}
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def head_tf32_drift(learner, rows: int, Lp: int, T: int) -> dict[str, float]:
    """How far ``model.head_tf32`` moves the recomputed log-probs of one batch: the mismatch it would add."""
    import torch

    batch, _ = train_batch(learner.model.config.vocab_size, rows, Lp, T)
    off = learner.old_logp(batch).values
    learner.cfg = dataclasses.replace(learner.cfg, model=dataclasses.replace(learner.cfg.model, head_tf32=True))
    from dapo.learner.policy import ResponseLogprobs

    learner.policy = ResponseLogprobs(learner.model, learner.compute_dtype, True)
    on = learner.old_logp(batch).values
    d = (on - off).abs()
    return {"logp_abs_diff_mean": float(d.mean()), "logp_abs_diff_max": float(d.max()),
            "ratio_dev_mean": float(torch.expm1((on - off)).abs().mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="run on CPU with a toy shape (checks the script only)")
    ap.add_argument("--resp-len", type=int, default=512, help="response tokens for the rollout and training runs")
    ap.add_argument("--long", type=int, default=8192, help="response tokens of the one long rollout (peak memory)")
    a = ap.parse_args(argv)
    import torch

    from dapo.learner.policy import ResponseLogprobs

    if a.smoke:
        dev, shape = torch.device("cpu"), SMOKE
        rollout_grid, train_grid, L, long_rows, long_len = [(2, 4)], [8], 16, 8, 48
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py: CUDA is not available on this machine (torch "
                  f"{torch.__version__}, {'CPU-only build' if torch.version.cuda is None else 'no visible GPU'}). "
                  "It measures dapo against a GPU's limits; run it on a CUDA machine, or pass --smoke to check the "
                  "script on CPU.", file=sys.stderr)
            return 2
        dev, shape = torch.device("cuda"), QWEN25_05B
        rollout_grid, train_grid, L, long_rows, long_len = [(4, 16), (16, 16), (32, 16)], [64, 128], a.resp_len, 64, a.long
    info = machine()
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (smoke)"
    peak_tflops, sheet_tbs = datasheet(name) if dev.type == "cuda" else (None, None)
    bw = measure_bandwidth(dev, 1.0 if dev.type == "cuda" else 0.05)
    gemm = measure_gemm(dev, torch.bfloat16, 8192 if dev.type == "cuda" else 256)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(shape, Path(tmp) / "model")
        cfg = run_config(path, dev.type, head_tf32=False, micro=8 if a.smoke else 32)
        model, learner, dtype = build(cfg, dev)
        n = sum(p.numel() for p in model.parameters())
        print(f"[gpu] {name}: {n / 1e6:.0f}M parameters, float32 masters under {dtype} autocast; copy bandwidth "
              f"{bw / 1e12:.2f} TB/s, bf16 GEMM {gemm / 1e12:.1f} TFLOP/s", file=sys.stderr)
        roll = []
        for B, G in rollout_grid:
            r = rollout(model, dtype, dev, B, G, 64, L)
            r["bound_tokens_per_s"] = r["rows"] * bw / (r["step_gb"] * 1e9)
            r["frac_of_bound"] = r["tokens_per_s"] / r["bound_tokens_per_s"]
            if sheet_tbs:
                r["frac_of_datasheet_bound"] = r["tokens_per_s"] / (r["rows"] * sheet_tbs * 1e12 / (r["step_gb"] * 1e9))
            roll.append(r)
            print(f"[gpu] rollout {r['rows']} rows: {r['tokens_per_s']:.0f} tok/s ({r['frac_of_bound']:.0%} of bound)",
                  file=sys.stderr)
        long = rollout(model, dtype, dev, long_rows // 8, 8, 256 if not a.smoke else 16, long_len)
        print(f"[gpu] long rollout {long_rows} rows x {long_len} tokens: {long['seconds']:.1f}s, "
              f"peak {long.get('peak_gb_over_model', float('nan')):.2f} GB over the model", file=sys.stderr)
        train = []
        for tf32 in (False, True):
            learner.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head_tf32=tf32))
            learner.policy = ResponseLogprobs(model, dtype, tf32)
            for rows in train_grid:
                t = training(learner, dev, rows, 64, L)
                t["mfu"] = t["tflops"] / peak_tflops if peak_tflops else float("nan")
                t["frac_of_measured_gemm"] = t["tflops"] * 1e12 / gemm
                train.append(t)
                print(f"[gpu] update {rows} rows, head_tf32={tf32}: {t['seconds_per_update']:.3f}s, "
                      f"{t['tflops']:.1f} TFLOP/s", file=sys.stderr)
        learner.policy = ResponseLogprobs(model, dtype, False)
        learner.cfg = cfg
        drift = head_tf32_drift(learner, train_grid[0], 64, L)
        state = learner.optimizer.state[next(iter(learner.optimizer.state))]
        dtypes = {"weights": str(next(model.parameters()).dtype), "adam_exp_avg": str(state["exp_avg"].dtype),
                  "kv_cache": roll[0]["kv_dtype"]}
    print(f"\n{name}, {n / 1e6:.1f}M parameters ({'toy shape' if a.smoke else 'Qwen2.5-0.5B shape'}); "
          f"dtypes {dtypes}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (datasheet {sheet_tbs or 'n/a'}), bf16 peak "
          f"{peak_tflops or 'n/a'} TFLOP/s (measured GEMM {gemm / 1e12:.1f})")
    print("\nRollout on the default sampler (EOS ignored, 64-token prompts); the bound counts weights, KV and the "
          "sampler's vocabulary traffic")
    print(table(roll, ["rows", "resp_len", "seconds", "tokens_per_s", "bound_tokens_per_s", "frac_of_bound",
                       "kv_bytes_per_token", "vocab_share"]))
    print(f"\nOne long rollout: {long['rows']} rows x {long['resp_len']} tokens after {long['prompt_len']}-token "
          f"prompts, {long['seconds']:.1f}s, peak {long.get('peak_gb_over_model', float('nan')):.2f} GB over the "
          f"model (KV at the end {long.get('kv_gb_at_end', float('nan')):.2f} GB)")
    print("\nUpdate (LocalLearner.update: fwd + bwd + AdamW, 64-token prompts shared by 8 rows), head TF32 off/on")
    print(table(train, ["rows", "resp_len", "head_tf32", "seconds_per_update", "train_tokens_per_s", "tflops", "mfu",
                        "frac_of_measured_gemm"]))
    print(f"\nhead TF32 moves the recomputed log-probs by {drift['logp_abs_diff_mean']:.2e} on average "
          f"(max {drift['logp_abs_diff_max']:.2e})")
    emit_json({"bench": "gpu", "machine": info, "device": name, "params": n, "dtypes": dtypes,
               "bandwidth_tbs": bw / 1e12, "datasheet_tbs": sheet_tbs, "peak_tflops": peak_tflops,
               "gemm_tflops": gemm / 1e12, "rollout": roll, "long_rollout": long, "training": train,
               "head_tf32_drift": drift, "smoke": a.smoke})
    return 0


if __name__ == "__main__":
    sys.exit(main())
