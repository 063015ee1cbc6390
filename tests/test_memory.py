"""The memory budget checked at build time: model shapes from transformers configs (no weights, the meta
device), hand-computed byte counts, and the refusal of a 7B-on-one-GPU layout with its numbers and keys."""
import pytest
import torch
from transformers import Qwen2Config

from dapo.config import ConfigError, load_config
from dapo.memory import ACT_BYTES, HEAD_BYTES, ModelShape, check_device_memory, check_memory, memory_budget, model_shape

H200 = 141e9

QWEN_7B = dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, vocab_size=152064,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, vocab_size=151936,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


def _qwen2_params(hidden, layers, inter, vocab, heads, kv_heads, tied):
    """Qwen2's parameter count by hand: q/k/v with biases, o, gate/up/down, two norms a layer, final norm."""
    kv = hidden // heads * kv_heads
    layer = hidden * hidden + hidden + 2 * (hidden * kv + kv) + hidden * hidden + 3 * hidden * inter + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * layer + hidden


def test_model_shape_counts_qwen2_7b_on_the_meta_device():
    shape = model_shape(Qwen2Config(**QWEN_7B))
    assert shape.params == _qwen2_params(3584, 28, 18944, 152064, 28, 4, False) == 7_615_616_512  # Qwen2.5-7B's
    assert (shape.hidden, shape.layers, shape.vocab, shape.lora_params) == (3584, 28, 152064, 0)
    lora = model_shape(Qwen2Config(**QWEN_7B), lora_rank=16, lora_targets=("q_proj", "v_proj"))
    assert lora.lora_params == 28 * 16 * ((3584 + 3584) + (3584 + 512))


def test_budget_parts_by_hand():
    shape = ModelShape(params=1000, hidden=10, layers=2, vocab=50, lora_params=30)
    base = ["optim.micro_batch_size=2", "data.max_prompt_len=6", "rollout.max_new_tokens=4",
            "algo.overlong_cache_len=2", "rollout.engine=vllm", "rollout.gpu_memory_utilization=0.25"]
    act = 2 * 10 * 10 * 2 * ACT_BYTES + 2 * 4 * 50 * HEAD_BYTES  # 20 tokens, 8 of them responses
    assert memory_budget(load_config(overrides=base), shape, 1e6) == {
        "weights + gradients + AdamW": 16_000, "vLLM": 250_000, "activations": act}
    lora = memory_budget(load_config(overrides=base + ["model.lora_rank=4"]), shape, 1e6, ranks=2)
    assert lora["frozen base"] == 1000 * 2 / 2 and lora["weights + gradients + AdamW"] == 16 * 30 / 2
    ckpt = memory_budget(load_config(overrides=base + ["model.gradient_checkpointing=true"]), shape, 1e6)
    assert ckpt["activations"] == 20 * 10 * (2 * 2 + ACT_BYTES) + 8 * 50 * HEAD_BYTES
    own = memory_budget(load_config(overrides=base[:4] + ["rollout.dtype=bfloat16", "algo.kl_coef=0.1"]), shape, 1e6)
    assert own["sampler copy"] == 2000 and own["KL reference"] == 4000 and "vLLM" not in own


def test_7b_full_training_beside_vllm_on_one_141gb_gpu_is_refused_with_the_numbers_and_keys():
    cfg = load_config(overrides=["rollout.engine=vllm"])
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, model_shape(Qwen2Config(**QWEN_7B)), H200)
    msg = str(e.value)
    need = (16 * 7_615_616_512 + 0.5 * H200) / 1e9  # before activations: 121.8 + 70.5 GB
    assert "which has 141.0 GB" in msg and float(msg.split("about ")[1].split(" GB")[0]) > need
    assert "weights + gradients + AdamW 121.8" in msg and "vLLM 70.5" in msg
    for key in ("rollout.gpu_memory_utilization", "model.lora_rank", "optim.micro_batch_size"):
        assert key in msg
    # the keys it names do make it fit: LoRA adapters, a smaller vLLM share and micro-batch
    check_memory(load_config(overrides=["rollout.engine=vllm", "model.lora_rank=16", "rollout.gpu_memory_utilization=0.3",
                                        "optim.micro_batch_size=4"]),
                 model_shape(Qwen2Config(**QWEN_7B), lora_rank=16), H200)


def test_05b_beside_vllm_fits_and_the_check_reads_the_models_config(tiny_model_dir):
    check_memory(load_config(overrides=["rollout.engine=vllm"]), model_shape(Qwen2Config(**QWEN_05B)), H200)
    cfg = load_config()
    check_device_memory(cfg, str(tiny_model_dir), torch.device("cuda", 0), total=1e12)  # a stand-in device size
    with pytest.raises(ConfigError, match=r"on cuda:0, which has 0\.0 GB"):
        check_device_memory(cfg, str(tiny_model_dir), torch.device("cuda", 0), total=1e6)
    check_device_memory(cfg, str(tiny_model_dir), torch.device("cpu"), total=1e6)  # CPU runs are not checked
