"""The model side of a run, for every process that holds one (the driver, Ray workers and ranks, ``dapo eval``):
loading a causal LM and its tokenizer, device and dtypes, the optimiser, and the frozen KL reference.

Mixed precision, as the large frameworks do it: the trained weights and AdamW's moments are float32
(``load_model`` always loads float32); forward and backward run under ``torch.autocast`` in the compute
dtype (``model.dtype``: bfloat16 on CUDA by default), which ``compute_dtype`` resolves and
``dapo.learner.policy`` applies; log-softmax, entropy and importance ratios stay float32. Training
bfloat16 weights directly loses every update smaller than half a bfloat16 step of the weight: at the
paper's lr of 1e-6 almost no weight moves (measured: 1.2% of the demo model's parameters changed in three
steps, against 100% in float32). float16 would need loss scaling and is refused.

LoRA (``model.lora_rank`` > 0, ``dapo.lora``): ``load_policy`` loads the frozen base in the compute dtype
(bfloat16 on CUDA: half the memory of float32, and no update is lost because the base never changes) and
injects float32 adapters, the only trainable parameters, so ``make_optimizer``'s float32 rule holds and
AdamW's moments exist for the adapters only. The KL reference is the same model with its adapters off
(``reference_policy``). A LoRA checkpoint (``adapter_config.json``) names its base; ``load_model`` reads
one as the policy it is (base + adapter, merged), ``load_policy`` keeps the adapter trainable (a resume).
"""
from __future__ import annotations

import copy
import json
import pickle
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from dapo import lora


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


def _load_error(path: str, e: Exception, allow_unsafe: bool, key: str = "model.path") -> SetupError:
    local = _not_a_model_dir(path)
    if local:
        return SetupError(f"cannot load {key}={path!r}: {local}")
    hint = ""
    if "safetensors" in str(e).lower() and not allow_unsafe:
        hint = " (only safetensors weights load by default; model.allow_unsafe_weights=true allows pickle files)"
    return SetupError(f"cannot load {key}={path!r}: {e}{hint}")


def _not_a_model_dir(path: str) -> str:
    """Why a local ``path`` that failed to load is not a model directory ("" when it is not local, or looks like
    one): transformers' own message for these is about hub repo ids."""
    p = Path(path).expanduser()
    if not p.exists():
        if path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
            near = p.parent if p.parent.is_dir() else None
            return "no such directory" + (f" (in {near}: {', '.join(sorted(x.name for x in near.iterdir())[:8])})"
                                          if near is not None else "")
        return ""  # a hub id: transformers' message stands
    if not p.is_dir():
        return "a file, not a model directory (one holding config.json, the weights and the tokenizer's files)"
    from dapo.trainer.checkpoint import list_checkpoints  # here: the trainer imports this module

    steps = list_checkpoints(p)
    if (p / "config.yaml").is_file() or steps:
        latest = f": pass one of its checkpoints, e.g. {steps[-1][1]} (the latest)" if steps else " with no checkpoint yet"
        return f"a run directory, not a model{latest}"
    if not any((p / f).is_file() for f in ("config.json", "adapter_config.json", "tokenizer.json",
                                           "tokenizer_config.json")):  # else transformers' own error says more
        return ("no config.json in it: not a Hugging Face model directory (save_pretrained writes config.json, the "
                "weights and the tokenizer's files)")
    return ""


def _load_hf(mcfg: Any, path: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=mcfg.trust_remote_code,
            use_safetensors=None if mcfg.allow_unsafe_weights else True,
            attn_implementation=mcfg.attn_implementation,
        )
    except (OSError, ValueError, ImportError, pickle.UnpicklingError) as e:  # the last: weights_only refused a pickle
        raise _load_error(path, e, mcfg.allow_unsafe_weights) from None


def adapter_base(path: str) -> str:
    """The base model a LoRA checkpoint at ``path`` was trained on (its ``base_model_name_or_path``), checked: it is
    there, and (when the checkpoint recorded one) its weights are the ones the adapter was trained on."""
    base = lora.lora_base_path(path)
    where = f"{Path(path) / lora.ADAPTER_CONFIG} (base_model_name_or_path)"
    if base is None:
        raise SetupError(f"{path} is a LoRA adapter whose {where} names no base model")
    if (base.startswith(("/", ".", "~")) or Path(base).exists()) and not Path(base).expanduser().is_dir():
        raise SetupError(f"{path} is a LoRA adapter on the base model {base}, which is not there any more ({where}); "
                         f"put the base back, resume its run with model.path=WHERE_IT_IS_NOW, or merge the adapter on "
                         f"it where it is: dapo export {path} --merge OUT --base BASE_DIR")
    if not same_base(path, base):
        raise SetupError(f"{path} is a LoRA adapter trained on the base model {base}, whose weights have changed since "
                         f"(they differ from the fingerprint in {Path(path) / lora.BASE_FINGERPRINT}: the base was "
                         f"overwritten or replaced); the adapter means nothing on other weights: put the original "
                         f"base back, or name a copy of it (model.path=COPY on a resume, --base COPY for dapo export)")
    return base


