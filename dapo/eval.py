"""avg@k, pass@k and maj@k of a model over a dataset, overall and per ``data_source``.

    dapo eval --model runs/dapo-x/step_40 --data aime24.jsonl --k 32          # the paper's AIME metric
    dapo eval --model runs/dapo-addition-x/step_40 --data task:addition --k 8

Each problem gets k samples (paper: temperature 1.0, top-p 0.7), each scored by the verifier:

- avg@k: the mean accuracy over all k samples of all problems (the paper's "avg@32" on AIME).
- pass@j: the chance that at least one of j samples is correct, by the unbiased estimator of Chen et al.
  2021 (arXiv 2107.03374) from the k samples; reported for j = 1, 2, 4, ... up to k (pass@1 = avg@k).
- maj@k: the fraction of problems whose most common extracted answer (majority vote) is correct.

Sampling seeds come from (seed, problem index), so the first N problems get the same samples whether
or not the rest are evaluated, and the same samples in any batch. The engine knows no text; this
module decodes, scores and votes. ``evaluate_k`` is the pure-ish core that the training loop can call
on its held-out items; ``main`` is the command.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from dapo.data.example import Example
from dapo.fsutil import write_atomic
from dapo.rollout.base import SamplingParams, derive_seed
from dapo.trainer.batch import PromptItem, ScoreFn

EVAL_SEED_TAG = 104723
"""Mixed into every eval sampling seed, so eval samples never share a seed with training rollouts."""

Extract = Callable[[str], "str | None"]
Progress = Callable[[int, int, float], None]
"""progress(problems done, problems total, accuracy so far)."""


# --------------------------------------------------------------------------------------------------
# the estimators: pure functions


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials (Chen et al. 2021).

    >>> [round(pass_at_k(5, 2, k), 12) for k in (1, 2)], pass_at_k(5, 0, 3), pass_at_k(5, 4, 2)
    ([0.4, 0.7], 0.0, 1.0)
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _vote(preds: Sequence[str | None]) -> int | None:
    """Index of the first sample carrying the most common non-None answer; ties go to the answer seen
    first (deterministic for a given set of samples). None when no sample has an answer."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, p in enumerate(preds):
        if p is None:
            continue
        counts[p] = counts.get(p, 0) + 1
        first.setdefault(p, i)
    if not counts:
        return None
    best = max(counts.values())
    winner = min((a for a, n in counts.items() if n == best), key=first.__getitem__)
    return first[winner]


