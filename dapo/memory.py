"""The device memory a run will need, estimated from the model's config before anything is allocated.

A colocated run that cannot fit fails late and far from its cause: vLLM's start-up check passes, and the
trainer's gradients and AdamW moments (allocated at the first optimiser step) or vLLM's next wake-up run the
GPU out of memory minutes later. ``check_memory`` refuses such a layout at build time, with the numbers and the
keys that lower them. What it counts, per device:

* trained parameters: float32 weights, gradients and AdamW's two moments, 16 bytes each (mixed precision keeps
  all four in float32); under LoRA the frozen base costs its compute-dtype weights only, and the adapters
  (r x (in + out) per adapted ``nn.Linear``) the 16 bytes; under FSDP all of it is divided by the ranks;
* a KL reference (``algo.kl_coef`` > 0, full fine-tuning): a float32 copy; an in-process HF sampler with
  weights of its own (``rollout.dtype`` not auto): a copy in its dtype; under LoRA the in-process HF sampler's
  merged copy of the adapted layers (``rollout.lora_merge``), in the base's dtype;
* a colocated vLLM: ``rollout.gpu_memory_utilization`` of the device (its weights and KV cache);
* activations of one micro-batch: tokens x hidden x layers x ``ACT_BYTES`` (``ACT_BYTES_CHECKPOINTED`` with
  ``model.gradient_checkpointing``), plus the float32 LM head's logits, log-softmax and their gradient for the
  response tokens (tokens x vocabulary x 12 bytes).

An estimate, not an allocator trace: the CUDA context, the caching allocator's fragmentation and the HF
sampler's KV cache are not in it, so a run it lets through can still be tight; one it refuses would not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dapo.config import Config, ConfigError, token_budget

ACT_BYTES = 34
"""Bytes a transformer layer keeps for backward per token and unit of hidden size with 16-bit activations and a
fused attention kernel (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
Eq. 1 without its 5as/h attention-score term, which sdpa/flash attention do not store)."""
ACT_BYTES_CHECKPOINTED = 2
"""With activation checkpointing a layer keeps only its 16-bit input; the one layer recomputed at a time adds
``ACT_BYTES`` for a single layer."""
HEAD_BYTES = 12
"""Per response token and vocabulary entry: float32 logits, log-softmax and the gradient of one of them."""
GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config (no weights)."""

    params: int
    """Parameters, tied ones once."""
    hidden: int
    layers: int
    vocab: int
    lora_params: int = 0
    """Adapter parameters at the run's ``model.lora_rank`` and targets (0 = full fine-tuning)."""
    adapted_params: int = 0
    """Weights of the adapted ``Linear`` layers (what a merged LoRA sampler holds a copy of)."""


def model_shape(config: Any, lora_rank: int = 0, lora_targets: tuple[str, ...] = ()) -> ModelShape:
    """The shape of the causal LM a transformers ``config`` describes, counted on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    from dapo.lora import adapted_linears

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    lora = adapted = 0
    if lora_rank:
        linears = adapted_linears(model, lora_targets or None)
        lora = sum(lora_rank * (m.in_features + m.out_features) for m in linears)
        adapted = sum(m.weight.numel() for m in linears)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(params, text.hidden_size, text.num_hidden_layers, text.vocab_size, lora, adapted)


def memory_budget(cfg: Config, shape: ModelShape, device_bytes: float, ranks: int = 1) -> dict[str, float]:
    """Bytes each part of the run takes on one device (see the module docstring). ``ranks``: the FSDP world
    sharding the trained state (1 = unsharded)."""
    from dapo.model import compute_dtype, sampler_dtype

    m, r = cfg.model, cfg.rollout
    cuda = torch.device("cuda")  # the budget is a GPU's
    low = compute_dtype(m.dtype, cuda).itemsize  # the compute dtype's bytes
    out: dict[str, float] = {}
    if m.lora_rank:
        out["frozen base"] = shape.params * low / ranks
        out["weights + gradients + AdamW"] = 16 * shape.lora_params / ranks
    else:
        out["weights + gradients + AdamW"] = 16 * shape.params / ranks
        if cfg.algo.kl_coef > 0:
            out["KL reference"] = 4 * shape.params
    local_rollout = not cfg.dist.rollout_workers and cfg.dist.trainer_ranks == 1
    colocated_vllm = r.engine == "vllm" and (local_rollout or cfg.dist.colocate)
    if colocated_vllm:
        from dapo.rollout.vllm import gpu_memory_fraction

        out["vLLM"] = gpu_memory_fraction(cfg, shares_gpu=True) * device_bytes
    elif local_rollout and r.dtype != "auto":
        out["sampler copy"] = shape.params * sampler_dtype(cfg, cuda).itemsize
    if m.lora_rank and r.lora_merge and r.engine == "hf" and local_rollout:
        out["merged LoRA layers"] = shape.adapted_params * sampler_dtype(cfg, cuda).itemsize
    seq, tokens = _micro_tokens(cfg)
    resp = tokens * r.max_new_tokens / seq  # the responses' share of them (packed or padded alike)
    per = ACT_BYTES_CHECKPOINTED * shape.layers + ACT_BYTES if m.gradient_checkpointing else ACT_BYTES * shape.layers
    out["activations"] = tokens * shape.hidden * per + resp * shape.vocab * HEAD_BYTES
    return out


def _micro_tokens(cfg: Config) -> tuple[int, int]:
    """(the longest sequence, the tokens a micro-batch holds at most): the packed budget, or padded rows x it."""
    seq = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    return seq, token_budget(cfg) or cfg.optim.micro_batch_size * seq


def check_memory(cfg: Config, shape: ModelShape, device_bytes: float, where: str = "the GPU", ranks: int = 1) -> None:
    """Raise ``ConfigError`` with the numbers and the keys to lower when the run cannot fit in ``device_bytes``."""
    parts = memory_budget(cfg, shape, device_bytes, ranks)
    need = sum(parts.values())
    if need <= device_bytes:
        return
    _, tokens = _micro_tokens(cfg)
    detail = ", ".join(f"{k} {v / GB:.1f}" for k, v in parts.items())
    raise ConfigError(
        f"the run needs about {need / GB:.1f} GB on {where}, which has {device_bytes / GB:.1f} GB ({detail} GB; "
        f"{shape.params / 1e9:.2f}B parameters, micro-batches of {tokens} tokens). Lower "
        f"rollout.gpu_memory_utilization (now {cfg.rollout.gpu_memory_utilization or 'unset: 0.5'}), train adapters "
        f"(model.lora_rank, now {cfg.model.lora_rank}), use a smaller micro-batch (optim.micro_batch_size, now "
        f"{cfg.optim.micro_batch_size}, or optim.micro_batch_tokens) or model.gradient_checkpointing=true, or shard "
        f"over trainer ranks (dist.trainer_ranks, dist.fsdp)")


def check_device_memory(cfg: Config, path: str, device: torch.device, ranks: int = 1,
                        total: float | None = None) -> None:
    """``check_memory`` for the model at ``path`` on ``device`` (CUDA only: a CPU run swaps or fails at once);
    ``total``: the device's bytes, read from the device when None."""
    if device.type != "cuda":
        return
    from transformers import AutoConfig

    from dapo import lora
    from dapo.model import adapter_base

    base = adapter_base(path) if lora.is_lora_checkpoint(path) else path
    config = AutoConfig.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    if total is None:
        total = torch.cuda.get_device_properties(device).total_memory
    check_memory(cfg, model_shape(config, cfg.model.lora_rank, cfg.model.lora_targets), total, str(device), ranks)
