"""dapo against TRL's GRPOTrainer configured as DAPO: seconds per RL step at the same work, side by side.

    python bench/vs_trl.py                       # both model sizes, 2 threads
    python bench/vs_trl.py --models tiny --steps 8
    python bench/vs_trl.py --models tiny --procs 2 --threads 1   # both sides data-parallel over 2 processes

Same checkpoint, prompts (the built-in addition task), reward (its exact verifier), group size G,
prompts per rollout, max response length, learning rate (constant), and optimiser steps per rollout.
One RL step = generate P x G responses, score them, old log-probs, P / mini optimiser steps of
mini x G responses each. In TRL terms: per_device_train_batch_size = mini x G, gradient_accumulation_steps
= 1, steps_per_generation = P / mini, num_iterations = 1, so one TRL "step" is one optimiser step and
one rollout spans P / mini of them (and TRL recomputes old log-probs, as its generation and optimiser
steps are not aligned). fp32 on both sides (TRL's bf16 default is turned off). Dynamic sampling and the
soft overlong penalty are off so both do exactly the same work; overlong filtering is on
(TRL: mask_truncated_completions) unless --no-overlong-filter.

Both sides run under the same OpenMP wait policy: the environment's (libgomp's default when unset: a waiting
thread spins a few ms before it sleeps, right on an idle machine), or ``--omp-passive`` (threads sleep at once:
for cores shared with other busy processes, at the cost of a thread wake-up on every parallel op).

Each side runs in its own worker process (this script with --worker), started from this one, set up and
warmed up, then stepped alternately A B A B over a pipe, so both see the same machine load. A step's
time runs from the "go" command to the end of the RL step, as the worker sees it (dapo: ``train``'s
on_step callback; TRL: a TrainerCallback at the rollout's last on_step_end). The split:
gen = generation, old_logp = old log-probs (no grad), update = the rest (optimiser steps, scoring, bookkeeping).

Roofline columns (``gen %``, ``train %``, ``step %``): each side's model FLOPs per step over its time, as a
fraction of this machine's fp32 GEMM rate measured in the same run (``torch.matmul`` at the step's shapes,
a short burst after every A-B pair, with the sides' thread count). Model FLOPs, the usual count
(Kaplan et al. 2020; MFU-style: work the model needs, not what an implementation recomputes, so the old
log-prob pass is not counted): N = parameters that multiply (all of them, less the input embedding
when it is not tied to the LM head), d = hidden size, n_layer layers, P prompts of p tokens, G responses
of r tokens each (the step's mean), S = p + r:

    generation = 2 N (P p + P G r)                         prefill of each prompt once, one forward per new token
               + 4 d n_layer (P p (p+1)/2 + P G (r p + r (r+1)/2))   attention: QK^T and AV, 2 d FLOPs each
                                                           per (query, key) pair, causal
    training   = 3 x [2 N P G S + 4 d n_layer P G S (S+1)/2] x k     forward + backward of the responses in
                                                           the loss: k = 1 - truncated fraction with overlong
                                                           filtering (a masked response needs no gradient), else 1

gen % = generation / gen_s / GEMM rate at the decode shapes (P G rows x d @ d x ffn and back);
train % = training / (step_s - gen_s) / GEMM rate at a micro-batch's shapes (mini G S rows); step % =
(generation / gen rate + training / train rate) / step_s: the share of the step the machine would need
at its GEMM rate. Small models on a CPU spend most of a step outside GEMMs, so these are low; they say
how far each side is from what the arithmetic would allow, not which side does more work.

``--procs N`` runs each side data-parallel over N processes, the way each framework does it: dapo as N Ray
trainer ranks that also sample (``dist.trainer_ranks=N dist.rollout_on_ranks=true``; Ray gives each rank
one CPU and one thread, whatever ``--threads``); TRL as N ``torch.distributed`` (gloo) processes under
accelerate with ``--threads`` threads each, each generating and training on 1/N of every batch (the
worker starts ranks 1..N-1 itself and times rank 0). Use ``--threads 1`` for the same footing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_SHAPES, emit_json, machine, model_dir, n_params, set_threads, summary, table  # noqa: E402

SIDES = ("dapo", "trl")
BEFORE = "dapo@before"
"""With ``--before SRC``: a third side, the dapo worker importing dapo from the checkout SRC (before/after in one run)."""


def sides(a: argparse.Namespace) -> tuple[str, ...]:
    return (*SIDES, BEFORE) if a.before else SIDES


# --------------------------------------------------------------------------------------------------
# worker side: a pipe protocol of JSON lines on a private copy of stdout (libraries print to stdout too)


class Pipe:
    def __init__(self):
        self.at_exit: list = []  # called before the worker exits on the parent's "quit"
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # anything else printed goes to stderr

    def send(self, **kw: Any) -> None:
        self.out.write(json.dumps(kw) + "\n")

    def wait_go(self) -> float:
        """Block until the parent says go; returns the time it did. Exits on anything else."""
        cmd = sys.stdin.readline().strip()
        if cmd != "go":
            self.out.flush()
            for f in self.at_exit:
                f()
            os._exit(0)
        return time.perf_counter()


def dapo_worker(a: argparse.Namespace, pipe: Pipe) -> None:
    from dapo.config import load_config
    from dapo.trainer.loop import train

    set_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="bench-dapo-")
    procs = [f"dist.trainer_ranks={a.procs}", "dist.rollout_on_ranks=true"] if a.procs > 1 else []
    cfg = load_config(overrides=[
        f"model.path={a.model}", "model.device=cpu", "model.dtype=float32",
        f"rollout.group_size={a.G}", f"rollout.max_new_tokens={a.max_new}", "rollout.temperature=1.0",
        f"optim.train_batch_size={a.prompts}", f"optim.mini_batch_size={a.mini}",
        f"optim.micro_batch_size={a.mini * a.G}", f"optim.lr={a.lr}", "optim.grad_clip=1.0",
        f"optim.steps={a.warmup + a.steps + 1}", "algo.dynamic_sampling=false", "algo.soft_overlong=false",
        f"algo.overlong_filter={'false' if a.no_overlong_filter else 'true'}", "eval.size=0", f"seed={a.seed}",
        f"log.out_dir={tmp}", "log.run_name=r", "log.progress=none", "log.tensorboard=false",
        "log.samples_every=0", "ckpt.save_final=false", "algo.max_idle_steps=0",  # a random 25M model gets
        *procs, *a.dapo_override,  # every answer wrong: a timing run, not one that must learn
    ])
    st: dict[str, Any] = {"t_go": None, "c_go": None}

    def on_step(step: int, m: dict) -> None:
        t, c = time.perf_counter(), time.process_time()
        if step < a.warmup:
            return
        if step == a.warmup:
            pipe.send(ready=True, threads=__import__("torch").get_num_threads())
        else:
            wall = t - st["t_go"]
            gen, old = m["time/gen"], m.get("time/old_logp", 0.0)
            pipe.send(wall=wall, gen=gen, old_logp=old, update=wall - gen - old, cpu=c - st["c_go"],
                      tokens=m["response/len_mean"] * a.prompts * a.G, reward=m["rollout/reward"],
                      truncated=m["response/truncated_frac"])
        st["t_go"] = pipe.wait_go()
        st["c_go"] = time.process_time()

    train(cfg, log_stream=sys.stderr, on_step=on_step)
    pipe.send(error="dapo ran out of steps")


def _trl_ranks(a: argparse.Namespace) -> tuple[int, list[subprocess.Popen]]:
    """--procs N: this worker becomes rank 0 of an N-process gloo group and starts ranks 1..N-1 (same
    script and arguments, --rank k), which train alongside it without talking to the parent."""
    if a.procs <= 1:
        return 0, []
    if a.rank == 0:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), GLOO_SOCKET_IFNAME="lo")
    os.environ.update(WORLD_SIZE=str(a.procs), RANK=str(a.rank), LOCAL_RANK=str(a.rank), LOCAL_WORLD_SIZE=str(a.procs))
    kids = []
    if a.rank == 0:
        for k in range(1, a.procs):
            log = open(Path(tempfile.gettempdir()) / f"bench-vs-trl-trl-rank{k}.log", "w")
            kids.append(subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--rank", str(k)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=dict(os.environ)))
    return a.rank, kids


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trl_worker(a: argparse.Namespace, pipe: Pipe | None) -> None:
    rank, kids = _trl_ranks(a)
    if pipe is not None:
        pipe.at_exit.append(lambda: [k.kill() for k in kids])
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dapo.data.tasks import get_task, task_splits

    set_threads(a.threads)
    task = get_task("addition")
    spg = a.prompts // a.mini  # optimiser steps per rollout
    n_rollouts = a.warmup + a.steps + 2
    _, stream = task_splits(task, a.seed, 0)
    exs = stream.take(a.prompts * n_rollouts)
    data = Dataset.from_dict({"prompt": [e.prompt for e in exs], "answer": [e.answer for e in exs]})
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    st: dict[str, Any] = {"gen": 0.0, "old_logp": 0.0, "tokens": 0, "reward": 0.0, "t_go": None, "c_go": None,
                          "truncated": 0.0}
    eos = {tokenizer.eos_token_id}

    def reward(completions, answer, completion_ids, **kw):
        st["tokens"] += sum(len(c) for c in completion_ids)
        st["truncated"] = sum(1 for c in completion_ids if not c or c[-1] not in eos) / len(completion_ids)
        r = [task.score(c, ans)[0] for c, ans in zip(completions, answer)]
        st["reward"] = sum(r) / len(r)  # one call per rollout
        return r

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), use_cpu=True, bf16=False, fp16=False, seed=a.seed,
        num_generations=a.G, per_device_train_batch_size=a.mini * a.G // a.procs, gradient_accumulation_steps=1,
        steps_per_generation=spg, num_iterations=1, max_completion_length=a.max_new, temperature=1.0, top_p=1.0,
        top_k=0, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0,
        mask_truncated_completions=not a.no_overlong_filter, scale_rewards="group", max_steps=n_rollouts * spg,
        logging_steps=spg, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, ddp_backend="gloo" if a.procs > 1 else None,
    )

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % spg or pipe is None:  # ranks > 0 just train
                return
            t, c = time.perf_counter(), time.process_time()
            k = state.global_step // spg  # rollouts done
            if k == a.warmup:
                pipe.send(ready=True, threads=torch.get_num_threads())
            elif k > a.warmup:
                wall = t - st["t_go"]
                pipe.send(wall=wall, gen=st["gen"], old_logp=st["old_logp"], update=wall - st["gen"] - st["old_logp"],
                          cpu=c - st["c_go"], tokens=st["tokens"] * a.procs, reward=st["reward"], truncated=st["truncated"])
            if k >= a.warmup:
                st["t_go"] = pipe.wait_go()
                st["c_go"] = time.process_time()
            st.update(gen=0.0, old_logp=0.0, tokens=0, reward=0.0)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Clock()])
    set_threads(a.threads)  # in case a library changed it

    def timed(name: str, fn, only_no_grad: bool = False):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                if not only_no_grad or not torch.is_grad_enabled():
                    st[name] += time.perf_counter() - t0
        return wrapper

    trainer._generate = timed("gen", trainer._generate)
    trainer._get_per_token_logps_and_entropies = timed("old_logp", trainer._get_per_token_logps_and_entropies, True)
    trainer.train()
    if pipe is not None:
        pipe.send(error="trl ran out of steps")


# --------------------------------------------------------------------------------------------------
# roofline: model FLOPs of a step and this machine's GEMM rate at its shapes (see the docstring)


def model_dims(path: Path) -> dict[str, int]:
    cfg = json.loads((Path(path) / "config.json").read_text())
    d, V = cfg["hidden_size"], cfg["vocab_size"]
    n = n_params(path)
    return {"N": n - (0 if cfg.get("tie_word_embeddings", False) else V * d), "d": d, "layers": cfg["num_hidden_layers"],
            "ffn": cfg["intermediate_size"]}


def step_flops(dims: dict[str, int], P: int, G: int, p: float, r: float, k: float = 1.0) -> tuple[float, float]:
    """(generation, training) model FLOPs of one RL step: the formulas in the module docstring (``k``: the
    fraction of responses in the loss)."""
    N, att = dims["N"], 4 * dims["d"] * dims["layers"]
    S = p + r
    gen = 2 * N * (P * p + P * G * r) + att * (P * p * (p + 1) / 2 + P * G * (r * p + r * (r + 1) / 2))
    train = 3 * (2 * N * P * G * S + att * P * G * S * (S + 1) / 2) * k
    return gen, train


def gemm_rate(M: int, dims: dict[str, int], seconds: float = 0.25) -> float:
    """fp32 FLOP/s of torch.matmul at (M x d) @ (d x ffn) and (M x ffn) @ (ffn x d), the bulk of a layer's work."""
    import torch

    d, f = dims["d"], dims["ffn"]
    pairs = [(torch.randn(M, d), torch.randn(d, f)), (torch.randn(M, f), torch.randn(f, d))]
    for x, w in pairs:  # warm up
        torch.matmul(x, w)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for x, w in pairs:
            torch.matmul(x, w)
        n += 1
    return n * 2 * (2 * M * d * f) / (time.perf_counter() - t0)


