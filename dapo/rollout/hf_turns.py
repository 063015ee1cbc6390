"""Multi-turn sampling on the HF engine that keeps each trajectory's keys/values between its turns.

``TurnCache(engine).sample(rows, feeds, params, seeds)`` samples one turn for each of ``rows`` (trajectory ids),
first running ``feeds[k]`` (the prompt on the first turn; later the token that ended the row's last turn and the
observation) through the model on top of what the row's cache already holds. Nothing is re-prefilled: a turn costs
its new tokens. Rows that are not asked for again are dropped from the cache.

The cache is one batch: rows are left-padded within each feed, and the padding (and every position a row spends
finished while others still decode) stays in the cache as a hole that the 2D attention mask hides; positions come
from each row's own count of real tokens, so the holes do not shift them. What it gives up against
``HFEngine.generate``: finished rows are not compacted out of a turn's decode (a row that is done for this turn
may be needed the next), and the G samples of a prompt do not share its prefill. The mask gets a turn's decode
columns at its start and fills one per step. Uniforms come from the same per-row generators as ``generate``'s, so
a row's tokens are the ones ``generate`` samples from the same context and seed (up to float differences
between batch shapes).
"""
from __future__ import annotations

from typing import Sequence

import torch

from dapo.rollout.base import Completion, SamplingParams
from dapo.rollout.hf import (
    HFEngine, _expand_cache, cache_kwarg, completions_of, end_ids, returned_cache, row_uniforms, sample_token,
)


class TurnCache:
    """The keys/values of a set of trajectories between their turns (module docstring)."""

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.past = None
        self.attn: torch.Tensor | None = None  # (b, K) long: 1 on the cache positions each row attends to
        self.pos: torch.Tensor | None = None  # (b,) the position of each row's next real token
        self.rows: list[int] = []  # the trajectory of each cache row

    @torch.no_grad()
    def sample(self, rows: Sequence[int], feeds: Sequence[Sequence[int]], params: SamplingParams,
               row_seeds: Sequence[int]) -> list[Completion]:
        """One turn of each row: ``params.max_new_tokens`` at most, ``row_seeds[k]`` seeding row k's uniforms."""
        assert len(rows) == len(feeds) == len(row_seeds) and all(len(f) for f in feeds)
        e = self.engine
        net = e._net()  # the model, or under LoRA its merged sampler
        was_training = net.training
        net.eval()
        dtype = e.compute_dtype
        try:
            with torch.autocast(device_type=e.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return self._sample(net, list(rows), feeds, params, row_seeds)
        finally:
            net.train(was_training)

    def _sample(self, net: torch.nn.Module, rows: list[int], feeds: Sequence[Sequence[int]], params: SamplingParams,
                row_seeds: Sequence[int]) -> list[Completion]:
        e, dev = self.engine, self.engine.device
        b, F, T = len(rows), max(len(f) for f in feeds), params.max_new_tokens
        inp = torch.full((b, F), e.pad_token_id, dtype=torch.long)
        new = torch.zeros((b, F), dtype=torch.long)  # 1 on each row's real feed tokens (left-padded)
        for k, f in enumerate(feeds):
            inp[k, F - len(f):] = torch.as_tensor(list(f), dtype=torch.long)
            new[k, F - len(f):] = 1
        inp, new = inp.to(dev), new.to(dev)
        cache_kw = cache_kwarg(net)
        if self.past is None:
            attn, start = new, torch.zeros(b, dtype=torch.long, device=dev)
        else:
            at = {r: i for i, r in enumerate(self.rows)}
            idx = torch.tensor([at[r] for r in rows], device=dev)
            if len(idx) != len(self.rows) or bool((idx != torch.arange(len(self.rows), device=dev)).any()):
                self.past.batch_select_indices(idx)
                self.attn, self.pos = self.attn[idx], self.pos[idx]
            attn, start = torch.cat([self.attn, new], dim=1), self.pos
        pos = (start[:, None] + new.cumsum(dim=1) - 1).clamp(min=0)  # (b, F); padding's positions are never read
        kw = {} if self.past is None else {cache_kw: self.past}
        out = net(input_ids=inp, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
        past = returned_cache(out)
        if self.past is None:  # growable storage, as generate's
            past = _expand_cache(past, torch.arange(b, device=dev), F + T, dtype=e.kv_dtype)
        logits, next_pos = out.logits[:, -1], start + new.sum(dim=1)  # (b, V), (b,)
        u = row_uniforms(row_seeds, T, dev)  # (b, T)
        ends = end_ids(e.eos_token_ids, params, dev)
        tok_bt = torch.full((b, T), e.pad_token_id, dtype=torch.long, device=dev)
        lp_bt = torch.zeros((b, T), dtype=torch.float32, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        K0 = attn.shape[1]
        attn = torch.cat([attn, attn.new_zeros(b, T)], dim=1)  # a column per decode step, filled as it runs
        n_steps = 0
        for t in range(T):
            tok, lp_bt[:, t] = sample_token(logits, params, u[:, t])
            tok = tok.masked_fill(done, e.pad_token_id)
            tok_bt[:, t] = tok
            n_steps = t + 1
            done = done | torch.isin(tok, ends)
            if bool(done.all()) or t == T - 1:
                break
            # a row that has just ended is fed its last token masked out: that token opens its next feed instead
            live = (~done).long()
            attn[:, K0 + t] = live
            out = net(input_ids=tok[:, None], attention_mask=attn[:, : K0 + t + 1], position_ids=next_pos[:, None],
                      use_cache=True, **{cache_kw: past})
            past, logits = returned_cache(out), out.logits[:, -1]
            next_pos = next_pos + live
        self.past, self.attn, self.pos, self.rows = past, attn[:, : K0 + n_steps - 1], next_pos, rows
        return completions_of(tok_bt[:, :n_steps], lp_bt[:, :n_steps], ends, e.weight_version)
