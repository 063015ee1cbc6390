"""How a step's tokens are laid out: flat buffers with offsets (``Ragged``: token ids and log-probs from the
engine to the loss and into checkpoints) and token-budget micro-batches packed into one row
(``optim.micro_batch_tokens``), which must give the padded layout's log-probs, loss and gradient."""
import io
from dataclasses import replace

import pytest
import torch

from conftest import TINY_RUN
from dapo.config import load_config
from dapo.data.example import Example
from dapo.items import Group, PromptItem
from dapo.model import load_model, make_optimizer
from dapo.rollout.base import Completion
from dapo.trainer import batch as batch_mod
from dapo.learner.plan import micro_batches_of
from dapo.trainer.batch import rollout_correction
from dapo.learner.policy import make_packed_batch, make_seq_batch, response_logprobs
from dapo.ragged import Ragged
from dapo.learner import LocalLearner, TrainBatch


# ------------------------------------------------------------------------------------------ Ragged, Completion


def test_ragged_rows_positions_and_padding_hand_computed():
    r = Ragged.of([[1.0, 2.0, 3.0], [], [4.0, 5.0], [6.0]], torch.float32)
    assert r.offsets.tolist() == [0, 3, 3, 5, 6] and r.lengths.tolist() == [3, 0, 2, 1] and len(r) == 4
    assert r[2].tolist() == [4.0, 5.0] and r.tolist() == [[1.0, 2.0, 3.0], [], [4.0, 5.0], [6.0]]
    assert r.positions([3, 0, 1, 2]).tolist() == [5, 0, 1, 2, 3, 4]
    assert r.padded([2, 1, 0], 2, fill=-1.0).tolist() == [[4.0, 5.0], [-1.0, -1.0], [1.0, 2.0]]  # cut at T
    assert r.like(r.values * 2)[0].tolist() == [2.0, 4.0, 6.0]
    assert Ragged.of([[], []], torch.long).padded([1], 3).tolist() == [[0, 0, 0]]


def test_completion_holds_tensors_compares_by_value_and_converts_lists():
    c = Completion(0, [5, 6, 1], [-0.5, -1.25, -0.125], "stop", 3)
    assert c.token_ids.dtype == torch.long and c.logprobs.dtype == torch.float32
    assert c == Completion(0, torch.tensor([5, 6, 1]), torch.tensor([-0.5, -1.25, -0.125]), "stop", 3)
    assert c != Completion(0, [5, 6, 2], [-0.5, -1.25, -0.125], "stop", 3)
    with pytest.raises(ValueError, match="equal length"):
        Completion(0, [5, 6], [-0.5], "stop")


def test_completions_and_ragged_buffers_pickle_as_numpy_and_come_back_as_writable_tensors():
    import pickle

    import numpy as np

    from dapo.ragged import from_pickled

    c = Completion(2, [5, 6, 1], [-0.5, -1.25, -0.125], "stop", 3)
    back = pickle.loads(pickle.dumps(c, protocol=5))
    assert back == c and back.weight_version == 3 and back.token_ids.dtype == torch.long
    back.logprobs += 1.0  # its own writable storage
    assert c.logprobs[0] == -0.5
    r = Ragged.of([[1, 2], [], [3]], torch.long)
    buffers = []
    data = pickle.dumps(r, protocol=5, buffer_callback=buffers.append)  # out of band, as Ray sends numpy
    assert len(buffers) == 2
    r2 = pickle.loads(data, buffers=buffers)
    assert r2.tolist() == [[1, 2], [], [3]] and r2.offsets.dtype == torch.long
    ro = np.arange(3)
    ro.flags.writeable = False  # Ray's object store hands out read-only buffers: copied, never aliased
    t = from_pickled(ro)
    t += 1
    assert ro.tolist() == [0, 1, 2] and t.tolist() == [1, 2, 3]


