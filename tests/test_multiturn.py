"""Multi-turn rollouts in token space (#26): a real tiny Qwen2 and its tokenizer, environments that answer.

The random model ends a turn at any digit (a stop token), so trajectories take several turns."""
from dataclasses import replace

import pytest
import torch

from conftest import TINY_RUN
from dapo.config import load_config
from dapo.data.example import Example
from dapo.envs import EnvError, StepResult
from dapo.items import Group, PromptItem
from dapo.learner import LocalLearner
from dapo.model import load_model, load_tokenizer, make_optimizer
from dapo.rollout import HFEngine, SamplingParams, derive_seed
from dapo.rollout.multiturn import MultiTurnRollout, trajectory_metrics
from dapo.trainer.batch import flatten_groups

CPU = torch.device("cpu")


class Silent:
    """Never answers: every trajectory is one turn."""

    def reset(self, row):
        return None

    def step(self, text):
        return StepResult(None, None, True)


class Echo:
    """Answers each turn with "[obs k" and 0 to 3 "+" (by the turn's length: feeds of unequal lengths) and 0.5,
    three times; then the trajectory is over."""

    made: list["Echo"] = []

    def __init__(self):
        self.seen, self.sent = [], []
        Echo.made.append(self)

    def reset(self, row):
        return None

    def step(self, text):
        self.seen.append(text)
        self.sent.append(f"[obs {len(self.seen)}{'+' * (len(text) % 4)}]")
        return StepResult(self.sent[-1], 0.5, len(self.seen) == 3)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, one_thread):
    cfg = load_config(overrides=[*TINY_RUN, f"model.path={tiny_model_dir}", "rollout.group_size=2",
                                 "optim.micro_batch_tokens=0"])
    model = load_model(cfg.model, str(tiny_model_dir), CPU)
    tok = load_tokenizer(cfg.model, str(tiny_model_dir))  # as a run loads it
    engine = HFEngine(model, tok.pad_token_id, [tok.eos_token_id])
    items = [PromptItem(k, Example(f"{k}+{k}=", str(2 * k)), tok(f"{k}+{k}=")["input_ids"]) for k in (3, 7)]
    params = SamplingParams(n=2, max_new_tokens=40, stop_token_ids=tuple(tok.convert_tokens_to_ids(list("0123456789"))))
    seeds = [derive_seed(5, it.uid) for it in items]
    return cfg, model, tok, engine, items, params, seeds


def _learner(cfg, model):
    opt, sched = make_optimizer(cfg.optim, model)
    return LocalLearner(cfg, model, opt, sched, pad_id=0, device=CPU)  # not sharing: old log-probs recomputed


def _groups(items, comps, G=2):
    return [Group(it, comps[i * G:(i + 1) * G], [1.0, -1.0], [True, False], [1.0, -1.0], 1) for i, it in enumerate(items)]


def _segments(c):
    """(is_model, ids) runs of a completion, in order."""
    out, start = [], 0
    m = c.mask.tolist()
    for t in range(1, len(m) + 1):
        if t == len(m) or m[t] != m[start]:
            out.append((m[start], c.token_ids[start:t].tolist()))
            start = t
    return out


@pytest.fixture(scope="module")
def echoed(setup):
    cfg, model, tok, engine, items, params, seeds = setup
    Echo.made = []
    items2, trajs = MultiTurnRollout(engine, tok, Echo, max_turns=4).run(items, params, seeds)
    return items2, trajs, list(Echo.made)


