"""The training model's side of the maths: log-probs (and entropy) of response tokens.

Only response positions go through the LM head, and they go in chunks, so a (B, T, V) logits tensor
is never materialised: ``_HeadLogProbs`` computes each chunk's log-probs (and entropy) in the forward
pass and keeps only the (B*T,) log-normalisers; the backward pass recomputes each chunk's logits once
and turns them straight into the gradient, d logp / d z = onehot(label) - softmax(z). Peak extra memory
is about two ``chunk x V`` fp32 blocks, with ``chunk`` capped so that ``chunk x V`` stays under
``HEAD_CHUNK_ELEMS`` whatever the vocabulary (a quarter less time than autograd through checkpointed
chunks, which also recomputed the entropy in backward).

Two layouts of a micro-batch, for two different savings:

* ``SeqBatch`` (the default, ``optim.micro_batch_size`` responses): rows side by side, prompts left-padded
  and responses right-padded to the longest. The G responses of a prompt share it: when prompts repeat
  in a batch (they do, G times each), the prompt is run once and its keys/values are indexed out to its
  rows, then the responses run on top of that cache. Same maths (the gradient of a shared prefix is the
  sum over its rows, which indexing gives), a fraction 1 - 1/G of the prompt tokens' compute saved,
  forward and backward. What it wastes is padding: with long-tailed lengths a row as long as the
  longest in its micro-batch.
* ``PackedBatch`` (``optim.micro_batch_tokens``): whole sequences back to back in one row, no padding
  computed at all; but every sequence runs its own prompt (the prefill sharing above does not apply: a
  packed row has no cache to share). Packing pays when lengths vary a lot and prompts are short next to
  the responses, as in long-reasoning RL; the padded layout when prompts are long and responses short.
  Attention: flash_attention_2 runs each sequence on its own (varlen); sdpa and eager get a
  block-diagonal (L, L) mask, so their attention costs the square of the packed row's length: keep
  ``micro_batch_tokens`` moderate there.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicCache, DynamicLayer

from dapo.algo import token_entropy, token_logprobs
from dapo.rollout.hf import cache_kwarg, returned_cache

HEAD_CHUNK_ELEMS = 1 << 25
"""Most logits held at once per chunk (x 4 bytes: 128 MiB); a 152k vocabulary gets 220-row chunks."""


@dataclass
class SeqBatch:
    """Prompts left-padded to Lp and responses right-padded to T, side by side: the layout of a rollout."""

    input_ids: torch.Tensor  # (B, Lp + T)
    attention_mask: torch.Tensor  # (B, Lp + T)
    response_mask: torch.Tensor  # (B, T) 1 on generated tokens (stop token included)
    share_prompts: bool | None = None
    """Run each distinct prompt once and its rows on its cache (see the module docstring): True / False as the
    learner's micro-batch plan decided it (the same on every FSDP rank), None = decide from this batch alone."""

    @property
    def n_resp(self) -> int:
        return self.response_mask.shape[1]

    def to(self, device: torch.device | str) -> "SeqBatch":
        return SeqBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                        self.share_prompts)

    def unflatten(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) values of the response tokens, row after row -> (B, T), 0 after each response's end
        (differentiable)."""
        return x.new_zeros(self.response_mask.shape).masked_scatter(self.response_mask > 0, x)


def make_seq_batch(prompts: list, responses: list, pad_id: int, share_prompts: bool | None = None) -> SeqBatch:
    """Lay out (prompt, response) pairs (lists or 1-D tensors) as one padded batch; trims columns that are
    padding in every row. ``share_prompts``: see ``SeqBatch``."""
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
        if len(r):
            ids[b, Lp : Lp + len(r)] = torch.as_tensor(r, dtype=torch.long)
            attn[b, Lp : Lp + len(r)] = 1
            rmask[b, : len(r)] = 1.0
    return SeqBatch(ids, attn, rmask, share_prompts)


@dataclass
class PackedBatch:
    """(prompt, response) sequences back to back in ONE row, with position ids that restart at 0 at each
    sequence and no attention mask: transformers reads the boundaries off the position ids and keeps each
    sequence to itself (``masking_utils.find_packed_sequence_indices``: a block-diagonal causal mask for
    sdpa and eager; flash_attention_2 turns them into its varlen sequence lengths). Log-probs come out in
    ``SeqBatch``'s (b, T) layout, so the loss does not know which layout ran."""

    input_ids: torch.Tensor  # (1, L) L = the sum of the sequences' lengths
    position_ids: torch.Tensor  # (1, L)
    label_pos: torch.Tensor  # (n,) where each response token sits in the row, sequence after sequence
    response_mask: torch.Tensor  # (b, T) 1 on each response's tokens, left-aligned (as SeqBatch's)

    @property
    def n_resp(self) -> int:
        return self.response_mask.shape[1]

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.label_pos.to(device),
                           self.response_mask.to(device))

    def unflatten(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) values of the response tokens -> (b, T), 0 after each response's end (differentiable)."""
        return x.new_zeros(self.response_mask.shape).masked_scatter(self.response_mask > 0, x)