def test_carried_groups_survive_a_weights_only_checkpoint_and_old_list_checkpoints_still_load():
    from dapo.trainer.run import _group_from_plain, _group_to_plain

    comps = [Completion(0, torch.randint(4, 70, (n,)), -torch.rand(n), "stop" if n < 9 else "length", 2) for n in (3, 9, 1)]
    g = Group(PromptItem(7, Example("1+2=", "3", "add"), [5, 6, 7]), comps, [1.0, -1.0, 1.0], [True, False, True],
              [1.0, -1.2, 1.0], step=4)
    buf = io.BytesIO()
    torch.save({"carried": [_group_to_plain(g)]}, buf)
    buf.seek(0)
    back = _group_from_plain(torch.load(buf, weights_only=True)["carried"][0])
    assert back.completions == comps and back.rewards == g.rewards and back.item.uid == 7 and back.step == 4
    old = _group_to_plain(g)  # a checkpoint written before the tensor change held lists
    old["completions"] = [{**c, "token_ids": c["token_ids"].tolist(), "logprobs": c["logprobs"].tolist()}
                          for c in old["completions"]]
    assert _group_from_plain(old).completions == comps
    traj = Completion(0, [9, 4, 4, 9], [-0.5, 0.0, 0.0, -0.25], "stop", 2, [True, False, False, True])  # multi-turn
    buf = io.BytesIO()
    torch.save({"carried": [_group_to_plain(Group(g.item, [traj], [1.0], [True], [1.0], step=4))]}, buf)
    buf.seek(0)
    assert _group_from_plain(torch.load(buf, weights_only=True)["carried"][0]).completions[0].mask.tolist() == [
        True, False, False, True]


def test_flatten_groups_lays_out_one_buffer_with_each_response_a_row():
    from dapo.trainer.batch import flatten_groups

    cfg = load_config(overrides=[*TINY_RUN])
    item = PromptItem(0, Example("q", "a"), [5, 6])
    comps = [Completion(0, list(range(10, 10 + n)), [-0.1 * n] * n, "stop" if n < 4 else "length") for n in (1, 4, 2, 3)]
    b = flatten_groups([Group(item, comps, [1, -1, 1, -1], [True, False, True, False], [1.0, -1.0, 1.0, -1.0], 1)], cfg, 1)
    assert b.responses.tolist() == [c.token_ids.tolist() for c in comps]
    assert torch.equal(b.behaviour_logp.values, torch.cat([c.logprobs for c in comps]))
    assert b.behaviour_logp.offsets is b.responses.offsets and b.loss_mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert b.prompts[0] is item.prompt_ids and b.seq_lengths == [3, 6, 4, 5]


def _mismatch_batch(n_rows=9):
    g = torch.Generator().manual_seed(3)
    lens = [int(x) for x in torch.randint(1, 12, (n_rows,), generator=g)]
    beh = [-torch.rand(n, generator=g) for n in lens]
    b = TrainBatch.of([[5]] * n_rows, [torch.randint(4, 60, (n,), generator=g) for n in lens], beh, [True] * n_rows,
                      torch.randn(n_rows, generator=g), torch.ones(n_rows))
    b.loss_mask[4] = 0.0
    old = b.responses.like(torch.cat([x + 0.01 * torch.randn(len(x), generator=g) for x in beh]))
    return b, old


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_rollout_correction_equals_the_library_on_each_response_alone(monkeypatch, mode):
    from dapo.algo import rollout_is_weights, rollout_sequence_mask

    monkeypatch.setattr(batch_mod, "_CHUNK_ROWS", 2)  # several chunks of length-sorted rows
    cfg = load_config(overrides=[f"algo.rollout_is={mode}", "algo.rollout_mask_low=0.995", "algo.rollout_mask_high=1.005"])
    b, old = _mismatch_batch()
    weights, m = rollout_correction(b, old, cfg.algo)
    kept = []
    for i in range(len(b.responses)):
        o, s = old[i][None], b.behaviour_logp[i][None]  # (1, T) the response alone
        if mode == "token":
            w, _ = rollout_is_weights(o, s, torch.ones_like(o), cfg.algo.rollout_is_cap)
            want = w[0] if i != 4 else torch.ones_like(w[0])  # kept out of the loss: weight 1, untouched
            torch.testing.assert_close(weights[i], want, atol=1e-6, rtol=0)
        else:
            keep, _ = rollout_sequence_mask(o, s, torch.ones_like(o), 0.995, 1.005)
            kept.append(float(keep[0]) if i != 4 else 0.0)
    if mode == "sequence":
        assert b.weighted(weights).trainable().tolist() == [k > 0 for k in kept] and 0 < sum(kept) < 8
        assert all(set(weights[i].tolist()) == {kept[i]} for i in range(9) if i != 4)  # a row's tokens: all 1 or all 0
        assert m["mismatch/masked_frac"] == pytest.approx((8 - sum(kept)) / 8)
    diff = torch.cat([(old[i] - b.behaviour_logp[i]).abs() for i in range(9) if i != 4])
    assert m["mismatch/logp_abs_diff"] == pytest.approx(float(diff.mean()), rel=1e-5)


