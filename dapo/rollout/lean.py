"""One decode step of a Llama-family decoder in a few large ops: what ``HFEngine`` runs per new token.

A decode step feeds one token per row through every layer. At the sizes dapo trains on a CPU (the 1M demo,
a 25M model) the step's GEMMs are small, and what transformers' general forward adds around them costs as
much as the arithmetic: per layer about fifty tensor ops and a dozen module calls (hooks, kwargs, dtype
checks), rotary tables recomputed from the positions at every step, masks rebuilt. This module computes the
same function with the model's own weights (nothing is copied, so it sees every weight update at once):

- rotary cos/sin for every position the batch can reach, computed once per batch from the model's own
  ``inv_freq`` and ``attention_scaling`` (what its rotary module does per step) and gathered per row;
- the rotation applied to queries and keys in one pass (they are one tensor view apart);
- attention for one query per row with grouped KV heads packed as a batch of queries per KV head (no
  ``repeat_kv`` copies), on the boolean mask the engine already holds;
- RMSNorm in float32 as transformers computes it; autocast casts the weights for the GEMMs as before.

Supported: ``Qwen2ForCausalLM`` and ``LlamaForCausalLM`` with full attention (no sliding window), SiLU MLPs,
plain ``nn.Linear`` projections (a peft-wrapped model takes the general path) and a rotary type that
does not change with the sequence length. Anything else: :func:`lean_unsupported` says why, and the engine
keeps transformers' forward. The logits equal that forward's to float rounding (tests/test_rollout_lean.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_MODELS = ("Qwen2ForCausalLM", "LlamaForCausalLM")


def lean_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot take the lean decode step (None: it can)."""
    if type(model).__name__ not in _MODELS:
        return f"{type(model).__name__} is not one of {', '.join(_MODELS)}"
    c = model.config
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"hidden_act {c.hidden_act!r}"
    if any(t != "full_attention" for t in (getattr(c, "layer_types", None) or ())):
        return "sliding-window layers"
    if getattr(c, "use_sliding_window", False) and getattr(c, "sliding_window", None):
        return "a sliding window"
    if getattr(c, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
        return "a rotary embedding that depends on the sequence length"
    for layer in model.model.layers:
        mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if any(type(m) is not torch.nn.Linear for m in mods):
            return "projections that are not plain nn.Linear (adapters)"
    if type(model.lm_head) is not torch.nn.Linear:
        return "an LM head that is not a plain nn.Linear"
    return None


@dataclass
class RotaryTable:
    """cos and sin for positions 0..n-1, (n, head_dim), in the dtype the model's rotary module returns."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def of(cls, model: torch.nn.Module, n: int, dtype: torch.dtype) -> "RotaryTable":
        rot = model.model.rotary_emb
        pos = torch.arange(n, device=rot.inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * rot.inv_freq.float()  # (n, d/2), as the module multiplies them
        emb = torch.cat((freqs, freqs), dim=-1)
        return cls((emb.cos() * rot.attention_scaling).to(dtype), (emb.sin() * rot.attention_scaling).to(dtype))


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' RMSNorm: in float32, back to the input dtype, times the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


@torch.no_grad()
def lean_decode_step(model: torch.nn.Module, tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                     layers: list[Any], rotary: RotaryTable) -> torch.Tensor:
    """Logits of the next token for one new token per row. tok (b,), pos (b,) its position, mask (b, 1, 1, n)
    booleans over the n cached positions after this one is written, ``layers`` the cache's layers (each with
    ``update(k, v) -> (keys, values)``, (b, kv_heads, n, d)). Returns (b, V)."""
    c = model.config
    b = tok.shape[0]
    nq, nkv = c.num_attention_heads, c.num_key_value_heads
    d = getattr(c, "head_dim", None) or c.hidden_size // nq
    x = model.model.embed_tokens(tok)  # (b, H)
    cos, sin = rotary.cos[pos][:, None], rotary.sin[pos][:, None]  # (b, 1, d)
    for layer, cache in zip(model.model.layers, layers):
        attn = layer.self_attn
        h = _rms_norm(x, layer.input_layernorm)
        q = attn.q_proj(h).view(b, nq, d)
        k = attn.k_proj(h).view(b, nkv, d)
        v = attn.v_proj(h).view(b, nkv, 1, d)
        q = q * cos + torch.cat((-q[..., d // 2:], q[..., : d // 2]), dim=-1) * sin
        k = k * cos + torch.cat((-k[..., d // 2:], k[..., : d // 2]), dim=-1) * sin
        keys, values = cache.update(k.view(b, nkv, 1, d), v)
        # grouped heads: the nq / nkv queries of a KV head attend to its keys as one batch of queries
        o = F.scaled_dot_product_attention(q.view(b, nkv, nq // nkv, d), keys, values, attn_mask=mask,
                                           scale=attn.scaling)  # (b, nkv, groups, d)
        x = x + attn.o_proj(o.reshape(b, nq * d))
        h = _rms_norm(x, layer.post_attention_layernorm)
        mlp = layer.mlp
        x = x + mlp.down_proj(F.silu(mlp.gate_proj(h), inplace=True).mul_(mlp.up_proj(h)))  # no grad: in place
    return model.lm_head(_rms_norm(x, model.model.norm))  # (b, V)