def same_base(ckpt: str | Path, base: str) -> bool:
    """Whether ``base`` holds the weights LoRA checkpoint ``ckpt`` was trained on, as far as its recorded fingerprint
    tells (True when it recorded none, or ``base`` is not a local directory)."""
    want = lora.recorded_fingerprint(ckpt)
    have = lora.base_fingerprint(base) if want else None
    return want is None or have is None or have == want


def load_model(mcfg: Any, path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM at ``path`` on ``device``, its weights in ``dtype`` (float32, the master weights of
    training, unless a sampler asks for its own copy in the compute dtype). ``mcfg``: the model section.

    A LoRA checkpoint at ``path`` (``adapter_config.json``) is the policy it stands for: its base (from
    ``base_model_name_or_path``) with the adapter merged in, a plain model. ``load_policy`` is the loader
    that applies ``model.lora_*``."""
    if lora.is_lora_checkpoint(path):
        model = lora.merge_adapter(_load_hf(mcfg, adapter_base(path), dtype), path)
    else:
        model = _load_hf(mcfg, path, dtype)
    if mcfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model.to(device)


def load_policy(mcfg: Any, path: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model a trainer trains and a sampler samples with. ``model.lora_rank`` = 0: ``load_model`` in
    ``dtype`` (None: float32, the master weights). Under LoRA: the frozen base in ``dtype`` (None: the
    compute dtype) with float32 adapters of ``model.lora_*``, fresh ones (B = 0: the base's policy) or, when
    ``path`` is a LoRA checkpoint (a resume), the checkpoint's, on the base it names."""
    if not mcfg.lora_rank:
        return load_model(mcfg, path, device, dtype or torch.float32)
    dtype = dtype or compute_dtype(mcfg.dtype, device)
    adapter = lora.is_lora_checkpoint(path)
    base = adapter_base(path) if adapter else path
    if Path(base).is_dir():  # the checkpoints name their base: an absolute path survives a change of directory
        base = str(Path(base).resolve())
    model = _load_hf(mcfg, base, dtype)
    try:
        lora.apply_lora(model, mcfg.lora_rank, mcfg.lora_alpha, mcfg.lora_dropout, mcfg.lora_targets or None)
    except ValueError as e:
        raise SetupError(f"model.lora_targets={','.join(mcfg.lora_targets)}: {e}") from None
    except ImportError as e:
        raise SetupError(f"model.lora_rank={mcfg.lora_rank}: {e}") from None
    if adapter:
        try:
            lora.load_lora_checkpoint(model, path)
        except ValueError as e:
            raise SetupError(f"model.lora_rank / lora_alpha / lora_targets must match the adapter being continued: "
                             f"{e}") from None
    if mcfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model.to(device)


def tied_copies(model: torch.nn.Module) -> set[str]:
    """State-dict keys that are tied to another parameter (``lm_head.weight`` of a model with tied
    embeddings): a state dict gathered by name holds them twice, and a saved file needs them once."""
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5: only what the config ties
    if tied is None:  # 4.x: the class's candidates, tied when the config says so
        if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            return set()
        tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing, by the name transformers >= 5.20 uses (the old one warns there) or the old one."""
    on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    on()


def save_model(model: torch.nn.Module, path: str | Path) -> None:
    """A checkpoint's model files: the adapter only under LoRA (``dapo.lora.save_lora_checkpoint``, naming the
    base the model was loaded from), else the whole model in Hugging Face format."""
    if lora.has_lora(model):
        lora.save_lora_checkpoint(model, path)
    else:
        model.save_pretrained(path, safe_serialization=True)


def weights_to_sync(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a weight push sends to the rollout engine: the adapter tensors under LoRA (megabytes; the base
    never changes), else the whole state dict. Detached views of the live tensors."""
    return lora.adapter_state_dict(model) if lora.has_lora(model) else model.state_dict()


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

    if not mcfg.tokenizer and lora.is_lora_checkpoint(path) and not (Path(path) / "tokenizer_config.json").is_file():
        path = adapter_base(path)  # an adapter saved without its tokenizer (peft's own save_pretrained)
    where = mcfg.tokenizer or path
    plain = _declared_tokenizer_class(where) in ("TokenizersBackend", "PreTrainedTokenizerFast")
    try:
        if plain:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(where)
        else:
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(where, e, mcfg.allow_unsafe_weights, "model.tokenizer" if mcfg.tokenizer else "model.path") from None
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

    if lora.is_lora_checkpoint(path):
        path = adapter_base(path)
    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(path))
    except (OSError, ValueError):
        return SimpleNamespace(generation_config=None)


