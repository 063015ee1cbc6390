"""Rollout on a Hugging Face ``transformers`` causal LM: batched, KV-cached sampling.

Prompts are left-padded so every row's next token sits in the last column; positions come from the
attention mask so padding does not shift them. Each sample draws its uniforms from its own generator,
seeded from (prompt seed, sample index), and picks its token by inverse-CDF sampling: the same seed
gives the same completion whichever batch the sample lands in (up to float differences in the model).
"""
from __future__ import annotations

from typing import Sequence

import torch

from dapo.rollout.base import Completion, SamplingParams, derive_seed


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


class HFEngine:
    """The in-process engine: wraps a causal LM (on CPU or one GPU) and samples from it.

    In a single process the engine shares the trainer's model object, so ``load_weights`` with the
    trainer's own tensors only records the version; a separate engine (a Ray worker) copies them in.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        max_batch: int = 256,
    ):
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.max_batch = max_batch
        self.weight_version = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        own = self.model.state_dict()
        shared = all(own[k].data_ptr() == v.data_ptr() for k, v in state_dict.items() if k in own)
        if not shared:
            self.model.load_state_dict(state_dict, strict=False)
        self.weight_version = int(version)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Completion]:
        assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts"
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        # sort by prompt length so each batch pads little; results are put back in order below
        order = sorted(range(len(rows)), key=lambda r: len(prompts[rows[r][0]]))
        out: list[Completion | None] = [None] * len(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.max_batch):
                batch = [order[k] for k in range(start, min(start + self.max_batch, len(order)))]
                comps = self._generate_batch(
                    [prompts[rows[r][0]] for r in batch],
                    [derive_seed(seeds[rows[r][0]], rows[r][1]) for r in batch],
                    params,
                )
                for r, c in zip(batch, comps):
                    c.prompt_index = rows[r][0]
                    out[r] = c
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    def _generate_batch(
        self, prompts: list[Sequence[int]], row_seeds: list[int], params: SamplingParams
    ) -> list[Completion]:
        dev = self.device
        B, L, T = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, L - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            attn[b, L - len(p) :] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        # each row's uniforms for every step, from its own generator
        u = torch.stack(
            [torch.rand(T, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in row_seeds]
        ).to(dev)  # (B, T)
        eos = torch.tensor(self.eos_token_ids or (-1,), device=dev)
        stop = torch.tensor(params.stop_token_ids or (), dtype=torch.long, device=dev)

        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        past, logits = out.past_key_values, out.logits[:, -1]  # (B, V)
        next_pos = pos[:, -1:] + 1  # (B, 1)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        toks, lps = [], []
        for t in range(T):
            logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)  # (B, V)
            tok = sample_inverse_cdf(filter_logits(logp, params.top_p, params.top_k), u[:, t].to(logp.dtype))
            lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            tok = tok.masked_fill(done, self.pad_token_id)
            toks.append(tok)
            lps.append(lp)
            done = done | torch.isin(tok, eos) | (torch.isin(tok, stop) if stop.numel() else False)
            if bool(done.all()) or t == T - 1:
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
            out = self.model(
                input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=past, use_cache=True
            )
            past, logits = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1
        tok_bt = torch.stack(toks, dim=1).cpu()  # (B, t)
        lp_bt = torch.stack(lps, dim=1).float().cpu()
        ends = set(self.eos_token_ids) | set(params.stop_token_ids)
        comps = []
        for b in range(B):
            ids, lp = tok_bt[b].tolist(), lp_bt[b].tolist()
            n = next((k + 1 for k, x in enumerate(ids) if x in ends), None)
            reason = "stop" if n is not None else "length"
            n = n if n is not None else len(ids)
            comps.append(Completion(0, ids[:n], lp[:n], reason, self.weight_version))
        return comps
