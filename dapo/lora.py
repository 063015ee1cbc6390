"""LoRA adapters on a Hugging Face causal LM: RL where only low-rank adapters train, sync and ship.

The adapters are injected *in place* (peft's ``inject_adapter_in_model``): the object the trainer holds
stays the ``transformers`` model, so ``model.base_model`` is still the decoder stack and
``model.get_output_embeddings()`` still the LM head, and ``response_logprobs`` and ``HFEngine`` run on it
unchanged; the LoRA layers sit inside the decoder stack. A ``PeftModel`` wrapper is deliberately not
used: on it ``.base_model`` is peft's ``LoraModel``, not the decoder stack.

* Only adapter parameters require grad, and they are float32 whatever the base dtype: the trainable
  weights and their AdamW state keep full precision while the frozen base runs in the compute dtype
  (bf16 weights with bf16 AdamW lose updates smaller than half a bf16 step).
* The KL reference is the same model with its adapters switched off (``adapters_disabled``): no second
  copy of the base.
* Weight sync sends only adapter tensors (``adapter_state_dict`` / ``load_adapter_state``); the trained
  model is never merged.
* Sampling decodes with merged weights (``MergedSampler``): a plain copy of the model for the HF engine
  that shares every tensor with it except the adapted layers' weights, its own W + (alpha/r) B A in the
  base's dtype, recomputed from the adapters at each weight push. Unmerged, each adapted layer runs two
  more (thin) matmuls per decoded token and generation took ~2.5x the full model's at the 1M/25M shapes.
* A checkpoint holds peft's layout, ``adapter_model.safetensors`` + ``adapter_config.json`` (with the
  base model's path in ``base_model_name_or_path``), so ``peft.PeftModel.from_pretrained`` loads it too;
  ``merge_to_hf`` writes a plain model that needs no peft (``merge_adapter`` merges in memory);
  ``save_adapter_state`` writes pushed adapter tensors in that layout without their model (vLLM's LoRA requests).
  Beside it, ``base_fingerprint.json`` records a digest of the local base's weight files (``base_fingerprint``):
  an adapter is only meaningful on the weights it was trained on, and a base directory overwritten (a new
  ``dapo sft --force``) or replaced would otherwise be used without a word (``dapo.model.adapter_base`` checks it).

Wiring (``dapo.model``): ``load_policy`` applies ``model.lora_*`` or continues a checkpoint's adapter,
``save_model`` / ``weights_to_sync`` pick the adapter under LoRA, ``reference_policy`` is ``adapters_disabled``.

Why a merged copy of the adapted layers, and not the alternatives:

* merging in place before each generate and unmerging after (peft's ``merge_adapter`` / ``unmerge_adapter``)
  costs no memory, but W + d - d is not W in floating point: measured on the tests' tiny Qwen2 (rank 16, new
  random adapters per cycle), one cycle leaves 15% of the adapted weights not bit-identical, in float32 and in
  bf16 alike; after 100 cycles 74%, a median relative drift of 1e-7 (float32) and 0.7% (bf16) in the worst
  layer. The frozen base would random-walk away from the one a resume loads from disk (resume no longer exact),
  and in bf16 away from the model itself; an exact restore would need the copy anyway;
* a second copy of the whole model also duplicates the embeddings and LM head (most of a small model), which
  the merged layers' model shares by reference instead.

The cost is one copy of the adapted ``Linear`` weights in the base's dtype (bf16 on GPU: 2 bytes a weight;
~13 of 15 GB for Qwen2.5-7B with every projection adapted). ``rollout.lora_merge=false`` samples through the
adapters instead, for a run that has no room for it.

Sizes: an adapted ``Linear(d_in, d_out)`` adds ``rank * (d_in + d_out)`` parameters, kept in float32
(4 bytes each). On every attention and MLP projection at rank 16, Qwen2.5-1.5B (28 layers, hidden 1536,
MLP 8960, 2 KV heads of 128) gets 18.5M adapter parameters, a 74 MB checkpoint against 3.1 GB for the
bf16 model; Qwen2.5-7B (hidden 3584, MLP 18944, 4 KV heads) gets 40.4M, 161 MB against 15.2 GB.
``lora_param_count`` gives the exact number for a model.
"""
from __future__ import annotations

