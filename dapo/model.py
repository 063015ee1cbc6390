"""The model side of a run, for every process that holds one (the driver, Ray workers and ranks, ``dapo eval``):
loading a causal LM and its tokenizer, device and dtypes, the optimiser, and the frozen KL reference.

Mixed precision, as the large frameworks do it: the trained weights and AdamW's moments are float32
(``load_model`` always loads float32); forward and backward run under ``torch.autocast`` in the compute
dtype (``model.dtype``: bfloat16 on CUDA by default), which ``compute_dtype`` resolves and
``dapo.trainer.policy`` applies; log-softmax, entropy and importance ratios stay float32. Training
bfloat16 weights directly loses every update smaller than half a bfloat16 step of the weight: at the
paper's lr of 1e-6 almost no weight moves (measured: 1.2% of the demo model's parameters changed in three
steps, against 100% in float32). float16 would need loss scaling and is refused.
"""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


class SetupError(ValueError):
    """A run cannot be built as configured; the message names the key or file."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"model.device={name}: CUDA is not available on this machine")
    return dev


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype forward and backward passes compute in (``model.dtype``); weights stay float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "float16":
        raise SetupError("model.dtype=float16 needs loss scaling, which dapo does not do: use bfloat16 or float32")
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise SetupError(f"model.dtype={name!r}: use auto, float32 or bfloat16") from None


def sampler_dtype(cfg: Any, device: torch.device) -> torch.dtype:
    """The dtype of a sampler's own copy of the weights: ``rollout.dtype``, or the compute dtype for auto."""
    if cfg.rollout.dtype == "auto":
        return compute_dtype(cfg.model.dtype, device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.rollout.dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """The autocast context of a forward pass in ``dtype`` (a no-op context for float32)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def _load_error(path: str, e: Exception, allow_unsafe: bool) -> SetupError:
    hint = ""
    if "safetensors" in str(e).lower() and not allow_unsafe:
        hint = " (only safetensors weights load by default; model.allow_unsafe_weights=true allows pickle files)"
    return SetupError(f"cannot load model.path={path!r}: {e}{hint}")


def load_model(mcfg: Any, path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM at ``path`` on ``device``, its weights in ``dtype`` (float32, the master weights of
    training, unless a sampler asks for its own copy in the compute dtype). ``mcfg``: the model section."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=mcfg.trust_remote_code,
            use_safetensors=None if mcfg.allow_unsafe_weights else True,
            attn_implementation=mcfg.attn_implementation,
        )
    except (OSError, ValueError, ImportError, pickle.UnpicklingError) as e:  # the last: weights_only refused a pickle
        raise _load_error(path, e, mcfg.allow_unsafe_weights) from None
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device)


def _declared_tokenizer_class(path: str) -> str | None:
    try:
        with open(Path(path) / "tokenizer_config.json", encoding="utf-8") as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_tokenizer(mcfg: Any, path: str) -> Any:
    """The tokenizer at ``model.tokenizer`` (or ``path``), padding on the left, pad = eos if it has none.

    A tokenizer saved as a plain ``tokenizer.json`` (``tokenizer_class`` TokenizersBackend or
    PreTrainedTokenizerFast: the ones dapo builds) loads exactly as saved. ``AutoTokenizer`` would hand a
    qwen2 model directory to ``Qwen2Tokenizer``, which replaces the saved pre-tokenizer with Qwen's own:
    a character vocabulary then loses every space and newline when encoding."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    where = mcfg.tokenizer or path
    plain = _declared_tokenizer_class(where) in ("TokenizersBackend", "PreTrainedTokenizerFast")
    try:
        if plain:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(where)
        else:
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(mcfg.tokenizer or path, e, mcfg.allow_unsafe_weights) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a response: the tokenizer's eos and the model's generation_config's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(x) for x in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise SetupError("the tokenizer has no eos_token and the model's generation_config names none")
    return sorted(ids)


def generation_config_of(path: str) -> Any:
    """Something with the model's ``generation_config`` (for ``eos_ids``), without loading its weights."""
    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))
    except (OSError, ValueError):
        return SimpleNamespace(generation_config=None)


def make_optimizer(ocfg: Any, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and its linear warm-up schedule (per optimiser step), the same on
    every trainer rank. ``ocfg``: the optim section. The state is allocated like the parameters: float32."""
    params = [p for p in model.parameters() if p.requires_grad]
    low = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if low:  # AdamW's moments would be in that dtype too, and small updates would round away
        raise SetupError(f"trainable parameters in {', '.join(low)}: the optimiser needs float32 master weights "
                         f"(load with dapo.model.load_model; model.dtype sets the compute dtype)")
    # the fused kernel (as HF Trainer's default adamw_torch_fused): 3-4x faster steps than the per-tensor
    # loop on CPU. Plain float tensors on CPU/CUDA only: FSDP2's sharded DTensors keep the default.
    fused = all(p.device.type in ("cpu", "cuda") and not hasattr(p, "full_tensor") for p in params)
    optimizer = torch.optim.AdamW(params, lr=ocfg.lr, betas=ocfg.betas, weight_decay=ocfg.weight_decay,
                                  fused=fused or None)
    warm = ocfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warm) if warm else 1.0)
    return optimizer, scheduler


def reference_model(mcfg: Any, model: torch.nn.Module, path: str, ref_path: str | None,
                    device: torch.device) -> torch.nn.Module:
    """The frozen KL reference: a copy of ``model`` (loaded from ``path``) when ``ref_path`` is that same
    model or None, else the run's initial model loaded from ``ref_path`` (a resumed run)."""
    if ref_path is None or ref_path == path:
        ref = copy.deepcopy(model)
    else:
        try:
            ref = load_model(mcfg, ref_path, device)
        except SetupError as e:
            raise SetupError(f"algo.kl_coef > 0: the KL reference is the run's initial model, which did not load: {e}") from None
    return ref.eval().requires_grad_(False)
