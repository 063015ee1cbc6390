"""The driver's side of DAPO steps at the paper's scale, with the model taken out: seconds and memory by phase.

    python bench/sim_scale.py --quick           # 64 prompts x 16, lengths / 5: a minute
    python bench/sim_scale.py                   # 512 prompts x 16, median ~3k tokens, max 20,480: minutes
    python bench/sim_scale.py --quick --tracemalloc   # + Python-object peaks per phase (slow; quick shape only)
    python bench/sim_scale.py --reward-workers 8  # decoding and scoring in 8 reward worker processes
    python bench/sim_scale.py --prompts 128 optim.micro_batch_tokens=32768   # any shape, any config key

What runs is the real code of a step (``dapo.trainer.loop.train_step``, phase by phase):
``DynamicSampler.collect`` (dynamic sampling, refill rounds, carry-over, the overlong penalty, metrics),
decoding with a real ``tokenizers`` tokenizer and scoring through a real ``RewardRunner`` (via
``dapo.problems.runner_score_ids``: with ``--reward-workers N`` the ids go to the workers, which decode them),
``flatten_groups`` (advantages), ``Learner.old_logp``,
``rollout_correction``, ``Learner.update`` (mini-batch loop, denominators, micro-batch planning, the
optimiser step) and the checkpoint's ``trainer_state`` with the carried groups, saved and loaded back
with ``torch.load(weights_only=True)``. Three stand-ins:

* the engine returns recipe-shaped completions at once: G per prompt, lengths log-normal (median
  ``--median``, sigma ``--sigma``) capped at ``rollout.max_new_tokens`` (finish 'length' there), random
  token ids over a 151,936-token vocabulary (Qwen2.5's), random log-probs. Its own time is reported
  (``engine``) but is not the driver's;
* the learner is the real ``Learner`` on a one-parameter model whose policy forward returns zeros at
  once; in ``update`` each micro-batch lays out its inputs as the real one does (ids, masks, old
  log-probs, advantages: what goes to the accelerator) and skips the forward and the per-token loss
  maths (accelerator work), returning a zero loss so that backward and the optimiser step still run;
* the reward is a coin with a per-prompt bias (``coin_reward``; the bias is the example's answer): random
  ids decode to text without an answer, so the math verifier would score every response wrong and
  dynamic sampling would never fill a batch. The coin gives a recipe-like mixed fraction (``--p-mixed``
  of the prompts solvable sometimes; a quarter never, the rest always) and costs about a microsecond,
  so what is measured is the runner's plumbing, not a verifier (which runs in reward workers at scale).

``decode`` is the driver's own decoding: the whole round in one batched call with no workers, or with
workers only packing each response's ids into an int32 array for them; ``reward`` is the rest of scoring,
which with workers includes waiting for them to decode and score (their cores, not the driver's).

``ray_ship`` is what the Ray path adds on the driver: the completions pickled by the rollout workers and
unpickled here, the batch pickled for the ranks (``ray.put``) twice (old log-probs, update) and the old
log-probs once, and one rank's unpickling of them.

Memory is the process's peak RSS within each phase (the kernel's VmHWM, reset per phase), absolute; the
step's growth is the peak over the step minus the RSS before the first step. ``--tracemalloc`` adds the
peak of Python objects per phase (torch's buffers are not Python objects: tracemalloc does not see them).
The representation (Python lists or tensors for token ids and log-probs) is whatever the checked-out
``dapo`` uses, so the same script measures before and after a change.
"""
from __future__ import annotations

import argparse
import gc
import io
import pickle
import random
import statistics
import string
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, machine, peak_rss_mb, reset_peak_rss, rss_mb, set_threads, table  # noqa: E402

VOCAB = 151_936
PAD, EOS = 0, 1
SHAPES = {
    # the DAPO recipe: 512 prompts x 16 responses a step, L_max 20,480 with a 4,096-token penalty window
    "full": dict(prompts=512, median=3000, max_len=20480, cache=4096, mini=32, micro=8, prompt_len=(100, 400)),
    # the same mix at an eighth of the prompts and a fifth of the lengths
    "quick": dict(prompts=64, median=600, max_len=4096, cache=820, mini=4, micro=8, prompt_len=(100, 400)),
}
PHASES = ("engine", "decode", "reward", "collect_rest", "flatten", "old_logp", "correction", "update", "checkpoint",
          "ray_ship")
DRIVER = ("decode", "reward", "collect_rest", "flatten", "old_logp", "correction", "update", "checkpoint")
"""The phases that are the driver's own work in one process (ray_ship is the Ray path's addition)."""


def coin_reward(response: str, ground_truth: str) -> bool:
    """Correct with probability ``float(ground_truth)``, decided by a hash of the response (deterministic)."""
    return zlib.crc32(response.encode()) < float(ground_truth) * 2**32