def majority_vote(preds: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the majority answer among ``preds`` is correct (``correct[i]`` says if sample i is).

    Samples without an answer (None) do not vote; with no answer at all the vote is wrong. Ties between
    answers go to the one that appears first.

    >>> majority_vote(["4", "5", "5", None], [True, False, False, False])
    False
    >>> majority_vote(["4", "5", "5", "4"], [True, False, False, True])  # a tie: "4" came first
    True
    """
    assert len(preds) == len(correct), f"{len(preds)} preds for {len(correct)} verdicts"
    i = _vote(preds)
    return bool(correct[i]) if i is not None else False


def pass_ks(k: int) -> list[int]:
    """The j of the reported pass@j: powers of two up to k, and k itself.

    >>> pass_ks(32), pass_ks(6), pass_ks(1)
    ([1, 2, 4, 8, 16, 32], [1, 2, 4, 6], [1])
    """
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    return out + [k]


def default_pred(response: str) -> str | None:
    """The answer a response gives, normalised, for the majority vote.

    The DAPO math answer (``Answer: ...`` or ``\\boxed{...}``, normalised exactly as ``score_math``
    does, so it equals ``MathScore.pred``); failing that, the text after the last ':' (the built-in
    tasks' format, ``15,12,04:425``); None when there is neither.

    >>> default_pred("so\\nAnswer: $1{,}000$"), default_pred("15,12,04:425"), default_pred("no idea")
    ('1000', '425', None)
    """
    from dapo.rewards.math import extract_answer, normalize_answer

    raw = extract_answer(response)
    if raw is not None:
        return normalize_answer(raw)
    head, sep, tail = response.rpartition(":")
    return (" ".join(tail.split()) or None) if sep else None


# --------------------------------------------------------------------------------------------------
# evaluation


def summarize(problems: list[dict[str, Any]], samples: list[dict[str, Any]], k: int) -> dict[str, float]:
    """The metrics of a set of problems (each with ``n`` samples, ``c`` correct, ``maj_correct``)."""
    if not problems:
        return {"problems": 0}
    m: dict[str, float] = {"problems": len(problems), f"avg@{k}": sum(s["correct"] for s in samples) / len(samples)}
    for j in pass_ks(k):
        m[f"pass@{j}"] = sum(pass_at_k(p["n"], p["c"], j) for p in problems) / len(problems)
    m[f"maj@{k}"] = sum(p["maj_correct"] for p in problems) / len(problems)
    m["score_mean"] = sum(s["score"] for s in samples) / len(samples)
    m["len_mean"] = sum(s["length"] for s in samples) / len(samples)
    m["truncated_frac"] = sum(s["finish_reason"] == "length" for s in samples) / len(samples)
    m["no_answer_frac"] = sum(s["pred"] is None for s in samples) / len(samples)
    return m


def evaluate_k(
    engine: Any,
    items: Sequence[PromptItem],
    score_fn: ScoreFn,
    k: int,
    params: SamplingParams,
    seed: int,
    decode: Callable[[list[int]], str],
    *,
    extract: Extract = default_pred,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Sample ``k`` responses per item, score them, and compute avg@k, pass@j, maj@k.

    engine: a rollout engine (``generate(prompt_ids, params, seeds)``). items: the problems (prompt ids
    and Example). score_fn: ``(texts, examples) -> (scores, correct, stats)``, the training loop's. params:
    sampling settings (``n`` is replaced by k). seed: eval seed; problem i is sampled with
    derive_seed(seed, EVAL_SEED_TAG, i). decode: token ids -> text. extract: response -> normalised
    answer for the vote.

    Returns ``{"k", "metrics": {...}, "by_source": {source: {...}}, "reward_stats", "problems": [...],
    "samples": [...]}``: one record per problem (n, c, majority answer) and per sample (response, pred,
    score, correct, length, finish_reason), from which every metric can be recomputed.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    params = replace(params, n=k)
    # prompts per generate call: about one engine batch of sequences, so progress moves as it works
    chunk = max(1, getattr(engine, "max_batch", 256) // k)
    problems: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    reward_stats: dict[str, float] = {}
    n_correct = 0
    for start in range(0, len(items), chunk):
        batch = list(items[start : start + chunk])
        idx = list(range(start, start + len(batch)))
        comps = engine.generate([it.prompt_ids for it in batch], params, [derive_seed(seed, EVAL_SEED_TAG, i) for i in idx])
        texts = [decode(c.token_ids) for c in comps]
        exs = [batch[c.prompt_index].example for c in comps]
        scores, correct, stats = score_fn(texts, exs)
        for key, v in (stats or {}).items():
            if isinstance(v, (int, float)):
                reward_stats[key] = reward_stats.get(key, 0.0) + float(v)
        for b, (i, it) in enumerate(zip(idx, batch)):
            rows = range(b * k, (b + 1) * k)  # completions come grouped per prompt
            recs = []
            for j, r in enumerate(rows):
                assert comps[r].prompt_index == b, "engine returned completions out of order"
                recs.append({
                    "problem": i, "sample": j, "data_source": it.example.data_source, "response": texts[r],
                    "pred": extract(texts[r]), "score": float(scores[r]), "correct": bool(correct[r]),
                    "length": len(comps[r].token_ids), "finish_reason": comps[r].finish_reason,
                })
            v = _vote([s["pred"] for s in recs])
            c = sum(s["correct"] for s in recs)
            n_correct += c
            problems.append({
                "problem": i, "uid": it.uid, "data_source": it.example.data_source, "answer": it.example.answer,
                "n": k, "c": c, "maj_pred": recs[v]["pred"] if v is not None else None,
                "maj_correct": bool(recs[v]["correct"]) if v is not None else False,
            })
            samples.extend(recs)
        if progress is not None:
            progress(len(problems), len(items), n_correct / max(len(samples), 1))
    sources = sorted({p["data_source"] for p in problems})
    by_source = {}
    if len(sources) > 1:
        for src in sources:
            by_source[src] = summarize([p for p in problems if p["data_source"] == src],
                                       [s for s in samples if s["data_source"] == src], k)
    return {"k": k, "metrics": summarize(problems, samples, k), "by_source": by_source,
            "reward_stats": reward_stats, "problems": problems, "samples": samples}


def as_metrics(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """The headline numbers as flat metric keys for metrics.jsonl (``eval/avg@32``, ``eval/pass@32``, ...)."""
    k = result["k"]
    m = result["metrics"]
    keys = [f"avg@{k}", "pass@1", f"pass@{k}", f"maj@{k}", "len_mean"]
    return {f"{prefix}/{key}": float(m[key]) for key in keys if key in m}


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a fixed-width table: one row for all problems, then one per data_source."""
    k = result["k"]
    cols = [f"avg@{k}"] + [f"pass@{j}" for j in pass_ks(k)] + [f"maj@{k}", "len_mean", "no_answer_frac"]
    heads = {"len_mean": "len", "no_answer_frac": "no_ans"}
    rows = [("all", result["metrics"])] + [(f"  {s}", m) for s, m in result["by_source"].items()]
    w0 = max(8, *(len(name) for name, _ in rows))
    widths = [max(7, len(heads.get(c, c))) for c in cols]
    lines = [f"{'source':<{w0}}  {'problems':>8}  " + "  ".join(f"{heads.get(c, c):>{w}}" for c, w in zip(cols, widths))]
    for name, m in rows:
        cells = [f"{m[c]:>{w}.1f}" if c == "len_mean" else f"{m[c]:>{w}.3f}" for c, w in zip(cols, widths)]
        lines.append(f"{name:<{w0}}  {int(m['problems']):>8}  " + "  ".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the command: load a model and a dataset, evaluate, print, save


def _progress_printer(mode: str, stream=None) -> Progress | None:
    stream = stream or sys.stderr
    if mode == "auto":
        mode = "bar" if hasattr(stream, "isatty") and stream.isatty() else "plain"
    if mode == "none":
        return None
    t0 = time.perf_counter()
    last = [-1]

    def show(done: int, total: int, acc: float) -> None:
        el = time.perf_counter() - t0
        eta = el / max(done, 1) * (total - done)
        line = f"{done}/{total} problems | acc {acc:.3f} | {el:.0f}s elapsed, eta {eta:.0f}s"
        if mode == "bar":
            fill = int(20 * done / max(total, 1))
            stream.write(f"\r[{'#' * fill}{'.' * (20 - fill)}] {line}\x1b[K" + ("\n" if done >= total else ""))
        else:  # plain lines, at most one per 5% of the problems
            tick = 20 * done // max(total, 1)
            if tick == last[0] and done < total:
                return
            last[0] = tick
            stream.write(line + "\n")
        stream.flush()

    return show


def _run_config(model_dir: Path) -> dict[str, Any]:
    """The training run's config.yaml beside a checkpoint (step_N/ sits in the run directory), if any."""
    import yaml

    for p in (model_dir / "config.yaml", model_dir.parent / "config.yaml"):
        if p.is_file():
            try:
                cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue
            if isinstance(cfg, dict):
                return cfg
    return {}


@dataclass
class _Problems:
    """A dataset ready to evaluate, but for tokenising: what the command needs before loading the model."""

    examples: list[Example]
    encode: Callable[[Any, list[Example]], list[PromptItem]]
    """(tokenizer, examples) -> items; may drop prompts that are too long."""
    score_fn: ScoreFn
    extract: Extract
    info: dict[str, Any]


def _task_problems(name: str, args, closers: list) -> _Problems:
    from dapo.data.tasks import answer_after_colon, eval_examples, get_task

    task = get_task(name)
    if args.template not in ("auto", "none"):
        raise ValueError(f"--template {args.template}: task:{name} prompts are in the task's own format; "
                         "use --template auto (or none)")
    exs = eval_examples(task, args.seed, args.limit or 256)  # the held-out split training evaluates on

    def encode(tokenizer: Any, examples: list[Example]) -> list[PromptItem]:
        return [PromptItem(-1 - i, ex, tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
                for i, ex in enumerate(examples)]

    info = {"template": "task", "reward": args.reward if args.reward != "auto" else f"task:{name}"}
    if args.reward != "auto":
        return _Problems(exs, encode, _runner_score_fn(args.reward, args, closers), default_pred, info)

    def score_fn(texts: list[str], examples: list[Example]):
        out = [task.score(t, e.answer) for t, e in zip(texts, examples)]
        return [s for s, _ in out], [c for _, c in out], {}

    return _Problems(exs, encode, score_fn, getattr(task, "extract_answer", None) or answer_after_colon, info)


def _runner_score_fn(spec: str, args, closers: list) -> ScoreFn:
    from dapo.rewards import RewardRunner

    runner = RewardRunner(spec, workers=args.reward_workers, timeout_s=args.reward_timeout_s)
    closers.append(runner.close)

    def score_fn(texts: list[str], examples: list[Example]):
        res = runner.score(texts, [e.answer for e in examples], [dict(e.fields, data_source=e.data_source) for e in examples])
        return res.scores, res.correct, res.stats

    return score_fn


def _file_problems(path: str, args, closers: list) -> _Problems:
    from dapo.data.files import load_examples
    from dapo.trainer.prompts import encode_prompts

    template = "dapo_math" if args.template == "auto" else args.template
    exs, stats = load_examples(path, args.prompt_key, args.answer_key, bad_rows=args.bad_rows, dedup=args.dedup)
    if args.limit:
        exs = exs[: args.limit]
    reward = "math" if args.reward == "auto" else args.reward
    info: dict[str, Any] = {"template": template, "reward": reward,
                            "load_stats": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else str(stats)}

    def encode(tokenizer: Any, examples: list[Example]) -> list[PromptItem]:
        kept, fitted, n_drop, n_trunc = encode_prompts(examples, template, tokenizer, args.max_prompt_len,
                                                       args.long_prompts)
        info.update(dropped_long=n_drop, truncated_long=n_trunc)
        if n_drop or n_trunc:
            print(f"dapo eval: {path}: {n_drop} prompts longer than --max-prompt-len {args.max_prompt_len} "
                  f"dropped, {n_trunc} truncated", file=sys.stderr)
        if not kept:
            raise ValueError(f"{path}: no problems left to evaluate after the prompt-length filter "
                             f"(--max-prompt-len {args.max_prompt_len})")
        return [PromptItem(-1 - n, e, x) for n, (e, x) in enumerate(zip(kept, fitted))]

    return _Problems(exs, encode, _runner_score_fn(reward, args, closers), default_pred, info)


def _parser() -> argparse.ArgumentParser:
    from dapo.data.templates import TEMPLATES

    p = argparse.ArgumentParser(
        prog="dapo eval",
        description="avg@k, pass@k and maj@k of a model over a dataset (the paper: --k 32, T 1.0, top-p 0.7).",
    )
    p.add_argument("--model", required=True, help="model directory (Hugging Face format, e.g. a run's step_N/)")
    p.add_argument("--data", required=True, help="problem file (JSONL, Parquet, CSV) or task:NAME for a built-in task")
    p.add_argument("--k", type=int, default=32, help="samples per problem (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling (paper: 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling; 0 = off")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="response length limit; 0 = the training run's rollout.max_new_tokens when the model sits in a run directory, else 24")
    p.add_argument("--template", default="auto", choices=["auto", *TEMPLATES],
                   help="prompt template for files (auto = dapo_math, as in training); tasks use their own")
    p.add_argument("--reward", default="auto", help="math, module:function or file.py:function (auto = math for files, the task's own for tasks)")
    p.add_argument("--out", help="JSON results file (default: MODEL/eval_<data name>.json)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and, for tasks, which held-out problems)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N problems only (tasks: N problems, default 256)")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--answer-key", default="reward_model.ground_truth")
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--long-prompts", default="drop", choices=["drop", "truncate"])
    p.add_argument("--bad-rows", default="error", choices=["error", "skip"])
    p.add_argument("--dedup", action="store_true", help="drop repeated prompts")
    p.add_argument("--reward-workers", type=int, default=0)
    p.add_argument("--reward-timeout-s", type=float, default=5.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=256, help="most sequences decoded at once")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "plain", "none"])
    p.add_argument("--no-samples", action="store_true", help="leave the per-sample records (responses) out of the JSON")
    return p


def run_eval(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Everything ``main`` does but printing the table: returns (result, path of the JSON written)."""
    from dapo.config import Config, ModelConfig
    from dapo.rollout.hf import HFEngine
    from dapo.trainer.setup import eos_ids, load_model_and_tokenizer, resolve_device

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    is_task = args.data.startswith("task:")
    max_new = args.max_new_tokens or int((_run_config(model_dir).get("rollout") or {}).get("max_new_tokens") or 24)
    closers: list[Callable[[], None]] = []
    t0 = time.perf_counter()
    try:
        # data and reward first: a typo should not cost loading a large model
        if is_task:
            probs = _task_problems(args.data[len("task:"):], args, closers)
        else:
            probs = _file_problems(args.data, args, closers)
        cfg = Config(model=ModelConfig(path=str(model_dir), dtype=args.dtype, device=args.device))
        device = resolve_device(args.device)
        model, tok = load_model_and_tokenizer(cfg, str(model_dir), device, lambda s: print(s, file=sys.stderr))
        items = probs.encode(tok, probs.examples)
        engine = HFEngine(model, int(tok.pad_token_id), eos_ids(model, tok), max_batch=args.batch_size)
        params = SamplingParams(n=args.k, max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k)
        print(f"dapo eval: {len(items)} problems x {args.k} samples (T {args.temperature}, top-p {args.top_p}, "
              f"max {max_new} new tokens) on {device}", file=sys.stderr)
        result = evaluate_k(engine, items, probs.score_fn, args.k, params, args.seed,
                            lambda ids: tok.decode(ids, skip_special_tokens=True),
                            extract=probs.extract, progress=_progress_printer(args.progress))
    finally:
        for close in closers:
            close()
    result = {
        "settings": {"model": str(model_dir), "data": args.data, "k": args.k, "temperature": args.temperature,
                     "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": max_new, "seed": args.seed,
                     "limit": args.limit, **probs.info},
        "wall_s": time.perf_counter() - t0,
        **result,
    }
    if args.no_samples:
        result.pop("samples")
    name = f"task-{args.data[len('task:'):]}" if is_task else Path(args.data.rstrip("/")).name.split(".")[0]
    out = Path(args.out) if args.out else model_dir / f"eval_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=1, ensure_ascii=False))
    return result, out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    result, out = run_eval(args)
    s = result["settings"]
    print(f"{s['model']} on {s['data']}: {result['metrics']['problems']} problems x {s['k']} samples "
          f"(T {s['temperature']}, top-p {s['top_p']}, seed {s['seed']}), {result['wall_s']:.1f}s")
    print(format_table(result))
    errs = {k: v for k, v in result["reward_stats"].items() if v}
    if errs:
        print("reward failures (scored as wrong): " + ", ".join(f"{k} {int(v)}" for k, v in errs.items()))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
