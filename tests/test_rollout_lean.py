"""The lean decode step (dapo.rollout.lean) against transformers' forward on real tiny models: Qwen2 with
grouped KV heads and q/k/v biases, Llama without biases and with its own head_dim; float32 and bf16 autocast."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dapo.rollout import HFEngine, SamplingParams
from dapo.rollout.lean import lean_unsupported

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15], [20, 21, 22, 23]]
EOS = (3, 17, 40)


def _qwen2(**kw):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True, **kw)).eval()


def _llama():
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                        max_position_embeddings=128, rope_theta=500.0)).eval()


@pytest.mark.parametrize("make", [_qwen2, _llama], ids=["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lean_decode_samples_what_transformers_forward_does(make, dtype):
    model = make()
    assert lean_unsupported(model) is None
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    p = SamplingParams(n=3, max_new_tokens=20)
    seeds = [11, 12, 13, 14]
    general = HFEngine(model, 0, EOS, compute_dtype=dtype)
    general.lean = False
    a = general.generate(PROMPTS, p, seeds)
    n_general, calls[:] = len(calls), []
    b = HFEngine(model, 0, EOS, compute_dtype=dtype).generate(PROMPTS, p, seeds)
    assert len(calls) == 1 and n_general > 10  # lean: the prefill only goes through transformers' forward
    assert [c.token_ids.tolist() for c in a] == [c.token_ids.tolist() for c in b]
    assert {c.finish_reason for c in b} == {"stop", "length"}
    for x, y in zip(a, b):
        torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-5, rtol=0)


def test_what_the_lean_step_does_not_cover_keeps_transformers_forward():
    assert lean_unsupported(_qwen2()) is None
    assert "sliding" in lean_unsupported(_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0))
    model = _qwen2()
    model.model.layers[0].self_attn.q_proj = torch.nn.Sequential(model.model.layers[0].self_attn.q_proj)
    assert "nn.Linear" in lean_unsupported(model)
    assert "not one of" in lean_unsupported(torch.nn.Linear(2, 2))
