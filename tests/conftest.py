"""Shared fixtures: a tiny real Qwen2 model with the project's character tokenizer, saved in HF format."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def build_random_tiny(path, seed=0, hidden=64, layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dapo.data.charvocab import make_char_tokenizer

    tok = make_char_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def one_thread():
    """Runs in this process single-threaded: float rounding that repeats bit for bit (as the one-thread
    subprocesses of tests/faults do), and a shared 2-core machine not oversubscribed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    build_random_tiny(path)
    return path


# settings that make a run take seconds: G=4, 4 prompts, 8 new tokens
TINY_RUN = [
    "rollout.group_size=4", "optim.train_batch_size=4", "optim.mini_batch_size=2", "optim.micro_batch_size=5",
    "rollout.max_new_tokens=8", "algo.overlong_cache_len=2", "eval.size=8", "log.progress=plain",
    "algo.max_gen_rounds=2", "log.tensorboard=false",
]