import copy
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file

ADAPTER = "default"
"""peft's name for the one adapter a model carries here (it appears in parameter names, not in files)."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_FINGERPRINT = "base_fingerprint.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WHOLE_FILE = 64 << 20  # hashed whole up to this size; a larger file by its head, tail and 64 spread blocks
_HEAD, _BLOCK = 1 << 20, 1 << 16
_fingerprints: dict[tuple, str] = {}  # (path, each weight file's name, size, mtime): the digest, read once
_FILE_PREFIX = "base_model.model."  # peft's files name tensors as seen from a PeftModel wrapper
_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "spiece.model", "sentencepiece.bpe.model")
"""Tokenizer files besides ``tokenizer*`` and ``chat_template*`` (the slow tokenizers' vocabularies)."""


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs the peft package: pip install 'dapo[lora]'") from e
    return peft


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` already carries peft adapter layers (or is a ``PeftModel``)."""
    if type(model).__name__.startswith("PeftModel") or hasattr(model, "peft_config"):
        return True
    try:
        return bool(_tuner_layers(model))
    except ImportError:
        return False


def decoder_linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` modules inside the decoder stack (``model.base_model``).

    The LM head lives outside the decoder stack in every ``*ForCausalLM``, and embeddings are not
    ``Linear``; the output embedding module is excluded by identity as well, for models whose head sits
    inside ``base_model``.
    """
    stack = model.base_model if hasattr(model, "base_model") else model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = {id(m) for m in stack.modules()}
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and id(m) in inside and m is not head]


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of names: the full name, or a dotted suffix of it
    return name == target or name.endswith("." + target)


def _suffixes(names: Sequence[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def _chosen(model: torch.nn.Module, targets: Sequence[str] | None) -> list[str]:
    """Full names of the ``nn.Linear`` modules ``targets`` picks (None: every one of the decoder stack)."""
    linear = decoder_linear_names(model)
    if not linear:
        raise ValueError(f"{type(model).__name__}: no nn.Linear layer found inside its decoder stack to adapt")
    if targets is None:
        return linear
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("apply_lora: targets is empty; pass None for every Linear layer of the decoder stack")
    missing = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if missing:
        raise ValueError(f"apply_lora: targets {missing} match no Linear layer of the decoder stack of "
                         f"{type(model).__name__}; its Linear layers are named: {', '.join(_suffixes(linear))}")
    return [n for n in linear if any(_matches(n, t) for t in targets)]


def adapted_linears(model: torch.nn.Module, targets: Sequence[str] | None) -> list[torch.nn.Linear]:
    """The ``nn.Linear`` modules ``apply_lora(model, targets=targets)`` would adapt (works on the meta device)."""
    modules = dict(model.named_modules())
    return [modules[n] for n in _chosen(model, targets)]


def _resolve_targets(model: torch.nn.Module, targets: Sequence[str] | None) -> list[str]:
    """The target list to hand peft: short suffixes (q_proj...) when they pick exactly the chosen modules
    and nothing else in the model, else the chosen modules' full names."""
    chosen = _chosen(model, targets)
    short = _suffixes(chosen)
    all_linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if sorted(n for n in all_linear if any(_matches(n, s) for s in short)) == sorted(chosen):
        return short
    return sorted(chosen)


def _inject(model: torch.nn.Module, config) -> torch.nn.Module:
    """Adapters of ``config`` into ``model`` in place, float32, the only parameters left trainable."""
    out = _peft().inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    assert out is model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    cast_adapter_dtype(model, ADAPTER)  # bf16/fp16 adapters -> fp32; the base keeps its dtype
    adapter_ids = {id(p) for _, _, p in _adapter_entries(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_ids)
    return model


def apply_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place and return it (the same object).

    ``targets``: module names or dotted suffixes of them (``q_proj``, ``mlp.down_proj``); None adapts every
    ``nn.Linear`` of the decoder stack (for Qwen2/Llama: q/k/v/o_proj, gate/up/down_proj), never the LM
    head or the embeddings. The scale is ``alpha / rank``. B starts at zero, so the adapted model equals
    the base until the first update. Afterwards only the adapter weights (float32) require grad.

    Cast the model to its compute dtype *before* this call: a later ``model.to(torch.bfloat16)`` casts
    the adapters too (moving it to a device is fine). And never ``model.save_pretrained`` the result: it
    would write ``...q_proj.base_layer.weight`` names that a plain load ignores; use
    ``save_lora_checkpoint`` or ``merge_to_hf``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"apply_lora: rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"apply_lora: alpha must be a number > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"apply_lora: dropout must be in [0, 1), got {dropout!r}")
    if has_lora(model):
        raise ValueError(f"apply_lora: {type(model).__name__} already has LoRA adapters: apply them once, to a "
                         "plain model (load_adapter_state / load_lora_checkpoint fill existing adapters)")
    config = _peft().LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                             target_modules=_resolve_targets(model, targets))
    return _inject(model, config)


