"""dapo on one GPU against the hardware's limits: rollout against the decode bandwidth bound, training MFU.

    python bench/gpu.py                   # needs CUDA; a Qwen2.5-0.5B-shaped model, random init, bf16
    python bench/gpu.py --smoke           # the same code on CPU with a toy shape: checks the script, not the GPU

Rollout: ``HFEngine.generate`` on B prompts x G samples, EOS ignored so every response is exactly L
tokens. Decoding one token for every row reads all the weights once plus each row's KV cache, so

    tokens/s <= B_rows x bandwidth / (weight bytes + KV bytes read per step)

with the bandwidth measured here (a large device-to-device copy) and, where the device is known, the
datasheet figure. The table gives the achieved fraction of that bound.

Training: ``response_logprobs`` forward + backward (what ``update_policy`` runs per micro-batch) plus
an AdamW step, on micro-batches of responses; model FLOPs per token = 6 N (dense weights, N without the
embedding lookup, with the tied LM head) + 12 x layers x hidden x context (attention), and
MFU = achieved FLOP/s / the GPU's dense bf16 peak (datasheet table below; a measured bf16 GEMM rate is
printed beside it).

No GPU is lent to this project at the moment: without CUDA the script says so and exits with status 2.
"""
from __future__ import annotations

import argparse
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


def build_model(shape: dict, dev, dtype, tmp: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model.to(device=dev, dtype=dtype)


def rollout(model, dev, B: int, G: int, Lp: int, L: int) -> dict[str, Any]:
    import torch

    from dapo.rollout.base import SamplingParams, derive_seed
    from dapo.rollout.hf import HFEngine

    V = model.config.vocab_size
    g = torch.Generator().manual_seed(B)
    prompts = [torch.randint(3, V, (Lp,), generator=g).tolist() for _ in range(B)]
    eng = HFEngine(model, pad_token_id=0, eos_token_ids=[], max_batch=B * G)  # no EOS: exactly L tokens each
    params = SamplingParams(n=G, max_new_tokens=L)
    seeds = [derive_seed(0, i) for i in range(B)]
    eng.generate(prompts, SamplingParams(n=G, max_new_tokens=8), seeds)  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    comps = eng.generate(prompts, params, seeds)
    sync(dev)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for c in comps)
    assert tokens == B * G * L
    # bytes read per decode step: every weight once, plus each row's KV cache at its mean length
    c = model.config
    w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = c.hidden_size // c.num_attention_heads
    kv_per_tok = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    rows = B * G
    mean_ctx = Lp + L / 2
    step_bytes = w_bytes + rows * kv_per_tok * mean_ctx
    return {"rows": rows, "prompt_len": Lp, "resp_len": L, "seconds": dt, "tokens_per_s": tokens / dt,
            "step_bytes_gb": step_bytes / 1e9, "weights_gb": w_bytes / 1e9}


