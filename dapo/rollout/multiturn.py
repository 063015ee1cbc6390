"""Multi-turn rollouts in token space: the model samples a turn, an environment answers, the model goes on.

A trajectory's completion is the model's sampled tokens interleaved with the environment's observation tokens,
exactly as each came: the model's ids as the engine sampled them (never decoded and re-tokenised), each
observation tokenised on its own and appended. ``Completion.mask`` is True on the model's tokens (they train)
and False on the observation's (context only: no loss, no entropy, not in the token mean); ``logprobs`` are
the sampler's at the model's tokens and 0 at the observation's.

A turn ends where a single-turn response does: at an end-of-sequence or stop token, or at the token budget.
Each turn the engine samples all live trajectories at once, whatever turn each is at. Turn 0 is the single-turn
call (G samples per prompt, seeded as training seeds them), so an environment that never answers gives exactly
the single-turn completions; turn t > 0 of sample j of prompt i is seeded from (prompt seed, j, t).

Budgets, per trajectory:

* ``max_new_tokens`` (``rollout.max_new_tokens``, L_max): the model's own tokens over all turns; the soft
  overlong punishment and the overlong filter read the model's tokens against it;
* ``max_total_tokens`` (``rollout.max_total_tokens``; 0 = the model's context, from its config.json, less the
  prompt): model and observation tokens together; an observation that would cross it is not appended and the
  trajectory ends;
* ``max_turns`` (``rollout.max_turns``): model turns.

Running out of a token budget ends a trajectory with finish_reason 'length' (the overlong filter drops it);
``max_turns`` with 'turns' (not overlong: the model ended every turn itself).

Observations: a string is appended as it is; with a chat template (``chat=True``) an observation is rendered as
a message of its ``role`` (a list: as those messages): the text the template puts between the end of an
assistant turn and the next generation prompt, measured once per observation on a two-message stand-in
conversation, less the end-of-turn token the model has already sampled. So a trajectory's ids equal the
template's rendering of the conversation with two exceptions, both deliberate: the model's turns are its
sampled tokens (a template that rewrites earlier assistant turns, e.g. dropping their reasoning, renders
something else), and each observation is tokenised alone (a BPE merge across its first or last character
would tokenise the whole text differently).

On the HF engine each trajectory's keys/values stay between its turns (``dapo.rollout.hf_turns``): a turn
runs only its new tokens. Other engines (``kv_cache=False``) get one ``generate`` call per turn with the whole
history as the prompt: token-exact too, at the cost of re-prefilling the context so far every turn. That is how
Ray rollout workers run it (``dapo.distributed.RayEngine``): this loop, the environments and the tool pool stay in
the trainer process, and each turn's call is cut into slices over the workers like any other.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dapo.data.files import messages_error, prompt_error
from dapo.envs.base import EnvError, StepResult, row_of, step_all, user_call
from dapo.items import PromptItem
from dapo.rewards.runner import RewardBatch
from dapo.rollout.base import Completion, RolloutEngine, SamplingParams, derive_seed

_MARK = "\x00dapo-turn\x00"
_CLOSED_TURN = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
"""A conversation whose last assistant turn is closed: what an observation's rendering is cut against."""


@dataclass
class Trajectory:
    """One sampled trajectory and what the environment said along it."""

    completion: Completion
    """Model and observation tokens, with ``mask`` and the sampler's log-probs."""
    last_turn: torch.Tensor
    """(t,) the model's last turn's ids: what the reward function scores when the environment gave no reward."""
    env_reward: float | None = None
    """Sum of the rewards the environment gave; None when it gave none."""
    turns: int = 0
    """Model turns sampled."""
    info: dict[str, float] = field(default_factory=dict)
    """The environment's counters (``StepResult.info``), summed over the turns."""