def test_trajectory_is_the_sampled_ids_and_the_observations_ids(setup, echoed):
    cfg, model, tok, engine, items, params, seeds = setup
    items2, trajs, envs = echoed
    assert [it.prompt_ids for it in items2] == [it.prompt_ids for it in items]  # reset gave None: the row's prompt
    assert max(t.turns for t in trajs) >= 2  # the check below covers later turns
    assert len({len(e.sent[0]) for e in envs if e.sent}) > 1  # and feeds of unequal lengths in one cached batch
    for t, env in zip(trajs, envs):
        segs = _segments(t.completion)
        model_turns = [ids for is_model, ids in segs if is_model]
        observations = [ids for is_model, ids in segs if not is_model]
        assert len(model_turns) == t.turns
        # the environment read each turn's own text; each observation's ids are its text tokenised alone
        assert [tok.decode(ids, skip_special_tokens=True) for ids in model_turns][:len(env.seen)] == env.seen
        assert observations == [tok(text, add_special_tokens=False)["input_ids"] for text in env.sent[:len(observations)]]
        assert torch.equal(t.completion.logprobs[~t.completion.mask], torch.zeros(int((~t.completion.mask).sum())))
        assert t.env_reward == (0.5 * len(env.seen) if env.seen else None)
        assert t.completion.finish_reason == ("stop" if len(env.seen) == 3 else "length")
        assert t.completion.n_model_tokens == sum(map(len, model_turns)) <= params.max_new_tokens
    # turn 1 of each trajectory is what the engine samples from prompt + turn 0 + observation 1, at its seed
    for r, t in enumerate(trajs):
        if t.turns < 2:
            continue
        segs = _segments(t.completion)
        ctx = items[r // 2].prompt_ids + segs[0][1] + segs[1][1]
        again = engine.generate([ctx], replace(params, n=1, max_new_tokens=params.max_new_tokens - len(segs[0][1])),
                                [derive_seed(seeds[r // 2], r % 2, 1)])[0]
        assert again.token_ids.tolist()[:len(segs[2][1])] == segs[2][1]
    m = trajectory_metrics(trajs)
    assert m["env/turns_mean"] == sum(t.turns for t in trajs) / 4
    assert m["env/obs_tokens"] == sum(int((~t.completion.mask).sum()) for t in trajs)


def test_recomputed_logprobs_match_the_engines_at_model_tokens_across_turns(setup, echoed):
    cfg, model, tok, engine, items, params, seeds = setup
    items2, trajs, _ = echoed
    batch = flatten_groups(_groups(items2, [t.completion for t in trajs]), cfg, step=1)
    old = _learner(cfg, model).old_logp(batch)
    keep = batch.token_mask.values > 0
    assert int((~keep).sum()) > 0  # there are observation tokens in the trajectories
    torch.testing.assert_close(old.values[keep], batch.behaviour_logp.values[keep], atol=2e-5, rtol=0)


def test_silent_environment_gives_the_single_turn_rollout_and_loss(setup):
    cfg, model, tok, engine, items, params, seeds = setup
    single = engine.generate([it.prompt_ids for it in items], params, seeds)
    # without the KV cache turn 0 is generate's own call: the same completions bit for bit
    _, trajs = MultiTurnRollout(engine, tok, Silent, max_turns=3, kv_cache=False).run(items, params, seeds)
    multi = [t.completion for t in trajs]
    assert [replace(c, mask=None) for c in multi] == single and all(bool(c.mask.all()) for c in multi)
    # with it, the same tokens from the same uniforms, up to the float rounding of another batch shape
    _, cached = MultiTurnRollout(engine, tok, Silent, max_turns=3).run(items, params, seeds)
    assert [t.completion.token_ids.tolist() for t in cached] == [c.token_ids.tolist() for c in single]
    torch.testing.assert_close(torch.cat([t.completion.logprobs for t in cached]),
                               torch.cat([c.logprobs for c in single]), atol=1e-5, rtol=0)
    assert [t.last_turn.tolist() for t in trajs] == [c.token_ids.tolist() for c in single]
    learner = _learner(cfg, model)
    out = []
    for comps in (single, multi):
        b = flatten_groups(_groups(items, comps), cfg, step=1)
        model.zero_grad(set_to_none=True)
        loss, sums = learner.minibatch_backward(b, b.behaviour_logp, list(range(4)), with_entropy=True)
        out.append((loss, sums, [p.grad.clone() for p in model.parameters()]))
    assert out[0][0] == out[1][0] and out[0][1] == out[1][1]
    assert all(torch.equal(a, b) for a, b in zip(out[0][2], out[1][2]))


def test_kv_cache_across_turns_gives_the_re_prefilled_trajectories(setup, echoed):
    cfg, model, tok, engine, items, params, seeds = setup
    _, cached, _ = echoed
    _, again = MultiTurnRollout(engine, tok, Echo, max_turns=4, kv_cache=False).run(items, params, seeds)
    assert [t.completion.token_ids.tolist() for t in cached] == [t.completion.token_ids.tolist() for t in again]
    assert [t.completion.mask.tolist() for t in cached] == [t.completion.mask.tolist() for t in again]
    assert [t.completion.finish_reason for t in cached] == [t.completion.finish_reason for t in again]
    torch.testing.assert_close(torch.cat([t.completion.logprobs for t in cached]),
                               torch.cat([t.completion.logprobs for t in again]), atol=1e-5, rtol=0)
    # a batch of one prompt at a time (engine.max_batch = G): the same trajectories
    small = HFEngine(model, tok.pad_token_id, [tok.eos_token_id], max_batch=2)
    _, chunked = MultiTurnRollout(small, tok, Echo, max_turns=4).run(items, params, seeds)
    assert [t.completion.token_ids.tolist() for t in chunked] == [t.completion.token_ids.tolist() for t in cached]
    assert [t.completion.prompt_index for t in chunked] == [0, 0, 1, 1]


def test_loss_gradient_is_exactly_zero_at_observation_positions(setup, echoed):
    cfg, model, tok, engine, items, params, seeds = setup
    items2, trajs, _ = echoed
    r = max(range(4), key=lambda k: trajs[k].turns)
    c = trajs[r].completion
    packed = replace(cfg, optim=replace(cfg.optim, micro_batch_tokens=512))  # one row: prompt + response
    group = Group(items2[r // 2], [c, c], [1.0, -1.0], [True, False], [1.0, -1.0], 1)
    b = flatten_groups([group], packed, step=1)
    grads = []

    def keep(module, inputs, out):
        out.retain_grad()
        grads.append(out)

    hook = model.model.norm.register_forward_hook(keep)
    try:
        _learner(packed, model).minibatch_backward(b, b.behaviour_logp, [0])
    finally:
        hook.remove()
    P = len(items2[r // 2].prompt_ids)
    g = grads[0].grad[0].abs().sum(-1)  # (L,) at each position: the gradient through the logits it predicts
    at = P - 1 + torch.arange(len(c.token_ids))  # the position predicting response token k
    assert torch.all(g[at[~c.mask]] == 0) and torch.all(g[at[c.mask]] > 0)


def test_budgets_end_trajectories(setup):
    cfg, model, tok, engine, items, params, seeds = setup
    _, trajs = MultiTurnRollout(engine, tok, Echo, max_turns=1).run(items, params, seeds)
    assert {t.completion.finish_reason for t in trajs} <= {"turns", "length"} and all(t.turns == 1 for t in trajs)
    _, trajs = MultiTurnRollout(engine, tok, Echo, max_turns=4, max_total_tokens=12).run(items, params, seeds)
    assert all(len(t.completion.token_ids) <= 12 for t in trajs) and any(t.turns > 1 for t in trajs)
    assert all(t.completion.finish_reason == "length" for t in trajs if t.env_reward != 1.5)


class Flood:
    """Answers every turn with 5000 characters and never ends the trajectory itself."""

    def reset(self, row):
        return None

    def step(self, text):
        return StepResult("9" * 5000, 0.0, False)


def test_the_models_context_bounds_a_trajectory_when_no_total_budget_is_set(setup, tiny_model_dir):
    """rollout.max_total_tokens=0 with an environment whose observations are unbounded: the trajectory ends
    ("length") before prompt + tokens pass the model's positions (stop 37 saw 3 x 100k-char observations grow
    one sequence to a 40 GB attention mask). Set, the budget is the user's, and from_config reads the context."""
    from dapo.model import model_context
    from dapo.rollout.multiturn import from_config

    cfg, model, tok, engine, items, params, seeds = setup
    context = model_context(str(tiny_model_dir))[0]
    assert context == 128
    _, trajs = MultiTurnRollout(engine, tok, Flood, max_turns=4, context=context).run(items, params, seeds)
    for it, t in zip([it for it in items for _ in range(2)], trajs):
        assert t.completion.finish_reason == "length" and len(it.prompt_ids) + len(t.completion.token_ids) <= context
        assert int((t.completion.mask == 0).sum()) == 0  # the 5000-character observation was never appended
    _, trajs = MultiTurnRollout(engine, tok, Flood, max_turns=2).run(items, params, seeds)  # no bound: appended
    assert all(len(t.completion.token_ids) > 5000 for t in trajs if t.turns == 2) and any(t.turns == 2 for t in trajs)
    said = []
    env_cfg = replace(cfg, env=replace(cfg.env, path="test_multiturn:Flood"))
    assert from_config(env_cfg, engine, tok, "none", [], str(tiny_model_dir), said.append).context == 128
    assert "each trajectory may hold up to 128 tokens" in said[0] and "the model's context" in said[0]
    env_cfg = replace(env_cfg, rollout=replace(cfg.rollout, max_total_tokens=4000))
    assert from_config(env_cfg, engine, tok, "none", [], str(tiny_model_dir)).context is None


def test_a_trajectory_pickles_with_its_mask(echoed):
    import pickle

    c = echoed[1][0].completion
    back = pickle.loads(pickle.dumps(c))
    assert back == c and back.mask.dtype == torch.bool and back != replace(c, mask=None)


class ChatEcho(Echo):
    """Echo with chat messages: the first prompt as a user message, observations as tool messages."""

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        return replace(super().step(text), role="tool")


def test_chat_trajectory_is_the_templates_rendering_of_the_conversation(setup):
    cfg, model, tok, engine, items, params, seeds = setup
    chat_tok = load_tokenizer(cfg.model, cfg.model.path)
    chat_tok.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}<eos>\n{% endfor %}"
                              "{% if add_generation_prompt %}[assistant]{% endif %}")
    eos = chat_tok.eos_token_id
    p = replace(params, stop_token_ids=params.stop_token_ids + (eos,))
    mt = MultiTurnRollout(engine, chat_tok, ChatEcho, max_turns=4, chat=True)
    # what goes between the model's turn and its next: the rest of the template's turn end, the tool message, the
    # generation prompt; the end-of-turn token is the model's own when it sampled it
    assert mt.observation_text(StepResult("R", role="tool"), "<eos>") == "\n[tool]R<eos>\n[assistant]"
    assert mt.observation_text(StepResult("R", role="tool"), "7") == "<eos>\n[tool]R<eos>\n[assistant]"
    Echo.made = []
    items2, trajs = mt.run(items, p, seeds)
    assert items2[0].prompt_ids == chat_tok("[user]3+3=<eos>\n[assistant]", add_special_tokens=False)["input_ids"]
    checked = 0
    for r, (t, env) in enumerate(zip(trajs, Echo.made)):
        model_ids = t.completion.token_ids[t.completion.mask][:-1]
        if t.completion.finish_reason != "stop" or bool((model_ids < 4).any()):  # specials: no text to render
            continue
        msgs = [{"role": "user", "content": items[r // 2].example.prompt}]
        for k, (is_model, ids) in enumerate(s for s in _segments(t.completion) if s[0]):
            text = chat_tok.decode(ids[:-1] if ids[-1] == eos else ids)
            msgs.append({"role": "assistant", "content": text})
            if k < len(env.seen) - 1:
                msgs.append({"role": "tool", "content": env.sent[k]})
        rendered = chat_tok.apply_chat_template(msgs, tokenize=False)
        ids = chat_tok(rendered, add_special_tokens=False)["input_ids"]
        last_eos = int(t.completion.token_ids[-1]) == eos  # the template closes the last turn with "<eos>\n"
        want = ids[:-1] if last_eos else ids[:-2]
        assert items2[r // 2].prompt_ids + t.completion.token_ids.tolist() == want
        checked += 1
    assert checked >= 1


def test_chat_messages_an_environment_returns_are_checked_not_rendered_as_reprs(setup):
    """reset's prompt and step's observation as chat messages whose content is not text (a dict, a list of parts)
    would reach the template as their repr: an EnvError naming the message instead."""
    cfg, model, tok, engine, items, params, seeds = setup
    chat_tok = load_tokenizer(cfg.model, cfg.model.path)
    chat_tok.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}<eos>\n{% endfor %}"
                              "{% if add_generation_prompt %}[assistant]{% endif %}")
    mt = MultiTurnRollout(engine, chat_tok, ChatEcho, max_turns=2, chat=True)
    assert mt.encode_prompt([{"role": "user", "content": "3+3="}], items[0]) == chat_tok(
        "[user]3+3=<eos>\n[assistant]", add_special_tokens=False)["input_ids"]
    with pytest.raises(EnvError, match=r"reset returned list .*which message 0 is not \{'role': str, 'content': str\}"):
        mt.encode_prompt([{"role": "user", "content": {"text": "3+3="}}], items[0])
    with pytest.raises(EnvError, match=r"reset returned dict .*which is neither a string nor a list"):
        mt.encode_prompt({"role": "user", "content": "3+3="}, items[0])
    with pytest.raises(EnvError, match=r"step returned an observation .*which message 1 is not"):
        mt.observation_text(StepResult([{"role": "tool", "content": "6"}, {"role": "user", "content": [6]}]), "<eos>")
    assert mt.observation_text(StepResult([{"role": "tool", "content": ""}]), "<eos>") == "\n[tool]<eos>\n[assistant]"