# --------------------------------------------------------------------------------------------------
# stand-ins


def make_tokenizer() -> Any:
    """A WordLevel tokenizer over VOCAB made-up tokens of 1-4 characters (a third with a leading space), Fuse decoder."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    alpha = string.ascii_letters + string.digits

    def name(i: int) -> str:
        s = ""
        while True:
            s, i = alpha[i % len(alpha)] + s, i // len(alpha)
            if not i:
                return s

    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": 2, "<unk>": 3}
    for i in range(4, VOCAB):
        vocab[(" " if i % 3 == 0 else "") + name(i)] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def tensor_completions() -> bool:
    """Whether this checkout's ``Completion`` holds tensors (after the change) or lists (before)."""
    from dapo.rollout.base import Completion

    return "Tensor" in str(Completion.__dataclass_fields__["token_ids"].type)


class StandInEngine:
    """Recipe-shaped completions at once (see the module docstring); seeded per prompt."""

    def __init__(self, median: float, sigma: float, clock: "Clock"):
        self.median, self.sigma, self.clock = median, sigma, clock
        self.tensors = tensor_completions()
        self.weight_version = 0

    def generate(self, prompts, params, seeds):
        import torch

        from dapo.rollout.base import Completion

        t0 = time.perf_counter(), time.process_time()
        out = []
        for i, s in enumerate(seeds):
            g = torch.Generator().manual_seed(int(s) & 0x7FFFFFFFFFFFFFFF)
            lens = (self.median * torch.exp(self.sigma * torch.randn(params.n, generator=g))).round()
            lens = lens.clamp(1, params.max_new_tokens).long()
            ids = torch.randint(4, VOCAB, (int(lens.sum()),), generator=g)
            lps = -2.0 * torch.rand(int(lens.sum()), generator=g)  # float32
            for ids_j, lp_j, n in zip(ids.split(lens.tolist()), lps.split(lens.tolist()), lens.tolist()):
                finish = "length" if n >= params.max_new_tokens else "stop"
                if finish == "stop":
                    ids_j[-1] = EOS
                if self.tensors:  # own storage each, as the HF engine hands them out
                    out.append(Completion(i, ids_j.clone(), lp_j.clone(), finish, self.weight_version))
                else:  # the HF engine's per-row .tolist()
                    out.append(Completion(i, ids_j.tolist(), lp_j.tolist(), finish, self.weight_version))
        self.clock.add("engine", t0)
        t0 = time.perf_counter(), time.process_time()
        out = pickle.loads(pickle.dumps(out, protocol=5))  # rollout workers -> driver (the Ray path)
        self.clock.add("ship_in", t0)
        return out

    def load_weights(self, state_dict, version):
        self.weight_version = int(version)


class StandInPolicy:
    """The policy forward: zeros (b, T) at once."""

    def __call__(self, batch, temperature=1.0, with_entropy=False):
        import torch

        return torch.zeros(batch.response_mask.shape), None


def layout_only(model):
    """``micro_loss`` without the forward and the loss maths: the learner has laid the micro-batch out already
    (``micro_inputs``, before the copy to the accelerator); a zero loss with a gradient path to ``model``."""

    def micro_loss(policy, x, spec, num_tokens, num_seqs, with_entropy=False, ref_logp=None):
        return model.weight.sum() * 0.0, {"tokens": 0.0}

    return micro_loss


# --------------------------------------------------------------------------------------------------
# measuring