class MultiTurnRollout:
    """``run(items, params, seeds) -> (items, trajectories)`` with an environment per trajectory (module docstring).

    engine: any ``RolloutEngine``. tokenizer: the policy's (a transformers tokenizer). make_env: called with no
    arguments per trajectory. chat: observations are rendered by the tokenizer's chat template.
    """

    def __init__(self, engine: RolloutEngine, tokenizer: Any, make_env: Callable[[], Any], max_turns: int,
                 max_total_tokens: int = 0, chat: bool = False, kv_cache: bool | None = None,
                 context: int | None = None, step_timeout_s: float | None = None):
        """``kv_cache``: keep each trajectory's keys/values between turns (``dapo.rollout.hf_turns``); None = where
        the engine is an ``HFEngine``. Otherwise every turn is an ``engine.generate`` call on the whole history.
        ``context``: the model's positions (its config's context length); with ``max_total_tokens`` = 0 a
        trajectory ends ("length") before its prompt and tokens would pass them, so observations the environment
        does not bound cannot grow a sequence without end. ``step_timeout_s``: the limit of each call of the
        environment's code (``dapo.envs.base.user_call``); None or 0 = none."""
        if max_turns < 1:
            raise ValueError(f"rollout.max_turns must be >= 1, got {max_turns}")
        self.engine, self.tokenizer, self.make_env = engine, tokenizer, make_env
        self.max_turns, self.max_total_tokens, self.chat = max_turns, max_total_tokens, chat
        self.context, self.step_timeout_s = context, step_timeout_s
        from dapo.rollout.hf import HFEngine

        self.kv_cache = isinstance(engine, HFEngine) if kv_cache is None else kv_cache

    # -- text <-> ids at the environment's edge -------------------------------------------------------------

    def encode_prompt(self, prompt: Any, item: PromptItem) -> list[int]:
        """The ids of what ``reset`` returned (None: the item's own prompt ids)."""
        if prompt is None:
            return list(item.prompt_ids)
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        why = prompt_error(prompt) if isinstance(prompt, list) else "is neither a string nor a list"
        if why:  # a message whose content is not text would be rendered as its repr
            raise EnvError(f"the environment's reset returned {type(prompt).__name__} {prompt!r:.60}, which {why}: "
                           f"a string, chat messages (a list of {{'role': str, 'content': str}}) or None (the row's "
                           f"own prompt)")
        if not getattr(self.tokenizer, "chat_template", None):
            raise EnvError("the environment's reset returned chat messages, but the tokenizer has no chat template: "
                           "return a string")
        text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def _turn_close(self) -> tuple[str, str]:
        """The template's rendering of a closed assistant turn, and what it writes after the turn's content (what
        ends an assistant turn, e.g. "<|im_end|>\n"): the same for every observation, rendered once."""
        before = self.tokenizer.apply_chat_template(_CLOSED_TURN, tokenize=False)
        return before, before[before.index(_MARK) + len(_MARK):]

    def observation_text(self, result: StepResult, model_end: str) -> str:
        """The text appended after a model turn that ended with the token whose text is ``model_end``."""
        obs = result.observation
        if not self.chat:
            if not isinstance(obs, str):
                raise EnvError("an observation given as chat messages needs a chat template (data.template=chat); "
                               "return a string")
            return obs
        messages = obs if isinstance(obs, list) else [{"role": result.role, "content": obs}]
        why = messages_error(messages) if isinstance(obs, list) else None
        if why:  # its form; an empty observation is the env's to give
            raise EnvError(f"the environment's step returned an observation {obs!r:.60}, which {why}: a string or "
                           f"chat messages (a list of {{'role': str, 'content': str}})")
        before, close = self._turn_close
        after = self.tokenizer.apply_chat_template(_CLOSED_TURN + messages, add_generation_prompt=True, tokenize=False)
        if not after.startswith(before):
            raise EnvError("the chat template renders earlier turns differently once an observation follows: "
                           "cannot append the observation in token space")
        if model_end and close.startswith(model_end):
            close = close[len(model_end):]  # the model sampled that part itself
        return close + after[len(before):]

    # -- the rollout --------------------------------------------------------------------------------------

    def run(self, items: Sequence[PromptItem], params: SamplingParams,
            seeds: Sequence[int]) -> tuple[list[PromptItem], list[Trajectory]]:
        """G = ``params.n`` trajectories per item, grouped as ``generate`` groups completions; the items come back
        with the prompt ids their environments' ``reset`` gave. With the KV cache, at most ``engine.max_batch``
        trajectories are sampled together (each chunk of prompts to the end before the next)."""
        if not self.kv_cache:
            awake = getattr(self.engine, "awake", None)  # vLLM colocated: one sleep after the last turn, not each
            with awake() if awake is not None else contextlib.nullcontext():
                return self._run(items, params, seeds)
        per = max(1, getattr(self.engine, "max_batch", 256) // params.n)
        out_items: list[PromptItem] = []
        out: list[Trajectory] = []
        for k in range(0, len(items), per):
            its, trajs = self._run(items[k : k + per], params, seeds[k : k + per])
            for t in trajs:
                t.completion.prompt_index += k
            out_items += its
            out += trajs
        return out_items, out

    def _run(self, items: Sequence[PromptItem], params: SamplingParams,
             seeds: Sequence[int]) -> tuple[list[PromptItem], list[Trajectory]]:
        G, tok = params.n, self.tokenizer
        make = self.make_env
        name = getattr(make, "__name__", type(make).__name__)
        limit = self.step_timeout_s
        envs = [user_call(make, f"{name}()", make, timeout_s=limit) for _ in range(len(items) * G)]
        items = list(items)
        for i, it in enumerate(items):
            firsts = [user_call(type(e), f"{type(e).__name__}.reset", e.reset, row_of(it.example), timeout_s=limit)
                      for e in envs[i * G:(i + 1) * G]]
            if any(f != firsts[0] for f in firsts[1:]):
                raise EnvError(f"reset gave different first prompts for one row (prompt {it.uid}): a group of "
                               f"{G} trajectories shares its prompt")
            items[i] = dataclasses.replace(it, prompt_ids=self.encode_prompt(firsts[0], it))
        model_cap = params.max_new_tokens
        if self.max_total_tokens:
            total_caps = [float(self.max_total_tokens)] * len(envs)
        else:  # the model's context, less the row's prompt
            total_caps = [float("inf") if not self.context else max(self.context - len(items[r // G].prompt_ids), 0)
                          for r in range(len(envs))]
        rows = [_Row() for _ in envs]
        version = self.engine.weight_version
        cache = None
        if self.kv_cache:
            from dapo.rollout.hf_turns import TurnCache

            cache = TurnCache(self.engine)
        live = list(range(len(envs)))
        for turn in range(self.max_turns):
            # every live trajectory's next turn in one call; turn 0 seeded as generate seeds sample j of a prompt
            caps = [int(min(model_cap - rows[r].n_model, total_caps[r] - rows[r].n_all)) for r in live]
            turn_params = dataclasses.replace(params, n=1, max_new_tokens=max(caps))
            turn_seeds = [derive_seed(seeds[r // G], r % G, turn) for r in live]  # a prompt seed, with n=1
            if cache is not None:  # the row's cache holds its history but the token that ended its last turn
                feeds = [items[r // G].prompt_ids if not turn else [int(rows[r].last_turn[-1]), *rows[r].pending]
                         for r in live]
                # the uniforms generate would draw: sample j of a prompt at turn 0, sample 0 of its own seed later
                row_seeds = [derive_seed(seeds[r // G], r % G) if not turn else derive_seed(s, 0)
                             for r, s in zip(live, turn_seeds)]
                comps = cache.sample(live, feeds, turn_params, row_seeds)
            elif not turn:  # the single-turn call, its prefill shared by a prompt's G samples
                comps = self.engine.generate([it.prompt_ids for it in items],
                                             dataclasses.replace(params, max_new_tokens=max(caps)), seeds)
            else:  # the whole history as the prompt (re-prefilled)
                ctx = [items[r // G].prompt_ids + torch.cat(rows[r].ids).tolist() for r in live]
                comps = self.engine.generate(ctx, turn_params, turn_seeds)
            waiting, texts = [], []
            for r, c, cap in zip(live, comps, caps):
                row = rows[r]
                t_ids, t_lp, finish = c.token_ids, c.logprobs, c.finish_reason
                if len(t_ids) > cap:  # the call ran to the largest budget among the trajectories
                    t_ids, t_lp, finish = t_ids[:cap], t_lp[:cap], "length"
                row.append(t_ids, t_lp, model=True)
                row.turns, row.last_turn = row.turns + 1, t_ids
                if finish == "length":  # out of tokens: the turn is cut, nothing for the environment to read
                    row.finish = "length"
                    continue
                waiting.append(r)
                texts.append(tok.decode(t_ids, skip_special_tokens=True))
            results = step_all([envs[r] for r in waiting], texts, limit) if waiting else []
            live = []
            for r, res in zip(waiting, results):
                row = rows[r]
                if res.reward is not None:
                    row.reward = (row.reward or 0.0) + float(res.reward)
                for k, v in res.info.items():
                    row.info[k] = row.info.get(k, 0.0) + float(v)
                if res.done:
                    continue
                if turn == self.max_turns - 1:
                    row.finish = "turns"
                    continue
                o_ids = torch.zeros(0, dtype=torch.long)
                if res.observation is not None:
                    end = tok.decode(row.last_turn[-1:], skip_special_tokens=False)
                    o_ids = torch.tensor(tok(self.observation_text(res, end), add_special_tokens=False)["input_ids"],
                                         dtype=torch.long)
                if row.n_all + len(o_ids) >= total_caps[r] or row.n_model >= model_cap:
                    row.finish = "length"  # no room for the observation and a turn after it
                    continue
                row.append(o_ids, torch.zeros(len(o_ids)), model=False)
                row.pending = o_ids.tolist()
                live.append(r)
            if not live:
                break
        trajs = [Trajectory(Completion(r // G, torch.cat(row.ids), torch.cat(row.lps), row.finish, version,
                                       torch.cat(row.masks)), row.last_turn, row.reward, row.turns, row.info)
                 for r, row in enumerate(rows)]
        return items, trajs


@dataclass
class _Row:
    """One trajectory while it is sampled."""

    ids: list[torch.Tensor] = field(default_factory=list)
    lps: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    n_model: int = 0
    n_all: int = 0
    turns: int = 0
    last_turn: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    reward: float | None = None
    info: dict[str, float] = field(default_factory=dict)
    finish: str = "stop"
    pending: list[int] = field(default_factory=list)
    """The observation appended since the row's last turn (what the KV cache has not seen yet)."""

    def append(self, ids: torch.Tensor, logprobs: torch.Tensor, model: bool) -> None:
        self.ids.append(ids)
        self.lps.append(logprobs)
        self.masks.append(torch.full((len(ids),), model, dtype=torch.bool))
        self.n_all += len(ids)
        self.n_model += len(ids) if model else 0


def score_trajectories(trajs: Sequence[Trajectory], examples: Sequence[Any],
                       score_ids: Callable[..., RewardBatch]) -> RewardBatch:
    """Each trajectory's score: the environment's summed reward where it gave one (correct = reward > 0), else
    the reward function on the model's last turn. ``score_ids``: (token ids, examples) -> RewardBatch."""
    need = [k for k, t in enumerate(trajs) if t.env_reward is None]
    sub = score_ids([trajs[k].last_turn for k in need], [examples[k] for k in need]) if need else None
    scores = [float(t.env_reward or 0.0) for t in trajs]
    correct = [t.env_reward is not None and t.env_reward > 0 for t in trajs]
    errors = [""] * len(trajs)
    for n, k in enumerate(need):
        scores[k], correct[k] = sub.scores[n], sub.correct[n]
        errors[k] = sub.errors[n] if sub.errors else ""
    return RewardBatch(scores, correct, dict(sub.stats) if sub else {}, list(sub.messages) if sub else [], errors)


def trajectory_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """What a step's trajectories looked like: turns, observation tokens, cuts, and the environment's counters."""
    n = max(len(trajs), 1)
    obs = sum(len(t.completion.token_ids) - t.completion.n_model_tokens for t in trajs)
    every = sum(len(t.completion.token_ids) for t in trajs)
    out = {
        "env/turns_mean": sum(t.turns for t in trajs) / n,
        "env/obs_tokens": float(obs),
        "env/obs_frac": obs / max(every, 1),
        "env/cut_max_turns": float(sum(t.completion.finish_reason == "turns" for t in trajs)),
        "env/cut_budget": float(sum(t.completion.finish_reason == "length" for t in trajs)),
        "env/reward_given_frac": sum(t.env_reward is not None for t in trajs) / n,
    }
    for t in trajs:
        for k, v in t.info.items():
            out[k] = out.get(k, 0.0) + v
    if "tool/calls" in out:
        out["tool/calls_per_traj"] = out["tool/calls"] / n
    return out


def from_config(cfg: Any, engine: RolloutEngine, tokenizer: Any, template: str,
                closers: list[Callable[[], None]], model_path: str | None = None,
                log: Callable[[str], None] = lambda s: None) -> MultiTurnRollout | None:
    """The multi-turn rollout ``env.*`` asks for (None: single-turn), its tool pool's close added to ``closers``.
    Observations go through the chat template when the prompts do (``data.template`` ending in chat).
    ``model_path``: the policy's directory, whose config's context bounds a trajectory when
    ``rollout.max_total_tokens`` is 0."""
    e = cfg.env
    if not (e.path or e.tools):
        return None
    from dapo.envs import ToolEnv, ToolRunner, load_env

    chat = template.endswith("chat") and bool(getattr(tokenizer, "chat_template", None))
    if e.tools:
        runner = ToolRunner(e.tools, workers=e.workers, timeout_s=e.timeout_s, max_chars=e.max_output_chars,
                            memory_mb=e.memory_mb or None)
        closers.append(runner.close)
        make_env: Callable[[], Any] = lambda: ToolEnv(runner, chat)  # noqa: E731
    else:
        make_env = load_env(e.path)
    context = None
    if model_path and not cfg.rollout.max_total_tokens:
        from dapo.model import model_context

        context, learned = model_context(model_path) or (None, False)
        if context:
            log(f"multi-turn: each trajectory may hold up to {context} tokens (prompt, turns and observations "
                f"together): the model's context (its config.json), since rollout.max_total_tokens=0; one that would "
                f"run past it ends there as 'length', which the overlong filter drops"
                + ("; its position embeddings are learned, so none can run past them" if learned else
                   "; set rollout.max_total_tokens to allow more (its rotary positions run on)"))
    # tools are bounded by env.timeout_s in their worker processes; an environment's own code by env.step_timeout_s
    return MultiTurnRollout(engine, tokenizer, make_env, cfg.rollout.max_turns, cfg.rollout.max_total_tokens, chat,
                            context=context, step_timeout_s=None if e.tools else e.step_timeout_s)
