"""Rollout on a Hugging Face ``transformers`` causal LM: batched, KV-cached sampling.

Prompts are left-padded so every row's next token sits in the last column; positions come from the
attention mask so padding does not shift them. Each sample draws its uniforms from its own generator,
seeded from (prompt seed, sample index), and picks its token by inverse-CDF sampling: the same seed
gives the same completion whichever batch the sample lands in (up to float differences in the model).

Where the time goes, and what is done about it:

* the G samples of a prompt share its prefix: the prompt is run once (prefill) and its keys/values
  are copied to the G rows, instead of G identical prefills;
* keys/values are appended in place into storage that grows by doubling (``_BufferedLayer``) rather
  than by ``torch.cat`` at every step, which copies the whole cache each token (quadratic in the
  length). The storage starts at the prompt plus ``kv_headroom`` positions and doubles only when the
  longest live row needs it (never past prompt + max_new_tokens): reserving prompt + max_new_tokens
  for every row up front costs hundreds of GB at DAPO's 20k-token limit when most answers stop early;
* the decode mask is handed to sdpa/eager attention ready-made, as (b, 1, 1, keys) booleans; other
  implementations (flash_attention_2, whose unpadding path takes only the 2D padding mask) get the 2D
  mask and build what they need from it;
* finished rows leave the batch: once an eighth of the rows have stopped, the cache and the per-row
  state keep only the live rows, so a batch of short answers with one long straggler does not pay for
  B rows until the straggler ends.

Left as they are, because they are small next to the keys/values (about 30 bytes per row and step
against 2 x layers x kv_heads x head_dim x dtype bytes, ~57 KB for a 7B Qwen2): the (B, max_new_tokens)
uniforms, sampled tokens and log-probs, and the (B, prompt + max_new_tokens) attention mask.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from typing import Any, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from dapo.rollout.lean import RotaryTable, lean_decode_step, lean_unsupported
from dapo.rollout.base import Completion, Fingerprints, SamplingParams, compare_fingerprints, derive_seed, weight_fingerprints


def filter_logits(logp: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the nucleus of mass top_p. (B, V) -> (B, V)."""
    if top_k > 0 and top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)
        probs = sorted_lp.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def sample_inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logp) using the row's uniform u in [0, 1). (B, V), (B,) -> (B,)."""
    cdf = logp.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    target = (u * cdf[:, -1]).unsqueeze(-1)  # scale by the total: cumsum rounds below 1
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp(max=logp.shape[-1] - 1)


