"""The training model's side of the maths: log-probs (and entropy) of response tokens.

Only response positions go through the LM head, and they go in chunks under activation checkpointing,
so a (B, T, V) logits tensor is never materialised: peak extra memory is ``chunk x V`` floats in the
forward pass and again in the backward pass, whatever the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dapo.algo import token_entropy, token_logprobs


@dataclass
class SeqBatch:
    """Prompts left-padded to Lp and responses right-padded to T, side by side: the layout of a rollout."""

    input_ids: torch.Tensor  # (B, Lp + T)
    attention_mask: torch.Tensor  # (B, Lp + T)
    response_mask: torch.Tensor  # (B, T) 1 on generated tokens (stop token included)

    @property
    def n_resp(self) -> int:
        return self.response_mask.shape[1]

    def index(self, idx: torch.Tensor | list[int]) -> "SeqBatch":
        return SeqBatch(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx])

    def to(self, device: torch.device | str) -> "SeqBatch":
        return SeqBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def make_seq_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SeqBatch:
    """Lay out (prompt, response) pairs as one padded batch; trims columns that are padding in every row."""
    assert len(prompts) == len(responses)
    B = len(prompts)
    Lp = max(len(p) for p in prompts)
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((B, Lp + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, Lp + T), dtype=torch.long)
    rmask = torch.zeros((B, T), dtype=torch.float32)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, Lp - len(p) : Lp] = torch.as_tensor(p, dtype=torch.long)
        attn[b, Lp - len(p) : Lp] = 1
        if r:
            ids[b, Lp : Lp + len(r)] = torch.as_tensor(r, dtype=torch.long)
            attn[b, Lp : Lp + len(r)] = 1
            rmask[b, : len(r)] = 1.0
    return SeqBatch(ids, attn, rmask)


def _head_chunk(head: torch.nn.Module, h: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool):
    logits = head(h).float() / temperature  # (c, V)
    lp = token_logprobs(logits, labels, chunk=logits.shape[0] or 1)
    ent = token_entropy(logits.detach(), chunk=logits.shape[0] or 1) if with_entropy else torch.zeros_like(lp)
    return lp, ent


def _trunk_hidden(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The trunk's last hidden states (B, L, H), through the model's own call.

    Calling the whole model (not ``model.base_model``) lets wrappers see a forward: FSDP2 gathers the
    root's parameters (embeddings, final norm, LM head) in its forward hook. Only one position's logits
    are computed there (``logits_to_keep=1``); the hidden states come from a hook on the trunk.
    """
    seen: list[torch.Tensor] = []
    handle = model.base_model.register_forward_hook(lambda _m, _a, out: seen.append(out.last_hidden_state))
    try:
        model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen[-1]


def response_logprobs(
    model: torch.nn.Module,
    batch: SeqBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response token | prefix) at ``temperature``: (B, T) float32, and (B, T) entropy if asked.

    Differentiable in the log-probs (entropy is detached: it is a metric here). Padding positions hold
    garbage; multiply by ``batch.response_mask``.
    """
    pos = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = _trunk_hidden(model, batch.input_ids, batch.attention_mask, pos)  # (B, L, H)
    T = batch.n_resp
    h = hidden[:, -T - 1 : -1]  # (B, T, H): the position before each response token predicts it
    labels = batch.input_ids[:, -T:]  # (B, T)
    B, _, H = h.shape
    h_flat, lab_flat = h.reshape(B * T, H), labels.reshape(B * T)
    head = model.get_output_embeddings()
    lps, ents = [], []
    grad = torch.is_grad_enabled()
    for s in range(0, B * T, chunk):
        args = (head, h_flat[s : s + chunk], lab_flat[s : s + chunk], temperature, with_entropy)
        if grad and B * T > chunk:  # recompute each chunk's logits in backward instead of keeping them
            lp, ent = checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            lp, ent = _head_chunk(*args)
        lps.append(lp)
        ents.append(ent)
    logp = torch.cat(lps).view(B, T)
    ent = torch.cat(ents).view(B, T) if with_entropy else None
    return logp, ent