def mean_prompt_tokens(path: Path, a: argparse.Namespace) -> float:
    """Mean prompt length in tokens over the prompts both sides draw (the task's stream from the same seed)."""
    from transformers import AutoTokenizer

    from dapo.data.tasks import get_task, task_splits

    tok = AutoTokenizer.from_pretrained(path)
    _, stream = task_splits(get_task("addition"), a.seed, 0)
    exs = stream.take(a.prompts * (a.warmup + a.steps + 1))
    return sum(len(tok(e.prompt, add_special_tokens=False)["input_ids"]) for e in exs) / len(exs)


def roofline(out: dict[str, Any], res: dict[str, list[dict]], rates: dict[str, list[float]], dims: dict[str, int],
             p: float, a: argparse.Namespace) -> None:
    """Adds each side's model FLOPs and its gen / train / step fractions of the GEMM rate to ``out``."""
    g_rate, t_rate = summary(rates["gen"])["median"], summary(rates["train"])["median"]
    out["gemm_gflops"] = {"gen": g_rate / 1e9, "train": t_rate / 1e9, "gen_shape": rates["gen_shape"],
                          "train_shape": rates["train_shape"]}
    out["mean_prompt_tokens"] = p
    for side in sides(a):
        rs = res[side]
        r = summary([x["tokens"] for x in rs])["median"] / (a.prompts * a.G)  # mean response tokens
        k = 1.0 if a.no_overlong_filter else 1.0 - out[side]["truncated_frac"]
        gen, train = step_flops(dims, a.prompts, a.G, p, r, k)
        step, gen_s = out[side]["step_s"]["median"], out[side]["gen_s"]
        out[side]["model_gflop"] = {"gen": gen / 1e9, "train": train / 1e9}
        out[side]["gen_pct_gemm"] = 100 * gen / max(gen_s, 1e-9) / g_rate
        out[side]["train_pct_gemm"] = 100 * train / max(step - gen_s, 1e-9) / t_rate
        out[side]["step_pct_gemm"] = 100 * (gen / g_rate + train / t_rate) / step