def training(model, dev, rows: int, Lp: int, T: int, steps: int = 3) -> dict[str, Any]:
    import torch

    from dapo.learner.policy import make_seq_batch, response_logprobs

    V = model.config.vocab_size
    g = torch.Generator().manual_seed(rows)
    G = 8
    base = [torch.randint(3, V, (Lp,), generator=g).tolist() for _ in range(max(1, rows // G))]
    prompts = [p for p in base for _ in range(G)][:rows]
    resps = [torch.randint(3, V, (T,), generator=g).tolist() for _ in range(rows)]
    sb = make_seq_batch(prompts, resps, 0).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=dev.type == "cuda")
    model.train()

    def one() -> None:
        lp, ent = response_logprobs(model, sb, 1.0, with_entropy=True)
        (lp * sb.response_mask).sum().div(sb.response_mask.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    c = model.config
    n_dense = sum(p.numel() for p in model.parameters())  # the tied embedding counts once, as the LM head
    # prompt tokens run once per prompt (shared), response tokens once per row
    tokens = (len(base) * Lp + rows * T)
    ctx = Lp + T
    flops = tokens * (6 * n_dense + 12 * c.num_hidden_layers * c.hidden_size * ctx)
    out = {"rows": rows, "prompt_len": Lp, "resp_len": T, "seconds_per_update": dt, "train_tokens_per_s": tokens / dt,
           "tflops": flops / dt / 1e12}
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="run on CPU with a toy shape (checks the script only)")
    ap.add_argument("--resp-len", type=int, default=512, help="response tokens for the rollout and training runs")
    a = ap.parse_args(argv)
    import torch

    if a.smoke:
        dev, dtype, shape = torch.device("cpu"), torch.float32, SMOKE
        rollout_grid, train_grid, L = [(2, 4)], [8], 16
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py: CUDA is not available on this machine (torch "
                  f"{torch.__version__}, {'CPU-only build' if torch.version.cuda is None else 'no visible GPU'}). "
                  "It measures dapo against a GPU's limits; run it on a CUDA machine, or pass --smoke to check the "
                  "script on CPU.", file=sys.stderr)
            return 2
        dev, dtype, shape = torch.device("cuda"), torch.bfloat16, QWEN25_05B
        rollout_grid, train_grid, L = [(4, 16), (16, 16), (32, 16)], [8, 16, 32], a.resp_len
        torch.backends.cuda.matmul.allow_tf32 = True
    info = machine()
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (smoke)"
    peak_tflops, sheet_tbs = datasheet(name) if dev.type == "cuda" else (None, None)
    bw = measure_bandwidth(dev, 1.0 if dev.type == "cuda" else 0.05)
    gemm = measure_gemm(dev, dtype, 8192 if dev.type == "cuda" else 256)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(shape, dev, dtype, tmp)
        n = sum(p.numel() for p in model.parameters())
        print(f"[gpu] {name}: {n / 1e6:.0f}M parameters, {dtype}; measured copy bandwidth {bw / 1e12:.2f} TB/s, "
              f"GEMM {gemm / 1e12:.1f} TFLOP/s", file=sys.stderr)
        roll = []
        for B, G in rollout_grid:
            r = rollout(model, dev, B, G, 64, L)
            bound = r["rows"] * bw / (r["step_bytes_gb"] * 1e9)
            r.update(bound_tokens_per_s=bound, frac_of_bound=r["tokens_per_s"] / bound)
            if sheet_tbs:
                r["frac_of_datasheet_bound"] = r["tokens_per_s"] / (r["rows"] * sheet_tbs * 1e12 / (r["step_bytes_gb"] * 1e9))
            roll.append(r)
            print(f"[gpu] rollout {r['rows']} rows: {r['tokens_per_s']:.0f} tok/s ({r['frac_of_bound']:.0%} of bound)",
                  file=sys.stderr)
        train = []
        for rows in train_grid:
            t = training(model, dev, rows, 64, L)
            t["mfu"] = t["tflops"] * 1e12 / (peak_tflops * 1e12) if peak_tflops else float("nan")
            t["frac_of_measured_gemm"] = t["tflops"] * 1e12 / gemm
            train.append(t)
            print(f"[gpu] training {rows} rows: {t['train_tokens_per_s']:.0f} tok/s, {t['tflops']:.1f} TFLOP/s",
                  file=sys.stderr)
    print(f"\n{name}, {n / 1e6:.1f}M parameters ({'toy shape' if a.smoke else 'Qwen2.5-0.5B shape'}), {dtype}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (datasheet {sheet_tbs or 'n/a'}), bf16 peak "
          f"{peak_tflops or 'n/a'} TFLOP/s (measured GEMM {gemm / 1e12:.1f})")
    print("\nRollout (EOS ignored, 64-token prompts)")
    print(table(roll, ["rows", "resp_len", "seconds", "tokens_per_s", "bound_tokens_per_s", "frac_of_bound"]))
    print("\nTraining (response_logprobs fwd + bwd + AdamW, 64-token prompts shared by 8 rows)")
    print(table(train, ["rows", "resp_len", "seconds_per_update", "train_tokens_per_s", "tflops", "mfu",
                        "frac_of_measured_gemm"]))
    emit_json({"bench": "gpu", "machine": info, "device": name, "params": n, "dtype": str(dtype),
               "bandwidth_tbs": bw / 1e12, "datasheet_tbs": sheet_tbs, "peak_tflops": peak_tflops,
               "gemm_tflops": gemm / 1e12, "rollout": roll, "training": train, "smoke": a.smoke})
    return 0


if __name__ == "__main__":
    sys.exit(main())
