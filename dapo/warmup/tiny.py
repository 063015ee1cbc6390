"""The tiny model a warm-up starts from when no ``model.path`` is given: a freshly initialised Qwen2."""
from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def build_tiny_model(
    vocab_size: int,
    eos_id: int,
    pad_id: int,
    bos_id: int,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    ffn: int = 512,
    max_pos: int = 1024,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 causal LM with tied input/output embeddings (defaults: ~1.06M parameters).

    The global torch RNG is left untouched: the weights depend on ``seed`` alone.
    """
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = bos_id
    return model