def model_context(path: str) -> tuple[int, bool] | None:
    """(positions, hard) from the model's config.json without loading weights: the context it was built for, and
    whether that is a hard limit (learned position embeddings: GPT-2's ``n_positions``, OPT's
    ``max_position_embeddings``; a longer sequence indexes past the table) rather than rotary or ALiBi positions
    (which run past it, extrapolating). None when the config names no context length or cannot be read."""
    from transformers import AutoConfig

    if lora.is_lora_checkpoint(path):
        path = adapter_base(path)
    try:
        c = AutoConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError):
        return None
    c = {**c.get("text_config", {}), **c}
    n = next((c[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if isinstance(c.get(k), int)), None)
    if not n or n <= 0:
        return None
    relative = any(s in k for k in c for s in ("rope", "rotary", "alibi")) or c.get("position_embedding_type") in (
        "rotary", "alibi", "relative_key", "relative_key_query")
    return n, not relative


def new_tokens(cfg: Any) -> tuple[int, str]:
    """The most tokens a rollout adds to its prompt, and the key that says so: with an environment its
    ``rollout.max_total_tokens`` when set (observations included), else ``rollout.max_new_tokens``."""
    r = cfg.rollout
    if (cfg.env.path or cfg.env.tools) and r.max_total_tokens > 0:
        return r.max_total_tokens, f"rollout.max_total_tokens ({r.max_total_tokens})"
    return r.max_new_tokens, f"rollout.max_new_tokens ({r.max_new_tokens})"


def check_context(path: str, prompt_lengths: list[int], new_tokens: int, what: str, log=print,
                  first_turn: int | None = None) -> None:
    """Refuse a run whose longest prompt plus ``new_tokens`` (``what`` names the key and its value, as
    ``rollout.max_new_tokens (64)``) does not fit a model with learned positions (it would fail with an index error
    mid-step), naming the settings that fit; say so, and go on, for rotary positions. ``first_turn``: where
    ``new_tokens`` is an environment's ``rollout.max_total_tokens``, the first turn's ``rollout.max_new_tokens``
    (if the prompts fit with it, ``rollout.max_total_tokens=0`` ends each trajectory at the table)."""
    ctx = model_context(path)
    longest = max(prompt_lengths, default=0)
    if ctx is None or longest + new_tokens <= ctx[0]:
        return
    n, hard = ctx
    need = f"the longest prompt ({longest} tokens) + {what} = {longest + new_tokens}"
    if not hard:
        log(f"warning: {need} positions, past the {n} the model was built for (config.json "
            f"max_position_embeddings); its rotary positions run on, but it has not been trained that far")
        return
    key, fixes = what.split(" (")[0], []
    if n - longest >= 1:
        fixes.append(f"lower {key} to {n - longest}")
    if first_turn is not None and longest + first_turn <= n:
        fixes.append("set rollout.max_total_tokens=0 (each trajectory then ends at the model's positions)")
    cap, total = n - new_tokens, len(prompt_lengths)
    kept = sum(x <= cap for x in prompt_lengths)
    if cap >= 1 and kept:
        fixes.append(f"set data.max_prompt_len={cap} ({kept} of the {total} prompts fit; the longer are dropped or "
                     f"truncated, data.long_prompts)")
    short = [x for x in prompt_lengths if x < n]
    if not fixes and short:  # neither key alone: shorter prompts and fewer new tokens together
        s_len = max((x for x in short if x <= n // 2), default=min(short))
        fixes.append(f"set data.max_prompt_len={s_len} and {key}={n - s_len} "
                     f"({sum(x <= s_len for x in prompt_lengths)} of the {total} prompts fit)")
    if not fixes:
        fixes.append(f"use prompts of fewer than {n} tokens")
    raise SetupError(f"{path}: {need} positions, but the model has learned position embeddings for {n} (its "
                     f"config.json): " + ", or ".join(fixes))


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
                    device: torch.device) -> torch.nn.Module | None:
    """The frozen KL reference: a copy of ``model`` (loaded from ``path``) when ``ref_path`` is that same
    model or None, else the run's initial model loaded from ``ref_path`` (a resumed run). Under LoRA: None,
    no copy at all: the reference is ``model`` with its adapters switched off (``reference_policy``)."""
    if lora.has_lora(model):
        if ref_path is not None and lora.is_lora_checkpoint(ref_path):
            raise SetupError(f"algo.kl_coef > 0 with model.lora_rank: the KL reference is the base with the adapters "
                             f"switched off, but model.path={ref_path} is itself an adapter, so that base is not the "
                             f"run's initial policy. Merge it first (dapo export {ref_path} --merge OUT) and start "
                             f"from OUT")
        return None
    if ref_path is None or ref_path == path:
        ref = copy.deepcopy(model)
    else:
        try:
            ref = load_model(mcfg, ref_path, device)
        except SetupError as e:
            raise SetupError(f"algo.kl_coef > 0: the KL reference is the run's initial model, which did not load: {e}") from None
    return ref.eval().requires_grad_(False)


@contextmanager
def reference_policy(model: torch.nn.Module, ref_model: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The model to compute reference log-probs with: ``ref_model``, or when there is none (LoRA) ``model``
    itself with its adapters switched off for the duration (the frozen base)."""
    if ref_model is not None:
        yield ref_model
    else:
        with lora.adapters_disabled(model) as base:
            yield base
