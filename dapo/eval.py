"""The one evaluator: avg@k, pass@k and maj@k of a policy over held-out problems, overall and per
``data_source``. Training (before, every ``eval.every`` steps, after), the warm-up's stopping probe and
``dapo eval`` all call ``evaluate``, with the same seeds and the same ``eval.*`` defaults, so the same
weights give the same numbers wherever they are measured.

    dapo eval --model runs/dapo-x/step_40 --data aime24.jsonl --k 32 --top-p 0.7   # the paper's AIME metric
    dapo eval --model runs/dapo-addition-x/step_40 --data task:addition --k 8

Each problem gets k samples, each scored by the verifier:

- avg@k: the mean accuracy over all k samples of all problems (the paper's "avg@32" on AIME).
- pass@j: the chance that at least one of j samples is correct, by the unbiased estimator of Chen et al.
  2021 (arXiv 2107.03374) from the k samples; reported for j = 1, 2, 4, ... up to k (pass@1 = avg@k).
- maj@k: the fraction of problems whose most common extracted answer (majority vote) is correct.

Sampling seeds come from (eval seed, problem index) only, so the first N problems get the same samples
whether or not the rest are evaluated, in any batch, at any step. The engine knows no text; this module
decodes, scores and votes.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from dapo.fsutil import strict_json, write_atomic
from dapo.items import PromptItem, ScoreFn
from dapo.rewards.math import vote_answer
from dapo.rollout.base import SamplingParams, derive_seed

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
    if "turns" in samples[0]:  # trajectories of an environment
        m["turns_mean"] = sum(s["turns"] for s in samples) / len(samples)
        m["tool_calls_mean"] = sum(s.get("tool_calls", 0) for s in samples) / len(samples)
    return m


def evaluate(
    engine: Any,
    items: Sequence[PromptItem],
    score_fn: ScoreFn,
    decode: Callable[[list[int]], str],
    params: SamplingParams,
    seed: int,
    *,
    extract: Extract = vote_answer,
    progress: Progress | None = None,
    multiturn: Any = None,
) -> dict[str, Any]:
    """Sample ``params.n`` (= k) responses per item, score them, and compute avg@k, pass@j, maj@k.

    engine: a rollout engine (``generate(prompt_ids, params, seeds)``). items: the problems (prompt ids and
    Example). score_fn: ``(texts, examples) -> RewardBatch``. decode: token ids -> text. params: sampling
    settings (``sampling_params`` builds them from ``eval.*``). seed: the eval seed; problem i is sampled
    with derive_seed(seed, EVAL_SEED_TAG, i). extract: response -> normalised answer for the vote. multiturn: a
    ``dapo.rollout.multiturn.MultiTurnRollout`` (an environment answers the model's turns): each sample is a
    trajectory scored as training scores it, its response is the whole trajectory's text (observations too), and
    its answer is extracted from the last turn.

    Returns ``{"k", "metrics": {...}, "by_source": {source: {...}}, "reward_stats", "problems": [...],
    "samples": [...]}``: one record per problem (n, c, majority answer) and per sample (response, pred,
    score, correct, length, finish_reason, reward error), from which every metric can be recomputed.
    """
    k = params.n
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # prompts per generate call: about one engine batch of sequences, so progress moves as it works
    chunk = max(1, getattr(engine, "max_batch", 256) // k)
    problems: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    reward_stats: dict[str, float] = {}
    messages: list[str] = []  # the reward function's distinct failures (up to 5), for the person reading
    n_correct = 0
    for start in range(0, len(items), chunk):
        batch = list(items[start : start + chunk])
        idx = list(range(start, start + len(batch)))
        seeds = [derive_seed(seed, EVAL_SEED_TAG, i) for i in idx]
        if multiturn is None:
            comps = engine.generate([it.prompt_ids for it in batch], params, seeds)
            texts = [decode(c.token_ids.tolist()) for c in comps]  # lists at the tokenizer's edge
            finals, turns = texts, None
            scored = score_fn(texts, [batch[c.prompt_index].example for c in comps])
        else:
            from dapo.rollout.multiturn import score_trajectories

            _, trajs = multiturn.run(batch, params, seeds)
            comps = [t.completion for t in trajs]
            texts = [decode(c.token_ids.tolist()) for c in comps]
            finals, turns = [decode(t.last_turn.tolist()) for t in trajs], [t.turns for t in trajs]
            calls = [t.info.get("tool/calls", 0.0) for t in trajs]
            scored = score_trajectories(trajs, [batch[c.prompt_index].example for c in comps],
                                        lambda ids, exs: score_fn([decode(x.tolist()) for x in ids], exs))
        for key, v in scored.stats.items():
            reward_stats[key] = reward_stats.get(key, 0.0) + float(v)
        messages += [msg for msg in scored.messages if msg not in messages][: 5 - len(messages)]
        errors = scored.errors or [""] * len(comps)
        for b, (i, it) in enumerate(zip(idx, batch)):
            recs = []
            for j, r in enumerate(range(b * k, (b + 1) * k)):  # completions come grouped per prompt
                assert comps[r].prompt_index == b, "engine returned completions out of order"
                recs.append({
                    "problem": i, "sample": j, "data_source": it.example.data_source, "response": texts[r],
                    "pred": extract(finals[r]), "score": float(scored.scores[r]), "correct": bool(scored.correct[r]),
                    "length": comps[r].n_model_tokens, "finish_reason": comps[r].finish_reason,
                    **({"reward_error": errors[r]} if errors[r] else {}),
                    **({"turns": turns[r], "tool_calls": calls[r]} if turns is not None else {}),
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
            "reward_stats": reward_stats, "reward_messages": messages, "problems": problems, "samples": samples}


def sampling_params(cfg: Any) -> SamplingParams:
    """The evaluation's sampling settings from a config: ``eval.k``, ``eval.temperature``, ``eval.top_p``,
    and training's ``rollout.max_new_tokens`` and ``rollout.top_k``."""
    e, r = cfg.eval, cfg.rollout
    return SamplingParams(n=e.k, max_new_tokens=r.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                          top_k=r.top_k)


def headline(result: dict[str, Any]) -> dict[str, float]:
    """What a run reports before and after training: accuracy (avg@k) and what it was measured on."""
    m, k = result["metrics"], result["k"]
    if not m.get("problems"):
        return {"accuracy": float("nan"), "n": 0, "k": k}
    out = {"accuracy": float(m[f"avg@{k}"]), "score": float(m["score_mean"]), "len_mean": float(m["len_mean"]),
           "n": int(m["problems"]), "k": k}
    for key in ("turns_mean", "tool_calls_mean"):  # with an environment
        if key in m:
            out[key] = float(m[key])
    return out


def as_metrics(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """The headline numbers as flat metric keys for metrics.jsonl (``eval/acc`` = ``eval/avg@k``,
    ``eval/pass@k``, ``eval/maj@k``, ...)."""
    k = result["k"]
    m = result["metrics"]
    keys = [f"avg@{k}", "pass@1", f"pass@{k}", f"maj@{k}", "len_mean", "turns_mean", "tool_calls_mean"]
    out = {f"{prefix}/{key}": float(m[key]) for key in keys if key in m}
    if f"avg@{k}" in m:
        out[f"{prefix}/acc"] = float(m[f"avg@{k}"])
    return out


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

EVAL_FLAGS = {
    "--k": "eval.k", "--temperature": "eval.temperature", "--top-p": "eval.top_p", "--top-k": "rollout.top_k",
    "--max-new-tokens": "rollout.max_new_tokens", "--template": "data.template", "--reward": "reward.fn",
    "--seed": "seed", "--prompt-key": "data.prompt_key", "--answer-key": "data.answer_key",
    "--max-prompt-len": "data.max_prompt_len", "--long-prompts": "data.long_prompts", "--bad-rows": "data.bad_rows",
    "--dedup": "data.dedup", "--reward-workers": "reward.workers", "--reward-timeout-s": "reward.timeout_s",
    "--device": "model.device", "--dtype": "model.dtype", "--batch-size": "rollout.batch_size",
    "--env": "env.path", "--tools": "env.tools", "--max-turns": "rollout.max_turns",
}


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


def _parser():
    import argparse

    from dapo.config.flags import add_key_flags, whole

    p = argparse.ArgumentParser(
        prog="dapo eval",
        description="avg@k, pass@k and maj@k of a model over a dataset. A model in a run directory (a step_N/) is "
                    "evaluated with its run's config (template, reward, keys, lengths) unless flags say otherwise. "
                    "The paper evaluates AIME with --k 32 --top-p 0.7.",
        epilog="key=value overrides any config key (dapo train --help-config lists them).",
    )
    p.add_argument("--model", required=True, help="model directory (Hugging Face format, e.g. a run's step_N/)")
    p.add_argument("--data", required=True, help="problem file (JSONL, Parquet, CSV) or task:NAME for a built-in task")
    p.add_argument("--out", help="JSON results file (default: MODEL/eval_<data file name, .jsonl dropped>.json)")
    p.add_argument("--limit", type=whole(0), default=0, help="evaluate the first N problems only (tasks: N held-out "
                   "problems; default eval.size, as for a run's own eval.path)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "plain", "none"])
    p.add_argument("--no-samples", action="store_true", help="leave the per-sample records (responses) out of the JSON")
    p.add_argument("--all-rows", action="store_true", help="a run's own training file: every row, not only the rows "
                   "the run held out")
    add_key_flags(p, EVAL_FLAGS)
    p.add_argument("overrides", nargs="*", help="key=value")
    return p


def _eval_config(args: Any) -> Any:
    """The run's config beside the model (when it sits in a run directory), then the flags and overrides."""
    from dapo.config import load_config, run_config
    from dapo.config.flags import key_overrides

    model_dir = Path(args.model)
    data = (["data.path=", f"data.task={args.data[len('task:'):]}"] if args.data.startswith("task:")
            else [f"data.path={args.data}"])
    # algo.soft_overlong=false: reward shaping is training's, and its window must not constrain --max-new-tokens here
    over = [f"model.path={model_dir}", "model.tokenizer=", "algo.soft_overlong=false", *data,
            *key_overrides(args, EVAL_FLAGS), *args.overrides]
    if args.data.startswith("task:") and getattr(args, "reward.fn") is None:
        over.append("reward.fn=auto")  # a task scores with its own verifier, whatever a run's file used
    for run_dir in (model_dir, model_dir.parent):
        saved = run_config(run_dir)
        if saved is not None:  # as run_config(run_dir, over) builds it, from the one read of config.yaml
            return load_config(None, None, over, base=saved), _run_rows(saved, args)
    return load_config(None, None, over), ""


def _run_rows(run_cfg: Any, args: Any) -> str:
    """Which rows of ``--data`` the run measured its before/after/periodic accuracy on, when it is one of its
    files: "held_out" (the file it trained on, no eval.path: the rows it held out, not rows it trained on),
    "eval_path" (its eval.path: the first eval.size rows), "" (another file, or --all-rows: every row)."""
    if getattr(args, "all_rows", False) or not run_cfg.data.path or args.data.startswith("task:"):
        return ""
    data = Path(args.data).expanduser().resolve()
    if run_cfg.eval.path:
        return "eval_path" if Path(run_cfg.eval.path).expanduser().resolve() == data else ""
    return "held_out" if Path(run_cfg.data.path).expanduser().resolve() == data else ""


def run_eval(args: Any) -> tuple[dict[str, Any], Path]:
    """Everything ``main`` does but printing the table: returns (result, path of the JSON written)."""
    from dapo.model import check_context, compute_dtype, eos_ids, load_model, load_tokenizer, resolve_device
    from dapo.problems import load_problems
    from dapo.rollout.hf import HFEngine

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    cfg, rows = _eval_config(args)
    held_out, limit = rows == "held_out", args.limit
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.model, str(model_dir))
    if held_out:
        print(f"dapo eval: {args.data} is the file this run trained on: evaluating the rows it held out "
              f"(its before/after problems); --all-rows evaluates every row", file=sys.stderr)
    elif rows == "eval_path" and not limit:
        limit = cfg.eval.size
        print(f"dapo eval: {args.data} is this run's eval.path: evaluating its first eval.size={limit} rows (its "
              f"before/after problems); --all-rows evaluates every row", file=sys.stderr)
    # data and reward before the weights: a typo should not cost loading a large model
    probs = load_problems(cfg, tok, lambda s: print(s, file=sys.stderr), train=False, limit=limit,
                          held_out=held_out)
    try:
        if not probs.eval_items:
            why = (f"the run trained on {args.data} and held none of its rows out (--all-rows evaluates every row)"
                   if held_out else "no row of it became a problem (see the load line above)")
            raise ValueError(f"--data {args.data}: nothing to evaluate: {why}")
        params = sampling_params(cfg)
        check_context(str(model_dir), probs.prompt_lengths(), params.max_new_tokens,
                      f"--max-new-tokens ({params.max_new_tokens})", log=lambda s: print(s, file=sys.stderr))
        device = resolve_device(cfg.model.device)
        # as training evaluates: float32 weights under the compute dtype's autocast, so the same weights give
        # the same numbers here and in a run's eval/acc (a bfloat16 copy would round them differently)
        model = load_model(cfg.model, str(model_dir), device)
        engine = HFEngine(model, int(tok.pad_token_id), eos_ids(model, tok), max_batch=cfg.rollout.batch_size,
                          compute_dtype=compute_dtype(cfg.model.dtype, device))
        print(f"dapo eval: {len(probs.eval_items)} problems x {params.n} samples (T {params.temperature}, top-p "
              f"{params.top_p}, max {params.max_new_tokens} new tokens) on {device}", file=sys.stderr)
        from dapo.rollout.multiturn import from_config

        multiturn = from_config(cfg, engine, tok, probs.template, probs.closers, str(model_dir))
        result = evaluate(engine, probs.eval_items, probs.score_fn, lambda ids: tok.decode(ids, skip_special_tokens=True),
                          params, cfg.eval_seed, extract=probs.extract, progress=_progress_printer(args.progress),
                          multiturn=multiturn)
    finally:
        probs.close()
    is_task = not cfg.data.path
    result = {
        "settings": {"model": str(model_dir), "data": args.data, "k": params.n, "temperature": params.temperature,
                     "top_p": params.top_p, "top_k": params.top_k, "max_new_tokens": params.max_new_tokens,
                     "seed": cfg.eval_seed, "limit": limit, "template": probs.template, "held_out": held_out,
                     "reward": f"task:{cfg.data.task}" if is_task else cfg.reward.fn,
                     **({"env": cfg.env.path, "tools": cfg.env.tools, "max_turns": cfg.rollout.max_turns}
                        if cfg.env.path or cfg.env.tools else {})},
        "wall_s": time.perf_counter() - t0,
        **result,
    }
    if args.no_samples:
        result.pop("samples")
    name = f"task-{cfg.data.task}" if is_task else _data_name(args.data)
    out = Path(args.out) if args.out else model_dir / f"eval_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, strict_json(result, indent=1, ensure_ascii=False))
    return result, out


def _data_name(data: str) -> str:
    """The default result file's name part for ``--data``: the file's name, its format kept so that
    ``mine.jsonl`` and ``mine.parquet`` do not overwrite each other's results (JSONL, the common case, drops it).

    >>> _data_name("d/mine.jsonl"), _data_name("mine.parquet"), _data_name("data.v2.jsonl"), _data_name("saved/")
    ('mine', 'mine.parquet', 'data.v2', 'saved')
    """
    name = Path(data.rstrip("/")).name
    return name.removesuffix(".jsonl")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(list(argv) if argv is not None else None)
    result, out = run_eval(args)
    s = result["settings"]
    print(f"{s['model']} on {s['data']}: {result['metrics']['problems']} problems x {s['k']} samples "
          f"(T {s['temperature']}, top-p {s['top_p']}, seed {s['seed']}), {result['wall_s']:.1f}s")
    print(format_table(result))
    errs = {k: v for k, v in result["reward_stats"].items() if v}
    if errs:
        print("reward failures (scored as wrong): " + ", ".join(f"{k} {int(v)}" for k, v in errs.items()))
        for msg in result["reward_messages"]:
            print(f"  {msg}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
