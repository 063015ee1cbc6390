"""Rollout on vLLM (``rollout.engine=vllm``): the same ``RolloutEngine`` interface as ``HFEngine``.

vLLM is imported only when this engine is built, so ``dapo`` works without it; without it the
constructor raises ``ImportError`` saying so. Built for vLLM's offline ``LLM`` API (v0.10.2 or
newer, for ``logprobs_mode``); NOT RUN in this repository's tests or CI, which have no GPU: only the
missing-vLLM error is tested. Differences from ``HFEngine`` worth knowing:

- samples are seeded per prompt (``SamplingParams.seed``), so reproducible for a given vLLM build and
  GPU, but not the same samples as ``HFEngine`` for the same seed;
- ``Completion.logprobs`` are vLLM's ``processed_logprobs`` (after temperature, and after top-p /
  top-k when those are on), which equal ``HFEngine``'s at the training defaults top_p=1, top_k=0. The
  trainer recomputes old log-probs itself unless ``rollout.use_engine_logprobs=true``.
- new weights go in through ``LLM.collective_rpc`` to a small worker extension that calls the model's
  own ``load_weights`` (HF parameter names in, vLLM's fused layout out), then the prefix cache is reset
  so no KV block computed by old weights is reused.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from dapo.config import Config
from dapo.rollout.base import Completion, SamplingParams

_MISSING = ("rollout.engine=vllm needs vLLM, which is not installed here: pip install vllm (Linux with an "
            "NVIDIA GPU), or use rollout.engine=hf")


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{_MISSING} ({e})") from None
    return vllm


class WeightLoader:
    """Worker extension (``LLM(worker_extension_cls=...)``): vLLM mixes it into each GPU worker, so
    ``collective_rpc("dapo_load_weights", ...)`` runs this inside every worker process."""

    def dapo_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        device = next(self.model_runner.model.parameters()).device  # type: ignore[attr-defined]
        self.model_runner.model.load_weights(weights=[(n, t.to(device)) for n, t in named])  # type: ignore[attr-defined]
        return len(named)


class VLLMEngine:
    """vLLM's ``LLM`` on the model at ``path`` (one GPU; ``rollout.gpu_memory_utilization`` of its memory)."""

    def __init__(self, path: str, pad_token_id: int, eos_token_ids: Sequence[int], cfg: Config):
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        self._vllm, self._tokens_prompt = vllm, TokensPrompt
        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.weight_version = 0
        self.llm = vllm.LLM(
            model=path, tokenizer=cfg.model.tokenizer or path, dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code, seed=cfg.seed,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, max_num_seqs=cfg.rollout.batch_size,
            enable_prefix_caching=True, logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.WeightLoader",
        )

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts"
        v = self._vllm
        stop = sorted(set(self.eos_token_ids) | set(params.stop_token_ids))
        sps = [v.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                                logprobs=0, seed=int(s) & 0x7FFFFFFF, stop_token_ids=stop, detokenize=False)
               for s in seeds]
        inputs = [self._tokens_prompt(prompt_token_ids=list(p)) for p in prompts]
        outs = self.llm.generate(inputs, sampling_params=sps, use_tqdm=False)
        comps = []
        for i, out in enumerate(outs):  # one RequestOutput per prompt, in order, with n samples each
            for o in out.outputs:
                ids = list(o.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(o.logprobs or [], ids)]
                reason = "stop" if o.finish_reason == "stop" else "length"
                comps.append(Completion(i, ids, lps, reason, self.weight_version))
        return comps

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.llm.collective_rpc("dapo_load_weights", args=(list(state_dict.items()),))
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)