def _adapter_entries(model: torch.nn.Module) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(name in ``model.state_dict()``, name in peft's adapter file, parameter) for every adapter tensor."""
    out = []
    for mod_name, layer in _tuner_layers(model):
        for layer_name in layer.adapter_layer_names:
            holder = getattr(layer, layer_name, None)
            if holder is None or ADAPTER not in holder:
                continue
            sub = holder[ADAPTER]
            params = [("", sub)] if isinstance(sub, torch.nn.Parameter) else list(sub.named_parameters())
            for p_name, p in params:
                tail = f".{p_name}" if p_name else ""
                out.append((f"{mod_name}.{layer_name}.{ADAPTER}{tail}",
                            f"{_FILE_PREFIX}{mod_name}.{layer_name}{tail}", p))
    return out


def _require_lora(model: torch.nn.Module, what: str) -> list[tuple[str, str, torch.nn.Parameter]]:
    entries = _adapter_entries(model) if has_lora(model) else []
    if not entries:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA adapters (apply_lora first)")
    return entries


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed as in ``model.state_dict()`` (megabytes, not the model).

    Like ``state_dict()``, the tensors are detached views of the live parameters: clone them to keep a
    snapshot. Because the keys are the model's own, ``HFEngine.load_weights`` would also accept this dict;
    ``load_adapter_state`` is the strict way in (every key, every shape checked).
    """
    return {k: p.detach() for k, _, p in _require_lora(model, "adapter_state_dict")}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (from ``adapter_state_dict`` of a model with the same adapter config) into
    ``model``'s adapters, in place; dtype and device follow ``model``. Keys and shapes must match exactly."""
    own = {k: p for k, _, p in _require_lora(model, "load_adapter_state")}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"load_adapter_state: adapter keys differ (different targets or rank?): "
                         f"{len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}")
    for k, p in own.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ValueError(f"load_adapter_state: {k} has shape {tuple(state[k].shape)}, the model's adapter "
                             f"{tuple(p.shape)} (a different rank?)")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def lora_param_count(model: torch.nn.Module) -> int:
    """Number of adapter parameters (``rank * (d_in + d_out)`` per adapted Linear); bytes on disk are 4x."""
    return sum(p.numel() for _, _, p in _require_lora(model, "lora_param_count"))


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, ``model`` computes as its base (the adapters are bypassed, not zeroed): the KL reference
    policy without a second copy of the weights. The adapters' ``requires_grad`` flags are restored on exit."""
    entries = _require_lora(model, "adapters_disabled")
    flags = [p.requires_grad for _, _, p in entries]
    layers = [m for _, m in _tuner_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for (_, _, p), flag in zip(entries, flags):
            p.requires_grad_(flag)


class MergedSampler:
    """A plain model (no peft layers) for sampling that computes what ``source`` (a LoRA model) computes in
    eval mode, without the adapters' extra matmuls: every adapted ``Linear`` is replaced by one whose weight
    is W + (alpha/r) B A, held in W's dtype (computed in float32, rounded once); every other tensor
    (embeddings, norms, LM head, biases) is ``source``'s own, shared, never written. ``refresh`` recomputes
    the merged weights from ``source``'s current adapters (after a weight push); adapters switched off in
    ``source`` (``adapters_disabled``) merge as zero. ``source``'s parameters are only read."""

    def __init__(self, source: torch.nn.Module):
        _require_lora(source, "MergedSampler")
        shared = {id(t): t for t in (*source.parameters(), *source.buffers())}
        net = copy.deepcopy(source, memo=shared)  # new modules, the same tensors
        self.pairs: list[tuple[torch.nn.Module, torch.nn.Linear]] = []
        """(adapted layer of ``source``, its merged ``Linear`` in ``model``)."""
        own = dict(source.named_modules())
        for name, layer in _tuner_layers(net):
            if layer.merged or not isinstance(layer.get_base_layer(), torch.nn.Linear):
                raise ValueError(f"MergedSampler: {name} is already merged or does not adapt an nn.Linear")
            linear = layer.get_base_layer()
            linear.weight = torch.nn.Parameter(torch.empty_like(linear.weight), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, linear)
            self.pairs.append((own[name], linear))
        if hasattr(net, "peft_config"):
            del net.peft_config
        self.model = net.eval()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Merged weights of ``source``'s adapters as they are now, one layer at a time (one layer of float32 scratch)."""
        for layer, linear in self.pairs:
            w = layer.get_base_layer().weight
            if layer.disable_adapters or ADAPTER not in layer.active_adapters:
                linear.weight.copy_(w)
                continue
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # (r, in), (out, r)
            merged = torch.addmm(w.to(torch.float32), b.to(torch.float32), a.to(torch.float32),
                                 alpha=float(layer.scaling[ADAPTER]))  # (out, in)
            linear.weight.copy_(merged)


def lora_config(model: torch.nn.Module):
    """The ``peft.LoraConfig`` of ``model``'s adapters."""
    _require_lora(model, "lora_config")
    return model.peft_config[ADAPTER]


def is_lora_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds an adapter (``adapter_config.json``) rather than a full model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_base_path(ckpt_dir: str | Path) -> str | None:
    """The base model recorded in a LoRA checkpoint (``base_model_name_or_path``), or None."""
    path = Path(ckpt_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a LoRA checkpoint (no {ADAPTER_CONFIG})")
    return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path") or None


def base_fingerprint(base: str | Path) -> str | None:
    """A digest of the weight files of the local model directory ``base`` (names, sizes and contents; a file over
    64 MiB by its first and last MiB and 64 blocks between), or None for a hub id or a directory without weights.
    Cheap enough to take at every checkpoint: read once per file state (size, mtime)."""
    import hashlib

    root = Path(base).expanduser()
    if not root.is_dir():
        return None
    files = sorted(f for f in root.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        return None
    key = (str(root.resolve()), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _fingerprints:
        h = hashlib.sha256()
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                if size <= _WHOLE_FILE:
                    h.update(fh.read())
                    continue
                spans = [(0, _HEAD), *((size * i // 65, _BLOCK) for i in range(1, 65)), (max(0, size - _HEAD), _HEAD)]
                for at, n in spans:
                    fh.seek(at)
                    h.update(fh.read(n))
        _fingerprints[key] = "sha256:" + h.hexdigest()
    return _fingerprints[key]


def recorded_fingerprint(ckpt_dir: str | Path) -> str | None:
    """The base's fingerprint a LoRA checkpoint recorded when it was written (None: none was, e.g. a hub base, an
    adapter from peft itself or from dapo before the record existed)."""
    path = Path(ckpt_dir) / BASE_FINGERPRINT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("weights") or None
    except (OSError, ValueError, AttributeError):
        return None


def _write_fingerprint(ckpt_dir: Path, base: str | None) -> None:
    fp = base_fingerprint(base) if base else None
    if fp is not None:
        (ckpt_dir / BASE_FINGERPRINT).write_text(json.dumps({"base_model_name_or_path": base, "weights": fp}, indent=1),
                                                 encoding="utf-8")


def save_lora_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path, base_model_path: str | None = None) -> Path:
    """Write ``model``'s adapter into ``ckpt_dir`` in peft's layout: ``adapter_model.safetensors`` (float32
    tensors) and ``adapter_config.json``, whose ``base_model_name_or_path`` is ``base_model_path`` or, if not
    given, the path the model was loaded from. The base weights are not written."""
    entries = _require_lora(model, "save_lora_checkpoint")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f: p.detach().to("cpu", copy=True).contiguous() for _, f, p in entries}
    save_file(tensors, str(ckpt_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(lora_config(model))
    config.base_model_name_or_path = base_model_path or getattr(model, "name_or_path", None) or None
    config.inference_mode = True  # as peft saves it: a loaded adapter is frozen unless asked otherwise
    config.save_pretrained(str(ckpt_dir))
    _write_fingerprint(ckpt_dir, config.base_model_name_or_path)
    return ckpt_dir


def save_adapter_state(state: dict[str, torch.Tensor], ckpt_dir: str | Path, rank: int, alpha: float,
                       base_model_path: str | None = None) -> Path:
    """Write adapter tensors keyed as ``adapter_state_dict`` gives them (e.g. a weight push, without the model
    they came from) in peft's layout, for a reader of adapter files (vLLM's LoRA requests). The targets in
    ``adapter_config.json`` are the adapted modules' short names; the tensors say which layers have them."""
    infix = f".{ADAPTER}"
    tensors, modules = {}, set()
    for key, t in state.items():
        parts = key.split(".")
        if ADAPTER not in parts or not any(p.startswith("lora_") for p in parts):
            raise ValueError(f"save_adapter_state: {key!r} is not an adapter tensor name (from adapter_state_dict)")
        i = parts.index(ADAPTER)
        modules.add(parts[i - 2])  # ...q_proj.lora_A.default.weight: the adapted module's own name
        tensors[_FILE_PREFIX + key.replace(infix, "", 1)] = t.detach().to("cpu", torch.float32, copy=True).contiguous()
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ckpt_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = _peft().LoraConfig(r=rank, lora_alpha=alpha, bias="none", task_type="CAUSAL_LM",
                                target_modules=sorted(modules), base_model_name_or_path=base_model_path,
                                inference_mode=True)
    config.save_pretrained(str(ckpt_dir))
    return ckpt_dir


def _read_adapter(ckpt_dir: Path):
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (ckpt_dir / name).is_file():
            raise FileNotFoundError(f"{ckpt_dir / name}: missing; a LoRA checkpoint holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = _peft().LoraConfig.from_pretrained(str(ckpt_dir))
    config.inference_mode = False
    return config, load_file(str(ckpt_dir / ADAPTER_WEIGHTS))


def _same_adapter(a, b) -> bool:
    def key(c):
        t = c.target_modules
        return c.r, float(c.lora_alpha), sorted(t) if isinstance(t, (list, set, tuple)) else t
    return key(a) == key(b)


def load_lora_checkpoint(base_model: torch.nn.Module, ckpt_dir: str | Path) -> torch.nn.Module:
    """Put the adapter saved in ``ckpt_dir`` into ``base_model`` (in place; returned) with its exact weights.

    A plain model gets adapters of the saved config first; a model that already has adapters (a resumed
    run that called ``apply_lora`` from its config) must have the same rank, alpha and targets.
    """
    ckpt_dir = Path(ckpt_dir)
    config, tensors = _read_adapter(ckpt_dir)
    if has_lora(base_model):
        own = lora_config(base_model)
        if not _same_adapter(own, config):
            raise ValueError(f"{ckpt_dir}: adapter r={config.r} alpha={config.lora_alpha} targets="
                             f"{sorted(config.target_modules)} differs from the model's r={own.r} "
                             f"alpha={own.lora_alpha} targets={sorted(own.target_modules)}")
    else:
        _inject(base_model, config)
    by_file = {f: k for k, f, _ in _adapter_entries(base_model)}
    unknown = sorted(set(tensors) - set(by_file))
    if unknown:
        raise ValueError(f"{ckpt_dir / ADAPTER_WEIGHTS}: tensors {unknown[:3]} match no adapter of the model "
                         f"({len(unknown)} in all; is this the adapter of another base model?)")
    load_adapter_state(base_model, {by_file[f]: t for f, t in tensors.items()})
    return base_model


def _copy_tokenizer(sources: list[Path], out_dir: Path) -> None:
    """The first source's tokenizer files, copied byte for byte: a load and re-save through ``AutoTokenizer``
    can change the tokenizer (a qwen2 model directory gets ``Qwen2Tokenizer``, whose pre-tokenizer replaces a
    saved character vocabulary's)."""
    import shutil

    for src in sources:
        if (src / "tokenizer_config.json").is_file() or (src / "tokenizer.json").is_file():
            for f in src.iterdir():
                if f.is_file() and (f.name in _TOKENIZER_FILES or f.name.startswith(("tokenizer", "chat_template"))):
                    shutil.copy2(f, out_dir / f.name)
            return


def merge_adapter(base_model: torch.nn.Module, ckpt_dir: str | Path) -> torch.nn.Module:
    """``base_model`` (plain, no adapters) with the adapter saved in ``ckpt_dir`` merged into its weights
    (W + alpha/r * B A): a plain model again, the same object, its ``requires_grad`` flags as they were.
    What a LoRA checkpoint means as a model, for ``dapo eval``, a full fine-tune starting from it, or an export."""
    ckpt_dir = Path(ckpt_dir)
    _, tensors = _read_adapter(ckpt_dir)
    if has_lora(base_model):
        raise ValueError("merge_adapter: pass the base model without adapters (or its path), not the adapted one")
    flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
    with warnings.catch_warnings():  # peft reads transformers 5's deprecated alias: not the user's to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
        wrapped = _peft().PeftModel.from_pretrained(base_model, str(ckpt_dir), adapter_name=ADAPTER)
    # peft only warns about tensors it could not place; a silently partial merge must not ship
    placed = {f: p for _, f, p in _adapter_entries(wrapped.base_model.model)}
    exact = set(placed) == set(tensors) and all(torch.equal(placed[f].cpu(), t.to(placed[f].dtype))
                                                for f, t in tensors.items())
    if not exact:
        raise ValueError(f"{ckpt_dir / ADAPTER_WEIGHTS} did not load exactly into the base model "
                         f"{type(base_model).__name__} (the adapter of another base?)")
    merged = wrapped.merge_and_unload()
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    for n, p in merged.named_parameters():  # peft froze the base while it wrapped it
        p.requires_grad_(flags.get(n, True))
    return merged


def merge_to_hf(
    base_path_or_model: str | Path | torch.nn.Module | None,
    ckpt_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write base + adapter merged (W + alpha/r * B A) to ``out_dir`` as a plain Hugging Face model that
    ``AutoModelForCausalLM.from_pretrained`` loads without peft; the tokenizer comes along when the
    checkpoint or the base path has one.

    ``base_path_or_model``: a path (None: the checkpoint's ``base_model_name_or_path``) or a plain model,
    whose weights are then overwritten by the merged ones. ``dtype``: of the saved weights (default: the
    base's).
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    _read_adapter(ckpt_dir)  # a missing file is reported before a base model is loaded
    if base_path_or_model is None:
        base_path_or_model = lora_base_path(ckpt_dir)
        if base_path_or_model is None:
            raise ValueError(f"merge_to_hf: {ckpt_dir / ADAPTER_CONFIG} records no base_model_name_or_path; pass the base")
    sources = [ckpt_dir]
    if isinstance(base_path_or_model, torch.nn.Module):
        model = base_path_or_model
        if has_lora(model):
            raise ValueError("merge_to_hf: pass the base model without adapters (or its path), not the adapted one")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_path_or_model), dtype=dtype or "auto")
        sources.append(Path(base_path_or_model))
    merged = merge_adapter(model, ckpt_dir)
    if dtype is not None:
        merged = merged.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    _copy_tokenizer(sources, out_dir)
    return out_dir