def test_rollout_correction_with_nothing_in_the_loss_is_neutral():
    cfg = load_config(overrides=["algo.rollout_is=token"])
    b, old = _mismatch_batch()
    b.loss_mask[:] = 0.0  # e.g. every response truncated, under the overlong filter
    w, m = rollout_correction(b, old, cfg.algo)
    assert m["mismatch/logp_abs_diff"] == 0.0 and m["mismatch/ratio_max"] == 1.0 and m["mismatch/masked_frac"] == 0.0
    assert torch.equal(w.values, torch.ones_like(old.values))


# ------------------------------------------------------------------------------------------ token-budget planning


def test_token_budget_micro_batches_hand_computed():
    lengths = [9, 4, 6, 3, 12, 2, 5]
    # best fit, longest first: 12 alone (over the budget), 9 | 6+4 | 5+3+2
    assert micro_batches_of(list(range(7)), lengths, 0, tokens=10) == [[4], [0], [2, 1], [6, 3, 5]]
    assert micro_batches_of([1, 3, 5], lengths, 0, tokens=10) == [[1, 3, 5]]
    assert micro_batches_of(list(range(7)), lengths, 3) == [[5, 3, 1], [6, 2, 0], [4]]  # padded path unchanged


def test_token_budget_micro_batches_cover_every_row_once_within_budget():
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(1, 300, (500,), generator=g)]
    idx = list(range(0, 500, 2))
    mbs = micro_batches_of(idx, lengths, 0, tokens=512)
    assert sorted(i for mb in mbs for i in mb) == idx
    assert all(sum(lengths[i] for i in mb) <= 512 for mb in mbs)
    assert len(mbs) <= -(-sum(lengths[i] for i in idx) // 512) + 3  # near the lower bound
    assert mbs == micro_batches_of(idx, lengths, 0, tokens=512)  # deterministic


# ------------------------------------------------------------------------------------------ packed == padded


def test_packed_row_layout_hand_computed():
    pb = make_packed_batch([[5, 6], [7]], [torch.tensor([8, 9, 10]), [11]])
    assert pb.input_ids.tolist() == [[5, 6, 8, 9, 10, 7, 11]]
    assert pb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]  # restart at each sequence
    assert pb.label_pos.tolist() == [2, 3, 4, 6]
    assert pb.response_mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    assert pb.unflatten(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]


def _pairs(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, 70, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    resps = [torch.randint(4, 70, (int(torch.randint(1, 21, (1,), generator=g)),), generator=g) for _ in range(n)]
    return prompts, resps


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_log_probs_and_entropy_equal_the_padded_layout(tiny_model_dir, impl):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl)
    prompts, resps = _pairs()
    with torch.no_grad():
        lp_pad, ent_pad = response_logprobs(model, make_seq_batch(prompts, resps, 0), 0.8, with_entropy=True)
        lp_pack, ent_pack = response_logprobs(model, make_packed_batch(prompts, resps), 0.8, with_entropy=True)
        mask = make_seq_batch(prompts, resps, 0).response_mask
        torch.testing.assert_close(lp_pack * mask, lp_pad * mask, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent_pack * mask, ent_pad * mask, atol=1e-5, rtol=0)
        # the positions restarting is what keeps the sequences apart: counting on through the row would not
        bad = make_packed_batch(prompts, resps)
        bad.position_ids = torch.arange(bad.input_ids.shape[1])[None]
        lp_bad, _ = response_logprobs(model, bad, 0.8)
        assert ((lp_bad - lp_pad) * mask)[1:].abs().max() > 1e-2