def row_uniforms(row_seeds: Sequence[int], T: int, device: torch.device) -> torch.Tensor:
    """Each row's uniforms for T decode steps, from its own generator seeded ``row_seeds[b]``. (B, T) float64."""
    return torch.stack([torch.rand(T, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                        for s in row_seeds]).to(device)


def end_ids(eos_token_ids: Sequence[int], params: SamplingParams, device: torch.device) -> torch.Tensor:
    """The token ids that end a completion: the engine's eos ids and the request's stop ids ([-1]: none)."""
    return torch.tensor(sorted(set(eos_token_ids) | set(params.stop_token_ids)) or [-1], device=device)


def sample_token(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from the last position's logits (b, V) and its uniform u (b,): (token, its log-prob
    under the temperature-scaled distribution), both (b,)."""
    logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)  # (b, V)
    tok = sample_inverse_cdf(filter_logits(logp, params.top_p, params.top_k), u.to(logp.dtype))
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def completions_of(tok_bt: torch.Tensor, lp_bt: torch.Tensor, ends: torch.Tensor, version: int) -> list[Completion]:
    """The sampled (B, n) tokens and log-probs as completions: each row ends after its first stop token (a row that
    stopped holds padding after it), or at the cap ("length")."""
    tok_bt, lp_bt = tok_bt.cpu(), lp_bt.cpu()
    is_end = torch.isin(tok_bt, ends.cpu())  # (B, n)
    stopped = is_end.any(dim=1)  # (B,)
    n = torch.where(stopped, is_end.int().argmax(dim=1) + 1, tok_bt.shape[1]).tolist()
    return [Completion(0, tok_bt[b, : n[b]].clone(), lp_bt[b, : n[b]].clone(),  # own storage: pickled alone
                       "stop" if s else "length", version) for b, s in enumerate(stopped.tolist())]


@functools.lru_cache(maxsize=None)
def _cache_name_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes a KV cache: ``cache`` in transformers releases that
    renamed it (5.2x; ``past_key_values`` there warns on every call), ``past_key_values`` before. Read
    from the forward's signature once per model class."""
    return _cache_name_of(type(model))


@functools.lru_cache(maxsize=None)
def _output_cache_field(cls: type) -> str:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return "cache" if "cache" in names else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The cache a forward returned, read by its own field name (the old alias warns in newer transformers)."""
    return getattr(out, _output_cache_field(type(out)))


class _BufferedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in storage ``capacity`` positions long, grown by doubling.

    ``update`` writes the new positions in place and exposes views of the filled part, so a decode step
    costs what the attention reads, not a copy of the whole cache. When the storage is full it doubles
    (never past ``max_capacity``, the most a batch can need): a growth copies the filled part once, so
    growing from small costs at most as much copying again as the cache holds.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, max_capacity: int | None = None,
                 dtype: torch.dtype | None = None):
        """``dtype``: of the storage (default: the keys'); positions written later are cast to it."""
        super().__init__()
        B, h, n, _ = keys.shape
        dtype = dtype or keys.dtype
        self.max_capacity = max_capacity
        self._k = keys.new_empty(B, h, max(capacity, n), keys.shape[-1], dtype=dtype)
        self._v = values.new_empty(B, h, max(capacity, n), values.shape[-1], dtype=dtype)
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self.n = n
        self.dtype, self.device, self.is_initialized = dtype, keys.device, True
        self._expose()

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def _expose(self) -> None:
        self.keys, self.values = self._k[:, :, : self.n], self._v[:, :, : self.n]

    def _grow(self, need: int) -> None:
        """New storage of max(need, 2 x capacity) positions (capped at ``max_capacity``), filled part copied."""
        cap = max(need, 2 * self.capacity)
        if self.max_capacity is not None:
            cap = max(need, min(cap, self.max_capacity))
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], cap, old.shape[3])
            new[:, :, : self.n] = old[:, :, : self.n]
            setattr(self, name, new)
            self._expose()  # re-point the views so the old storage is freed now, one tensor at a time

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t = key_states.shape[-2]
        if self.n + t > self.capacity:
            self._grow(self.n + t)
        self._k[:, :, self.n : self.n + t] = key_states
        self._v[:, :, self.n : self.n + t] = value_states
        self.n += t
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(len(indices), *old.shape[1:])
            # index_select, not old[indices, :, :n]: advanced indexing on the strided view of the filled
            # part ran 4-5x slower (measured at the 25M decode shape), and compaction copies the whole cache
            torch.index_select(old[:, :, : self.n], 0, indices, out=new[:, :, : self.n])
            setattr(self, name, new)
            self._expose()


def _expand_cache(past, rows: torch.Tensor, capacity: int, max_capacity: int | None = None,
                  dtype: torch.dtype | None = None):
    """The prefill cache of U unique prompts -> one row per sample (``rows`` indexes the prompts),
    with room for ``capacity`` positions, growing up to ``max_capacity``, stored in ``dtype`` (default: as
    the model wrote them). Layers of other kinds (sliding windows...) are only indexed."""
    if isinstance(past, DynamicCache) and past.layers and all(type(x) is DynamicLayer for x in past.layers):
        past.layers = [_BufferedLayer(x.keys.index_select(0, rows), x.values.index_select(0, rows), capacity,
                                      max_capacity, dtype)
                       for x in past.layers]
    else:
        past.batch_select_indices(rows)
    return past


