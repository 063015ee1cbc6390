"""The HF rollout engine on a real tiny Qwen2: determinism, max tokens, EOS, log-probs, padding."""
import torch
from transformers import AutoModelForCausalLM

from dapo.rollout import HFEngine, SamplingParams
from dapo.rollout.hf import filter_logits, sample_inverse_cdf
from dapo.learner.policy import make_seq_batch, response_logprobs

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15]]


def _engine(tiny_model_dir, eos=(1,), max_batch=256):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return HFEngine(model, pad_token_id=0, eos_token_ids=eos, max_batch=max_batch)


def test_same_seed_same_samples_whatever_the_batch(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    p = SamplingParams(n=3, max_new_tokens=10)
    a = eng.generate(PROMPTS, p, seeds=[11, 12, 13])
    b = eng.generate(PROMPTS, p, seeds=[11, 12, 13])
    assert [c.token_ids.tolist() for c in a] == [c.token_ids.tolist() for c in b]
    assert a == b  # Completions compare by value, tensors included
    # prompt 2 alone, and in batches of 2 rows: same seed -> same samples
    alone = _engine(tiny_model_dir, max_batch=2).generate(PROMPTS[2:], p, seeds=[13])
    assert [c.token_ids.tolist() for c in alone] == [c.token_ids.tolist() for c in a[6:]]
    other = eng.generate(PROMPTS, p, seeds=[21, 22, 23])
    assert [c.token_ids.tolist() for c in other] != [c.token_ids.tolist() for c in a] and other != a
    assert [c.prompt_index for c in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_max_tokens_and_eos_are_honoured(tiny_model_dir):
    eos = (3, 17, 40, 55, 71)  # several stop ids so a random model hits them often
    eng = _engine(tiny_model_dir, eos=eos)
    comps = eng.generate(PROMPTS, SamplingParams(n=16, max_new_tokens=6), seeds=[1, 2, 3])
    reasons = {c.finish_reason for c in comps}
    assert reasons == {"stop", "length"}
    for c in comps:
        assert c.token_ids.dtype == torch.long and c.logprobs.dtype == torch.float32
        assert c.token_ids.untyped_storage().nbytes() == 8 * len(c.token_ids)  # its own storage, not a batch's
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
        assert not any(t in eos for t in c.token_ids[:-1].tolist())  # nothing after a stop token
        if c.finish_reason == "stop":
            assert int(c.token_ids[-1]) in eos
        else:
            assert len(c.token_ids) == 6 and int(c.token_ids[-1]) not in eos


def test_logprobs_match_a_full_forward_pass_at_temperature(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    comps = eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, temperature=0.7), seeds=[4, 5, 6])
    # left-padded batch decoding vs one prompt at a time with no padding at all
    for c in comps:
        ids = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids.tolist()])
        with torch.no_grad():
            logits = eng.model(ids).logits[0] / 0.7
        lp = torch.log_softmax(logits, -1)
        L = len(PROMPTS[c.prompt_index])
        ref = [lp[L - 1 + k, t].item() for k, t in enumerate(c.token_ids.tolist())]
        assert max(abs(x - y) for x, y in zip(ref, c.logprobs.tolist())) < 1e-4
    # and the trainer's chunked response log-probs agree with the engine
    sb = make_seq_batch([PROMPTS[c.prompt_index] for c in comps], [c.token_ids for c in comps], pad_id=0)
    with torch.no_grad():
        lp, ent = response_logprobs(eng.model, sb, temperature=0.7, with_entropy=True, chunk=5)
    for b, c in enumerate(comps):
        torch.testing.assert_close(lp[b, : len(c.token_ids)], c.logprobs, atol=1e-4, rtol=0)
    assert (ent[sb.response_mask > 0] > 0).all()


def test_chunked_response_logprobs_gradient_equals_unchunked(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    comps = eng.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8), seeds=[4, 5, 6])
    sb = make_seq_batch([PROMPTS[c.prompt_index] for c in comps], [c.token_ids for c in comps], pad_id=0)
    grads = []
    for chunk in (3, 10_000):
        eng.model.zero_grad()
        lp, _ = response_logprobs(eng.model, sb, chunk=chunk)
        (lp * sb.response_mask).sum().backward()
        grads.append(eng.model.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_top_k_top_p_filtering_and_inverse_cdf():
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), -1)
    assert torch.isinf(filter_logits(logp, top_k=2)[0, 2:]).all()
    p = logp.exp()[0]
    kept = filter_logits(logp, top_p=float(p[0] + 0.01))  # the top token plus the next one covers it
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
    # u below the first token's mass picks token 0, above it token 1, ...
    cdf = p.cumsum(0)
    u = torch.tensor([0.0, cdf[0].item() + 1e-4, cdf[2].item() + 1e-4])
    assert sample_inverse_cdf(logp.expand(3, -1), u).tolist() == [0, 1, 3]
    # sampling frequencies follow the distribution
    gen = torch.Generator().manual_seed(0)
    draws = sample_inverse_cdf(logp.expand(20000, -1), torch.rand(20000, generator=gen))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)