# --------------------------------------------------------------------------------------------------
# parent side


class Worker:
    def __init__(self, side: str, model: Path, a: argparse.Namespace):
        cmd = [sys.executable, __file__, "--worker", "dapo" if side == BEFORE else side, "--model", str(model), "--threads", str(a.threads),
               "--procs", str(a.procs),
               "--G", str(a.G), "--prompts", str(a.prompts), "--mini", str(a.mini), "--max-new", str(a.max_new),
               "--lr", str(a.lr), "--steps", str(a.steps), "--warmup", str(a.warmup), "--seed", str(a.seed)]
        for o in a.dapo_override:
            cmd += ["--dapo-override", o]
        if a.no_overlong_filter:
            cmd.append("--no-overlong-filter")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(a.threads),
                   PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
        # both sides get the same OpenMP wait policy: the environment's (libgomp's default: a waiting thread spins
        # ~3 ms before it sleeps), or with --omp-passive threads that sleep at once (see main's help)
        if a.omp_passive:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        if side == BEFORE:  # bench/common.py puts this checkout first on sys.path
            env["DAPO_SRC"] = str(Path(a.before).resolve())
        log = open(Path(tempfile.gettempdir()) / f"bench-vs-trl-{side}.log", "w")
        self.side = side
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def recv(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker died (exit {self.p.wait()}); see "
                               f"{Path(tempfile.gettempdir()) / f'bench-vs-trl-{self.side}.log'}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"{self.side}: {msg['error']}")
        return msg

    def step(self) -> dict:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return self.recv()

    def close(self) -> None:
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()


def compare(kind: str, a: argparse.Namespace, tmp: str) -> dict[str, Any]:
    path = model_dir(kind, tmp)
    print(f"[{kind}] {n_params(path) / 1e6:.2f}M parameters at {path}", file=sys.stderr)
    dims, p = model_dims(path), mean_prompt_tokens(path, a)
    # the GEMM shapes: the decode batch (every response of the rollout at once), a training micro-batch's tokens
    rates: dict[str, Any] = {"gen": [], "train": [], "gen_shape": [a.prompts * a.G, dims["d"], dims["ffn"]],
                             "train_shape": [a.mini * a.G * round(p + a.max_new / 2), dims["d"], dims["ffn"]]}
    workers = {}
    try:
        for side in sides(a):  # set up one at a time: neither's warm-up slows the other's
            t0 = time.perf_counter()
            workers[side] = Worker(side, path, a)
            ready = workers[side].recv()
            print(f"[{kind}] {side} ready in {time.perf_counter() - t0:.1f}s ({ready})", file=sys.stderr)
        res: dict[str, list[dict]] = {s: [] for s in sides(a)}
        for i in range(a.steps):
            for side in sides(a):  # A B A B (C)
                r = workers[side].step()
                res[side].append(r)
                print(f"[{kind}] step {i + 1} {side}: {r['wall']:.3f}s (gen {r['gen']:.3f}, old_logp "
                      f"{r['old_logp']:.3f}, update {r['update']:.3f}, cpu {r['cpu']:.3f}, {r['tokens']:.0f} tokens)",
                      file=sys.stderr)
            for k in ("gen", "train"):  # the machine's GEMM rate under this pair's load, the sides idle meanwhile
                rates[k].append(gemm_rate(rates[f"{k}_shape"][0], dims))
    finally:
        for w in workers.values():
            w.close()
    out: dict[str, Any] = {"model": kind, "params_m": round(n_params(path) / 1e6, 2)}
    for side in sides(a):
        rs = res[side]
        out[side] = {
            "step_s": summary([r["wall"] for r in rs]),
            "gen_s": summary([r["gen"] for r in rs])["median"],
            "old_logp_s": summary([r["old_logp"] for r in rs])["median"],
            "update_s": summary([r["update"] for r in rs])["median"],
            "tokens_per_step": summary([r["tokens"] for r in rs])["median"],
            "tokens_per_s": summary([r["tokens"] / r["wall"] for r in rs])["median"],
            "gen_tokens_per_s": summary([r["tokens"] / max(r["gen"], 1e-9) for r in rs])["median"],
            "cpu_s": summary([r["cpu"] for r in rs])["median"],
            "truncated_frac": summary([r["truncated"] for r in rs])["median"],
            "reward": summary([r["reward"] for r in rs])["median"],
        }
    out["ratio_median"] = out["dapo"]["step_s"]["median"] / out["trl"]["step_s"]["median"]
    # ratio of each A-B pair: the machine's load changes between pairs more than within one
    pairs = [d["wall"] / t["wall"] for d, t in zip(res["dapo"], res["trl"])]
    out["ratio_pairs"] = summary(pairs)
    out["ratio_cpu"] = out["dapo"]["cpu_s"] / out["trl"]["cpu_s"]
    if a.before:
        out["before_ratio_median"] = out[BEFORE]["step_s"]["median"] / out["trl"]["step_s"]["median"]
        out["after_over_before"] = summary([d["wall"] / b["wall"] for d, b in zip(res["dapo"], res[BEFORE])])
    roofline(out, res, rates, dims, p, a)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,25m", help=f"comma list of: {', '.join(MODEL_SHAPES)}")
    ap.add_argument("--steps", type=int, default=6, help="timed RL steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed RL steps per side before (>= 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--procs", type=int, default=1, help="data-parallel processes per side (see the docstring)")
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--G", type=int, default=8, help="responses per prompt")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout")
    ap.add_argument("--mini", type=int, default=4, help="prompts per optimiser step")
    ap.add_argument("--max-new", type=int, default=24, help="max response tokens")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-overlong-filter", action="store_true",
                    help="train on truncated responses too (both sides): a random model's mostly are, and dapo does "
                         "not run the update's forward/backward on responses masked out of the loss")
    ap.add_argument("--dapo-override", action="append", default=[], help="extra dapo key=value (repeatable)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for both sides: for a machine whose cores other busy processes share, where "
                         "spinning OpenMP threads can make small ops 10-100x slower; on an idle machine it costs every "
                         "parallel op a thread wake-up (~0.1 ms: 2.2x the 1M demo's step, bench/RESULTS.md)")
    ap.add_argument("--before", help="a dapo checkout (e.g. a git worktree of an older commit) timed as a third side, "
                    "A B C alternating: before/after in one run")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.warmup = max(1, a.warmup)
    if a.worker == "trl" and a.rank > 0:
        trl_worker(a, None)
        return 0
    if a.worker:
        pipe = Pipe()
        (dapo_worker if a.worker == "dapo" else trl_worker)(a, pipe)
        return 0

    set_threads(a.threads)
    from dapo.cpu import idle_fraction

    busy = (os.cpu_count() or 1) * (1 - idle_fraction(1.0))
    if busy >= 0.5 and not a.omp_passive:
        print(f"warning: {busy:.1f} cores are busy with other work: timings are not those of an idle machine, and "
              f"spinning OpenMP threads may slow both sides unevenly (--omp-passive for a shared machine)", file=sys.stderr)
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        for kind in a.models.split(","):
            r = compare(kind, a, tmp)
            results.append(r)
            for side in sides(a):
                s = r[side]
                rows.append({"model": f"{kind} ({r['params_m']}M)", "side": side, "step_s_median": s["step_s"]["median"],
                             "min": s["step_s"]["min"], "max": s["step_s"]["max"], "gen_s": s["gen_s"],
                             "old_logp_s": s["old_logp_s"], "update_s": s["update_s"],
                             "tokens/step": s["tokens_per_step"], "tokens/s": s["tokens_per_s"],
                             "trunc": s["truncated_frac"], "cpu_s": s["cpu_s"],
                             "gen %": s["gen_pct_gemm"], "train %": s["train_pct_gemm"], "step %": s["step_pct_gemm"],
                             "dapo/trl": s["step_s"]["median"] / r["trl"]["step_s"]["median"]})
    shape = {k: getattr(a, k) for k in ("G", "prompts", "mini", "max_new", "lr", "steps", "warmup", "threads",
                                        "procs", "no_overlong_filter")}
    shape["omp_wait"] = "PASSIVE" if a.omp_passive else " ".join(
        f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ) or "libgomp default"
    print(f"\nRL step, {a.prompts} prompts x G={a.G}, <= {a.max_new} new tokens, {a.prompts // a.mini} optimiser "
          f"steps of {a.mini * a.G} responses; median of {a.steps} alternating steps after {a.warmup} warm-up; "
          f"OpenMP wait: {shape['omp_wait']}")
    print(table(rows))
    for r in results:
        p = r["ratio_pairs"]
        print(f"{r['model']}: dapo/trl median {r['ratio_median']:.3f}; per A-B pair median {p['median']:.3f} "
              f"(min {p['min']:.3f}, max {p['max']:.3f}); process CPU time {r['ratio_cpu']:.3f}")
        if a.before:
            ab = r["after_over_before"]
            print(f"{r['model']}: before {a.before}: dapo@before/trl {r['before_ratio_median']:.3f}; after/before per "
                  f"step median {ab['median']:.3f} (min {ab['min']:.3f}, max {ab['max']:.3f})")
        g = r["gemm_gflops"]
        print(f"{r['model']}: fp32 GEMM rate in this run {g['gen']:.1f} GFLOP/s at the decode shape "
              f"{'x'.join(map(str, g['gen_shape']))}, {g['train']:.1f} at the micro-batch shape "
              f"{'x'.join(map(str, g['train_shape']))} (M x d x ffn); model GFLOP per step: "
              + ", ".join(f"{side} gen {r[side]['model_gflop']['gen']:.2f} + train {r[side]['model_gflop']['train']:.2f}"
                          for side in sides(a)) + " (formulas in the docstring)")
    emit_json({"bench": "vs_trl", "machine": machine(), "shape": shape, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