def make_packed_batch(prompts: list, responses: list) -> PackedBatch:
    """Pack (prompt, response) pairs (lists or 1-D tensors; every prompt at least one token) into one row."""
    assert len(prompts) == len(responses) and all(len(p) for p in prompts), "every prompt needs a token"
    parts, pos, label = [], [], []
    at = 0
    for p, r in zip(prompts, responses):
        n_p, n = len(p), len(p) + len(r)
        parts += [torch.as_tensor(p, dtype=torch.long), torch.as_tensor(r, dtype=torch.long)]
        pos.append(torch.arange(n))
        label.append(torch.arange(at + n_p, at + n))
        at += n
    lens = torch.tensor([len(r) for r in responses])
    T = max(1, int(lens.max()))
    rmask = (torch.arange(T)[None, :] < lens[:, None]).float()  # (b, T)
    return PackedBatch(torch.cat(parts)[None], torch.cat(pos)[None], torch.cat(label), rmask)


def packed_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """(n, H): the last hidden state at the position before each response token of a packed row."""
    out = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                           use_cache=False).last_hidden_state  # (1, L, H)
    return out[0, batch.label_pos - 1]


def response_hidden(model: torch.nn.Module, batch: SeqBatch) -> torch.Tensor:
    """(B, T, H): the last hidden state at the position before each response token (it predicts that token).

    Rows with the same prompt share one prompt forward pass (see the module docstring) when
    ``batch.share_prompts`` says so (None: when that halves the prompt rows at least, ``shares_prompts``),
    unless activation checkpointing is on or the model's cache is not a plain ``DynamicCache``: then, as
    otherwise, one pass over the whole padded batch. Under FSDP the number of decoder passes must be the same
    on every rank (each pass all-gathers every block), so there the learner's plan decides for all ranks at once.
    """
    ids, attn = batch.input_ids, batch.attention_mask
    B, L = ids.shape
    T = batch.n_resp
    Lp = L - T
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
    base = model.base_model
    share = batch.share_prompts
    if share is None:
        share = shares_prompts([tuple(r) for r in torch.cat([ids[:, :Lp], attn[:, :Lp]], dim=1).tolist()])
    if share and Lp > 0 and not (model.training and torch.is_grad_enabled() and _checkpointing(model)):
        _, inv = torch.unique(torch.cat([ids[:, :Lp], attn[:, :Lp]], dim=1), dim=0, return_inverse=True)
        U = int(inv.max()) + 1
        rep = torch.empty(U, dtype=torch.long, device=ids.device).scatter_(0, inv, torch.arange(B, device=ids.device))
        pre = base(input_ids=ids[rep, :Lp], attention_mask=attn[rep, :Lp], position_ids=pos[rep, :Lp], use_cache=True)
        cache = returned_cache(pre)
        if type(cache) is DynamicCache and cache.layers and all(type(x) is DynamicLayer for x in cache.layers):
            cache.batch_select_indices(inv)  # (U, ...) -> (B, ...): differentiable indexing
            out = base(input_ids=ids[:, Lp:], attention_mask=attn, position_ids=pos[:, Lp:], use_cache=True,
                       **{cache_kwarg(base): cache}).last_hidden_state  # (B, T, H)
            return torch.cat([pre.last_hidden_state[inv, -1:], out[:, :-1]], dim=1)
    hidden = base(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state  # (B, L, H)
    return hidden[:, -T - 1 : -1]


def shares_prompts(prompts: list) -> bool:
    """Whether rows with these prompts (hashable: tuples of token ids) are run prompt-shared: at least two rows,
    and at most half as many distinct prompts as rows (below that the second pass costs more than it saves).

    >>> shares_prompts([(1, 2), (1, 2), (3,), (3,)]), shares_prompts([(1, 2), (3,), (3,)])
    (True, False)
    """
    return len(prompts) > 1 and 2 * len(set(prompts)) <= len(prompts)


def _checkpointing(model: torch.nn.Module) -> bool:
    """Activation checkpointing on (HF drops ``use_cache`` then, so the shared-prompt path is off)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


@contextmanager
def head_precision(tf32: bool) -> Iterator[None]:
    """Inside: CUDA float32 matmuls may use TF32 (10-bit mantissa inputs, float32 accumulation) when ``tf32``
    (``model.head_tf32``); the setting before is put back on exit, so nothing outside the LM head changes.
    torch's ``fp32_precision`` API (mixing it with the legacy ``allow_tf32`` flag is an error in torch 2.13).
    No effect on CPU matmuls."""
    if not tf32:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _head_chunk(head: torch.nn.Module, h: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool,
                tf32: bool = False):
    # the LM head in float32, as log-softmax; a checkpointed chunk recomputes under the same precision
    with torch.autocast(device_type=h.device.type, enabled=False), head_precision(tf32):
        logits = head(h.float()).float() / temperature  # (c, V)
    lp = token_logprobs(logits, labels, chunk=logits.shape[0] or 1)
    ent = token_entropy(logits.detach(), chunk=logits.shape[0] or 1) if with_entropy else torch.zeros_like(lp)
    return lp, ent


class _HeadLogProbs(torch.autograd.Function):
    """Chunked log softmax(h W^T / t)[label] and entropy, (N, H) -> (N,), (N,); the entropy is not differentiated.

    Always float32, under autocast too: the logits' rounding is the log-probs' rounding, and a bfloat16
    logit of 20 is only good to 0.06 nats, the size of the importance ratios' deviations that are clipped.
    ``tf32``: its matmuls, forward and backward, with TF32 allowed (``head_precision``).
    """

    @staticmethod
    def forward(ctx, h, weight, labels, temperature: float, chunk: int, with_entropy: bool, tf32: bool = False):
        ctx.tf32 = tf32
        with torch.autocast(device_type=h.device.type, enabled=False), head_precision(tf32):
            return _HeadLogProbs._forward(ctx, h, weight, labels, temperature, chunk, with_entropy)

    @staticmethod
    def _forward(ctx, h, weight, labels, temperature: float, chunk: int, with_entropy: bool):
        N = h.shape[0]
        w32 = weight.float()
        lp = h.new_empty(N, dtype=torch.float32)
        lse = h.new_empty(N, dtype=torch.float32)
        ent = h.new_empty(N if with_entropy else 0, dtype=torch.float32)
        for s in range(0, N, chunk):
            z = (h[s : s + chunk].float() @ w32.t()).div_(temperature)  # (c, V)
            m = torch.logsumexp(z, dim=-1)  # (c,)
            lse[s : s + chunk] = m
            lp[s : s + chunk] = z.gather(-1, labels[s : s + chunk, None]).squeeze(-1) - m
            if with_entropy:
                logp = z.sub_(m[:, None])  # in place: z is not needed any more
                ent[s : s + chunk] = -(logp.exp() * logp).sum(dim=-1)
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        with torch.autocast(device_type=g_lp.device.type, enabled=False), head_precision(ctx.tf32):
            return _HeadLogProbs._backward(ctx, g_lp)

    @staticmethod
    def _backward(ctx, g_lp):
        h, weight, labels, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        w32 = weight.float()
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], chunk):
            hc, g = h[s : s + chunk].float(), g_lp[s : s + chunk].float()
            p = (hc @ w32.t()).div_(t).sub_(lse[s : s + chunk, None]).exp_()  # (c, V): softmax
            dz = p.mul_(-g[:, None])  # d lp / d z = onehot(label) - softmax, times the incoming gradient
            dz.scatter_add_(-1, labels[s : s + chunk, None], g[:, None])
            dz = dz.div_(t)
            if dh is not None:
                dh[s : s + chunk] = (dz @ w32).to(h.dtype)
            if dw is not None:
                dw.addmm_(dz.t(), hc)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None, None


def response_logprobs(
    model: torch.nn.Module,
    batch: SeqBatch | PackedBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 2048,
    compute_dtype: torch.dtype = torch.float32,
    head_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response token | prefix) at ``temperature``: (b, T) float32, and (b, T) entropy if asked.

    The decoder runs under autocast in ``compute_dtype`` (mixed precision: the weights stay as they are);
    the LM head, log-softmax and entropy always in float32. Differentiable in the log-probs (entropy is
    detached: it is a metric here). Only response tokens go through the head (its (V, H) matmuls and the
    log-softmax are most of a small model's update, and padding rows would be wasted on them): positions
    past a response's end hold 0.
    """
    dev = batch.input_ids.device
    with torch.autocast(device_type=dev.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        h = response_hidden(model, batch) if isinstance(batch, SeqBatch) else packed_hidden(model, batch)
    if isinstance(batch, SeqBatch):
        keep = batch.response_mask > 0  # (B, T)
        h_flat, lab_flat = h[keep], batch.input_ids[:, -batch.n_resp :][keep]  # (n, H), (n,)
    else:
        h_flat, lab_flat = h, batch.input_ids[0, batch.label_pos]  # (n, H), (n,)
    logp, ent = _head_logprobs(model, h_flat, lab_flat, temperature, chunk, with_entropy, head_tf32)  # (n,) each
    return batch.unflatten(logp), batch.unflatten(ent) if with_entropy else None


def _head_logprobs(model: torch.nn.Module, h_flat: torch.Tensor, lab_flat: torch.Tensor, temperature: float,
                   chunk: int, with_entropy: bool, tf32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H), (N,) -> log-probs (N,) and entropy (N,) (zeros unless asked) through the LM head, in chunks."""
    head = model.get_output_embeddings()
    chunk = max(1, min(chunk, HEAD_CHUNK_ELEMS // head.weight.shape[0]))
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        return _HeadLogProbs.apply(h_flat, head.weight, lab_flat, temperature, chunk, with_entropy, tf32)
    lps, ents = [], []  # any other head: autograd through checkpointed chunks
    grad = torch.is_grad_enabled()
    N = h_flat.shape[0]
    for s in range(0, N, chunk):
        args = (head, h_flat[s : s + chunk], lab_flat[s : s + chunk], temperature, with_entropy, tf32)
        if grad and N > chunk:  # recompute each chunk's logits in backward instead of keeping them
            lp, ent = checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            lp, ent = _head_chunk(*args)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


class ResponseLogprobs(torch.nn.Module):
    """``response_logprobs`` of the wrapped LM as one module call: what the trainer calls.

    Going through one ``forward`` lets a wrapper around this module see every use of the LM's weights:
    FSDP2 (``dapo.distributed`` ranks) gathers the root's parameters (embeddings, final norm, LM head) in the
    root's forward hook, while ``response_logprobs`` reaches them through ``model.base_model`` and the
    head, never through the LM's own call. In one process it is a plain call.
    """

    def __init__(self, lm: torch.nn.Module, compute_dtype: torch.dtype = torch.float32, head_tf32: bool = False):
        super().__init__()
        self.lm = lm
        self.compute_dtype = compute_dtype
        self.head_tf32 = head_tf32

    def forward(self, batch: SeqBatch | PackedBatch, temperature: float = 1.0, with_entropy: bool = False):
        lp, ent = response_logprobs(self.lm, batch, temperature, with_entropy, compute_dtype=self.compute_dtype,
                                    head_tf32=self.head_tf32)
        return lp.clone(), ent  # not a view: FSDP2 hooks the output for backward (B*T floats, no cost)