def _learner_and_batch(tiny_model_dir, *extra):
    cfg = load_config(overrides=[*TINY_RUN, f"model.path={tiny_model_dir}", "optim.micro_batch_size=3", *extra])
    model = load_model(cfg.model, str(tiny_model_dir), torch.device("cpu"))
    opt, sched = make_optimizer(cfg.optim, model)
    learner = LocalLearner(cfg, model, opt, sched, pad_id=0, device=torch.device("cpu"))
    G, P = cfg.rollout.group_size, 4
    prompts, resps = _pairs(P, seed=2)
    g = torch.Generator().manual_seed(5)
    resps = [torch.randint(4, 70, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g) for _ in range(P * G)]
    beh = [-3.0 - torch.rand(len(r), generator=g) for r in resps]
    keep = torch.ones(P * G)
    keep[6] = 0.0
    batch = TrainBatch.of([prompts[i // G] for i in range(P * G)], resps, beh, [True] * (P * G),
                          torch.randn(P * G, generator=g), keep)
    return cfg, learner, batch


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_packed_micro_batches_give_the_padded_old_logprobs_loss_and_gradient(tiny_model_dir, agg):
    from dapo.learner.policy import PackedBatch, SeqBatch

    cfg, learner, batch = _learner_and_batch(tiny_model_dir, f"algo.loss_agg={agg}")
    seen = []
    forward = learner.policy.forward
    learner.policy.forward = lambda sb, *a: seen.append(sb) or forward(sb, *a)
    out = {}
    for tokens in (0, 48):
        learner.cfg = replace(cfg, optim=replace(cfg.optim, micro_batch_tokens=tokens))
        seen.clear()
        old = learner.old_logp(batch)
        learner.model.zero_grad(set_to_none=True)
        loss, sums = learner.minibatch_backward(batch, old, list(range(len(batch.responses))), with_entropy=True)
        grads = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
        out[tokens] = (old, loss, sums, grads, list(seen))
    (old0, l0, s0, g0, seen0), (old1, l1, s1, g1, seen1) = out[0], out[48]
    assert all(type(sb) is SeqBatch for sb in seen0) and all(type(sb) is PackedBatch for sb in seen1)
    assert all(sb.input_ids.shape[0] == 1 and (sb.input_ids.shape[1] <= 48 or len(sb.response_mask) == 1)
               for sb in seen1)
    assert len(seen1) > 4  # several packed micro-batches (old log-probs and the update)
    assert (old0.values - batch.behaviour_logp.values).abs().max() > 1.0  # recomputed, not the sampler's
    torch.testing.assert_close(old1.values, old0.values, atol=1e-5, rtol=0)
    assert l1 == pytest.approx(l0, abs=1e-5) and abs(l0) > 1e-4
    assert s1.keys() == s0.keys() and {"entropy", "approx_kl", "clipfrac_high"} <= s0.keys()
    for k in s0:
        assert s1[k] == pytest.approx(s0[k], rel=1e-5, abs=1e-6), k
    assert max(g.abs().max() for g in g0.values()) > 1e-3
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4)


def test_only_response_tokens_go_through_the_head(tiny_model_dir, monkeypatch):
    """Padding positions of the padded layout never reach the LM head and log-softmax (27.3): the head sees
    exactly the batch's response tokens, and the log-probs there equal the full-width computation's."""
    import dapo.learner.policy as policy_mod

    model = load_model(load_config(overrides=[f"model.path={tiny_model_dir}"]).model, str(tiny_model_dir),
                       torch.device("cpu"))
    prompts, resps = [[5, 6, 7], [8, 9]], [[20, 21, 22, 23, 24], [25]]
    sb = make_seq_batch(prompts, resps, 0)
    rows = []
    real = policy_mod._head_logprobs
    monkeypatch.setattr(policy_mod, "_head_logprobs", lambda m, h, lab, *a: rows.append(h.shape[0]) or real(m, h, lab, *a))
    with torch.no_grad():
        lp, ent = response_logprobs(model, sb, 1.0, with_entropy=True)
        logits = model(input_ids=sb.input_ids, attention_mask=sb.attention_mask).logits.float()
    assert rows == [6]  # 5 + 1 response tokens, not 2 x 5 positions
    full = torch.log_softmax(logits[:, -6:-1], dim=-1).gather(-1, sb.input_ids[:, -5:, None]).squeeze(-1)
    torch.testing.assert_close(lp * sb.response_mask, full * sb.response_mask, atol=1e-5, rtol=0)
    assert (lp[1, 1:] == 0).all() and (ent[1, 1:] == 0).all()