class HFEngine:
    """The in-process engine: wraps a causal LM (on CPU or one GPU) and samples from it.

    In a single process the engine shares the trainer's model object, so ``load_weights`` with the
    trainer's own tensors only records the version; a separate engine (a Ray worker) copies them in.

    A LoRA model (``dapo.lora``) is sampled from merged weights (``dapo.lora.MergedSampler``, its own copy of
    the adapted layers, W + (alpha/r) B A) unless ``merge_lora`` is False: the merge is recomputed at each
    ``load_weights`` and when ``weight_version`` was changed from outside (ranks that sample what they train).
    ``model`` stays the LoRA model: it is what pushes fill and what ``check_weights`` reads.
    """

    compact_frac: float = 0.125
    """Drop finished rows from the decode batch once at least this fraction of it has finished."""
    prebuilt_mask: bool = True
    """Hand sdpa/eager attention its decode mask ready-made (4D); False = always the 2D padding mask,
    the path every other attention implementation (flash_attention_2) takes."""
    lean: bool = True
    """Decode steps of a supported model (``dapo.rollout.lean``) in a few large ops instead of transformers'
    forward (the prefill always takes that forward); False = always transformers'."""

    def __init__(
        self,
        model: torch.nn.Module,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        max_batch: int = 256,
        kv_headroom: int | None = 256,
        compute_dtype: torch.dtype = torch.float32,
        kv_dtype: torch.dtype | None = None,
        merge_lora: bool = True,
    ):
        """``kv_headroom``: decode positions the KV storage holds beyond the prompt before its first
        doubling; None reserves all ``max_new_tokens`` up front (the memory a batch can need at worst).
        ``compute_dtype``: the forward passes run under autocast in it (a float32 model shared with the
        trainer, sampling in the trainer's compute dtype); the sampling distribution is float32 whatever it is.
        ``kv_dtype``: of the keys/values kept between steps; default the compute dtype under autocast, else
        the dtype the model writes them in (a bf16 model's bf16). Under bf16 autocast a
        float32 model writes its keys in float32 (RoPE's float32 cos/sin promote the bf16 projection) and its
        values in bf16; attention casts both to bf16 before it reads them, so storing them in bf16 gives the
        same tokens for 2/3 of the memory, and spares attention re-casting the whole key cache at every layer
        of every step. ``merge_lora``: a LoRA model samples from merged weights (see the class docstring)."""
        if kv_headroom is not None and kv_headroom < 1:
            raise ValueError(f"HFEngine(kv_headroom=...) must be >= 1 or None, got {kv_headroom}")
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            # transformers refuses this at load time; a config changed after loading gets here instead
            raise ImportError("model.attn_implementation=flash_attention_2 needs the flash_attn package, which is "
                              "not importable here: pip install flash-attn (NVIDIA GPU), or use "
                              "model.attn_implementation=sdpa")
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.max_batch = max_batch
        self.kv_headroom = kv_headroom
        self.compute_dtype = compute_dtype
        self.kv_dtype = kv_dtype or (compute_dtype if compute_dtype != torch.float32 else None)  # None: as written
        self.weight_version = 0
        from dapo.lora import MergedSampler, has_lora
        from dapo.model import weights_to_sync

        self.merged = MergedSampler(model) if merge_lora and has_lora(model) else None
        """The merged LoRA model decoding runs on (None: ``model`` itself)."""
        self._merged_at = self.weight_version  # the version whose adapters ``merged`` holds

        floats = [t.dtype for t in weights_to_sync(model).values() if t.is_floating_point()]
        self.weight_dtype: torch.dtype | None = floats[0] if floats else None
        """What its pushed weights are kept in: the dtype of what a push replaces (under LoRA the adapters')."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        own = self.model.state_dict()
        unknown = sorted(set(state_dict) - set(own))
        if unknown:  # strict=False below would skip them and stamp a version the weights are not
            raise ValueError(f"weights v{version}: {len(unknown)} tensors the model does not have (first: {unknown[:3]})")
        shared = all(own[k].data_ptr() == v.data_ptr() for k, v in state_dict.items() if k in own)
        if not shared:
            self.model.load_state_dict(state_dict, strict=False)
        self.weight_version = int(version)
        if self.merged is not None:
            self.merged.refresh()
            self._merged_at = self.weight_version

    def _net(self) -> torch.nn.Module:
        """The module to decode with: the merged LoRA model (refreshed if the version moved without a push), or ``model``."""
        if self.merged is None:
            return self.model
        if self._merged_at != self.weight_version:
            self.merged.refresh()
            self._merged_at = self.weight_version
        return self.merged.model

    @torch.no_grad()
    def check_weights(self, expected: Fingerprints) -> None:
        """Compare the model's own tensors with the fingerprints of what was pushed (``WeightSyncError``)."""
        own = self.model.state_dict()
        compare_fingerprints(expected, (((n,), fp) for n, fp in weight_fingerprints(
            (n, own[n]) for n in expected if n in own).items()), "the HF rollout engine")

    @torch.no_grad()  # not inference_mode: a module caching a tensor in forward would poison training
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Completion]:
        assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts"
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        # sort by prompt length so each batch pads little (a prompt's samples stay adjacent: the sort is
        # stable); results are put back in order below
        order = sorted(range(len(rows)), key=lambda r: len(prompts[rows[r][0]]))
        out: list[Completion | None] = [None] * len(rows)
        net = self._net()
        was_training = net.training
        net.eval()
        dtype = self.compute_dtype
        try:
            with torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype != torch.float32):
                for start in range(0, len(order), self.max_batch):
                    batch = [order[k] for k in range(start, min(start + self.max_batch, len(order)))]
                    comps = self._generate_batch(
                        net, [prompts[rows[r][0]] for r in batch],
                        [derive_seed(seeds[rows[r][0]], rows[r][1]) for r in batch],
                        params,
                    )
                    for r, c in zip(batch, comps):
                        c.prompt_index = rows[r][0]
                        out[r] = c
        finally:
            net.train(was_training)
        return out  # type: ignore[return-value]

    def _generate_batch(
        self, net: torch.nn.Module, prompts: list[Sequence[int]], row_seeds: list[int], params: SamplingParams
    ) -> list[Completion]:
        dev = self.device
        B, L, T = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
        # unique prompts: a prompt's n samples share one prefill
        uniq: dict[tuple[int, ...], int] = {}
        row_prompt = torch.tensor([uniq.setdefault(tuple(p), len(uniq)) for p in prompts], device=dev)  # (B,)
        U = len(uniq)
        input_ids = torch.full((U, L), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((U, L + T), dtype=torch.long)  # prompt mask, then one column per new token
        for p, u_i in uniq.items():
            input_ids[u_i, L - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            attn[u_i, L - len(p) :] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = (attn[:, :L].cumsum(dim=1) - 1).clamp(min=0)  # (U, L)
        u = row_uniforms(row_seeds, T, dev)  # (B, T)
        ends = end_ids(self.eos_token_ids, params, dev)

        cache_kw = cache_kwarg(net)
        out = net(input_ids=input_ids, attention_mask=attn[:, :L], position_ids=pos, use_cache=True,
                  logits_to_keep=1)
        start = L + T if self.kv_headroom is None else L + min(T, self.kv_headroom)
        past = _expand_cache(returned_cache(out), row_prompt, start, max_capacity=L + T, dtype=self.kv_dtype)
        logits = out.logits[:, -1][row_prompt]  # (B, V)
        attn, next_pos = attn[row_prompt], pos[row_prompt, -1:] + 1  # (B, L + T), (B, 1)
        attn[:, L:] = 1  # columns of tokens not generated yet are never read: only [:, :L + t + 1] is passed
        impl = getattr(net.config, "_attn_implementation", None)
        lean = None
        if (self.prebuilt_mask and impl in ("sdpa", "eager")
                and all(isinstance(x, _BufferedLayer) for x in getattr(past, "layers", ()))):
            # every layer attends to every cached position: hand the model its (b, 1, 1, keys) mask ready-made
            # rather than have it rebuild a causal 4D mask from the 2D one at every token
            attn = attn.bool()[:, None, None, :]
            if self.lean and lean_unsupported(net) is None:
                lean = RotaryTable.of(net, L + T, net.get_input_embeddings().weight.dtype)

        tok_bt = torch.full((B, T), self.pad_token_id, dtype=torch.long, device=dev)
        lp_bt = torch.zeros((B, T), dtype=torch.float32, device=dev)
        live = torch.arange(B, device=dev)  # original row of each row still in the batch
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # per row still in the batch
        n_steps = 0
        for t in range(T):
            tok, lp = sample_token(logits, params, u[live, t])
            tok = tok.masked_fill(done, self.pad_token_id)
            tok_bt[live, t] = tok
            lp_bt[live, t] = lp
            n_steps = t + 1
            done = done | torch.isin(tok, ends)
            n_done = int(done.sum())
            if n_done == len(live) or t == T - 1:
                break
            if n_done >= max(1, int(self.compact_frac * len(live))):  # drop finished rows
                keep = (~done).nonzero().squeeze(-1)
                past.batch_select_indices(keep)
                live, tok, attn, next_pos = live[keep], tok[keep], attn[keep], next_pos[keep]
                done = done[keep]
            if lean is not None:
                logits = lean_decode_step(net, tok, next_pos[:, 0], attn[..., : L + t + 1], past.layers, lean)
            else:
                out = net(input_ids=tok[:, None], attention_mask=attn[..., : L + t + 1], position_ids=next_pos,
                          use_cache=True, **{cache_kw: past})
                past, logits = returned_cache(out), out.logits[:, -1]
            next_pos = next_pos + 1
        return completions_of(tok_bt[:, :n_steps], lp_bt[:, :n_steps], ends, self.weight_version)