class Clock:
    """Wall and CPU seconds per phase, summed within a step (a phase can run several times: refill rounds)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def add(self, phase: str, t0: tuple[float, float]) -> None:
        self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - t0[0]
        self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - t0[1]

    def reset(self) -> None:
        self.wall, self.cpu = {}, {}


class Meter:
    """Peak RSS (and Python objects with tracemalloc) per phase."""

    def __init__(self, py: bool):
        self.py = py
        self.peak: dict[str, float] = {}
        self.py_peak: dict[str, float] = {}

    def start(self) -> None:
        reset_peak_rss()
        if self.py:
            import tracemalloc

            tracemalloc.reset_peak()

    def stop(self, phase: str) -> None:
        self.peak[phase] = max(self.peak.get(phase, 0.0), peak_rss_mb())
        if self.py:
            import tracemalloc

            self.py_peak[phase] = max(self.py_peak.get(phase, 0.0), tracemalloc.get_traced_memory()[1] / 2**20)


def build(a: argparse.Namespace, shape: dict[str, Any], clock: Clock):
    import torch

    from dapo.config import load_config
    from dapo.data.example import Example
    from dapo.model import make_optimizer
    from dapo.problems import ListPromptStream, ResponseDecoder, runner_score_ids
    from dapo.rewards import RewardRunner
    from dapo.trainer.sampler import DynamicSampler, Rollouts
    from dapo.learner import LocalLearner

    P = a.prompts or shape["prompts"]
    cfg = load_config(overrides=[
        "rollout.group_size=16", f"optim.train_batch_size={P}", f"rollout.gen_batch_size={P}",
        f"optim.mini_batch_size={shape['mini']}", f"optim.micro_batch_size={shape['micro']}",
        f"rollout.max_new_tokens={shape['max_len']}", f"algo.overlong_cache_len={shape['cache']}",
        "algo.carry_over=true", *a.overrides], notify=lambda s: None)
    rng = random.Random(0)
    n_data = 8 * P
    examples, ids = [], []
    for k in range(n_data):
        u = rng.random()
        p = 0.0 if u < (1 - a.p_mixed) * 0.6 else 1.0 if u < 1 - a.p_mixed else rng.uniform(0.15, 0.85)
        examples.append(Example(f"q{k}", f"{p:.3f}", "sim"))
        lo, hi = shape["prompt_len"]
        ids.append([rng.randrange(4, VOCAB) for _ in range(rng.randint(lo, hi))])
    stream = ListPromptStream(examples, ids, seed=0)
    decoder = ResponseDecoder(make_tokenizer())
    runner = RewardRunner(f"{Path(__file__).resolve()}:coin_reward", workers=a.reward_workers, timeout_s=5.0,
                          decoder=decoder.json)

    def timed(fn):  # the driver's own decoding: in one batch here, or packing the ids for the workers
        def run(ids):
            t0 = time.perf_counter(), time.process_time()
            out = fn(ids)
            clock.add("decode", t0)
            return out
        return run

    decoder.decode, decoder.pack = timed(decoder.decode), timed(decoder.pack)
    score = runner_score_ids(runner, decoder)  # as dapo.problems builds it for a file's reward

    def score_ids(ids, exs):
        t0 = time.perf_counter(), time.process_time()
        out = score(ids, exs)
        clock.add("score", t0)
        return out

    engine = StandInEngine(shape["median"] * a.length_scale, a.sigma, clock)
    sampler = DynamicSampler(cfg, engine, stream, score_ids)
    import dapo.learner.learner as learner_mod

    model = torch.nn.Linear(1, 1, bias=False)
    learner_mod.micro_loss = layout_only(model)  # the Learner's micro-batches: layout, no forward, no loss maths
    opt, sched = make_optimizer(cfg.optim, model)
    learner = LocalLearner(cfg, model, opt, sched, PAD, torch.device("cpu"), policy=StandInPolicy())
    run = SimpleNamespace(cfg=cfg, sampler=sampler, learner=learner, engine=engine,
                          problems=SimpleNamespace(stream=stream), rollouts=Rollouts(sampler))
    return run, runner


def step(run: Any, k: int, clock: Clock, meter: Meter) -> tuple[list, dict[str, float]]:
    """One step, phase by phase, as ``dapo.trainer.loop.train_step`` runs it."""
    import torch

    from dapo.trainer.batch import flatten_groups, rollout_correction
    from dapo.trainer.run import _group_from_plain, trainer_state

    def phase(name, fn):
        gc.collect()
        meter.start()
        t0 = time.perf_counter(), time.process_time()
        out = fn()
        clock.add(name, t0)
        meter.stop(name)
        return out

    groups, m = phase("collect", lambda: run.sampler.collect(k))
    batch = phase("flatten", lambda: flatten_groups(groups, run.cfg, k))

    def ship(*objs):
        t0 = time.perf_counter(), time.process_time()
        for o in objs:
            pickle.loads(pickle.dumps(o, protocol=5))
        clock.add("ray_ship", t0)

    ship(batch)
    old = phase("old_logp", lambda: run.learner.old_logp(batch))
    weights, _ = phase("correction", lambda: rollout_correction(batch, old, run.cfg.algo))
    ship(batch, old)
    phase("update", lambda: run.learner.update(batch.weighted(weights), old, k))

    def checkpoint():
        buf = io.BytesIO()
        torch.save(trainer_state(run, k, {}), buf)
        buf.seek(0)
        state = torch.load(buf, map_location="cpu", weights_only=True)
        return [_group_from_plain(g) for g in state["sampler"]["carried"]], buf.tell()

    carried, nbytes = phase("checkpoint", checkpoint)
    info = {"gen_rounds": m["batch/gen_rounds"], "responses_generated": sum(len(g.completions) for g in run.sampler.last_round),
            "tokens_generated": m["batch/gen_tokens"], "responses_trained": len(batch.responses),
            "tokens_trained": float(sum(len(r) for r in batch.responses)), "carried_groups": len(carried),
            "checkpoint_mb": nbytes / 2**20}
    return groups, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the quick shape (64 prompts, lengths / 5)")
    p.add_argument("--prompts", type=int, default=0, help="prompts per step (default: the shape's)")
    p.add_argument("--steps", type=int, default=3, help="steps; the table shows the median of steps 2..")
    p.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma of the response lengths")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiplies the median length")
    p.add_argument("--p-mixed", type=float, default=0.6, help="fraction of prompts the coin solves sometimes")
    p.add_argument("--reward-workers", type=int, default=0)
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="config key=value")
    a = p.parse_args()
    threads = set_threads(a.threads)
    shape = dict(SHAPES["quick" if a.quick else "full"])
    clock = Clock()
    run, runner = build(a, shape, clock)
    if a.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    meter = Meter(a.tracemalloc)
    gc.collect()
    base_rss = rss_mb()
    rows, infos = [], []
    prev: list = []
    try:
        for k in range(1, a.steps + 1):
            clock.reset()
            reset_peak_rss()
            prev, info = step(run, k, clock, meter)  # the loop holds the last step's groups meanwhile
            w, c = dict(clock.wall), dict(clock.cpu)
            for d in (w, c):  # collect's parts: what is left is the sampler's own work
                d["reward"] = d.pop("score", 0.0) - d.get("decode", 0.0)  # with workers: waiting for them to decode and score
                d["collect_rest"] = d.pop("collect") - sum(d.get(x, 0.0) for x in ("engine", "decode", "reward", "ship_in"))
                d["ray_ship"] = d.get("ray_ship", 0.0) + d.pop("ship_in", 0.0)
            info.update({f"{ph}_s": w.get(ph, 0.0) for ph in PHASES})
            info.update({f"{ph}_cpu_s": c.get(ph, 0.0) for ph in PHASES})
            info["driver_s"] = sum(w.get(ph, 0.0) for ph in DRIVER)
            info["driver_cpu_s"] = sum(c.get(ph, 0.0) for ph in DRIVER)
            info.update({f"{ph}_peak_mb": v for ph, v in meter.peak.items()})
            info.update({f"{ph}_py_peak_mb": v for ph, v in meter.py_peak.items()})
            info["step_peak_mb"] = max(meter.peak.values())
            info["growth_mb"] = info["step_peak_mb"] - base_rss
            info["rss_after_mb"] = rss_mb()
            meter.peak, meter.py_peak = {}, {}
            infos.append(info)
            print(f"step {k}: driver {info['driver_s']:.2f} s (cpu {info['driver_cpu_s']:.2f}), engine "
                  f"{info['engine_s']:.2f} s, peak RSS {info['step_peak_mb']:.0f} MB, "
                  f"{info['tokens_generated'] / 1e6:.1f}M tokens generated, {info['tokens_trained'] / 1e6:.1f}M trained",
                  file=sys.stderr, flush=True)
    finally:
        runner.close()
    steady = infos[1:] or infos
    med = {k: statistics.median(i[k] for i in steady) for k in steady[0]}
    for ph in PHASES + ("collect",):
        if f"{ph}_s" in med or f"{ph}_peak_mb" in med:
            rows.append({"phase": ph, "wall_s": med.get(f"{ph}_s", float("nan")), "cpu_s": med.get(f"{ph}_cpu_s", float("nan")),
                         "peak_rss_mb": med.get(f"{ph}_peak_mb", float("nan")),
                         **({"py_peak_mb": med.get(f"{ph}_py_peak_mb", float("nan"))} if a.tracemalloc else {})})
    rows.append({"phase": "driver (one process)", "wall_s": med["driver_s"], "cpu_s": med["driver_cpu_s"],
                 "peak_rss_mb": med["step_peak_mb"]})
    rep = "tensors" if tensor_completions() else "lists"
    print(f"\n{'quick' if a.quick else 'full'} shape, token ids / log-probs as {rep}; median of steps 2..{a.steps}; "
          f"RSS before step 1: {base_rss:.0f} MB; growth over it at the step's peak: {med['growth_mb']:.0f} MB "
          f"({med['growth_mb'] * 2**20 / max(med['tokens_generated'], 1):.1f} bytes per generated token)")
    print(f"per step: {med['responses_generated']:.0f} responses / {med['tokens_generated'] / 1e6:.2f}M tokens generated "
          f"in {med['gen_rounds']:.0f} rounds, {med['responses_trained']:.0f} / {med['tokens_trained'] / 1e6:.2f}M trained, "
          f"{med['carried_groups']:.0f} groups carried ({med['checkpoint_mb']:.0f} MB of trainer state)\n")
    print(table(rows, nd=2))
    emit_json({"machine": machine(), "threads": threads, "representation": rep, "shape": shape,
               "prompts": a.prompts or shape["prompts"], "overrides": a.overrides, "base_rss_mb": base_rss,
               "steps": infos, "median": med})


if __name__ == "__main__":
    main()
