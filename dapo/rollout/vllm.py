"""Rollout on vLLM (``rollout.engine=vllm``): the same ``RolloutEngine`` interface as ``HFEngine``.

NOT RUN ON A GPU HERE. This repository's machines have no GPU and no vLLM; the tests drive this class
through a stand-in ``vllm`` module that implements only the calls made below, so what is tested is our
side (what is sent, in what order, what comes back), not vLLM. vLLM is imported only when the engine
is built; without it the constructor raises ``ImportError`` saying how to get it.

Written against vLLM >= 0.16, < 0.26 (the ``vllm`` extra): the window that TRL's colocate mode, which
uses the same pieces (engine in-process, sleep mode with wake-up tags, ``processed_logprobs``),
declares support for. The facts relied on, from vLLM's docs and sources in that window:

- **Weights travel as tensors because the engine core runs in this process.** With vLLM's default
  multiprocess engine core, ``LLM.collective_rpc`` msgpack-encodes its arguments to another process,
  and a worker receives lists, not tensors. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (documented in vLLM's
  reproducibility guide) keeps the engine core in this process (``InprocClient``), and
  ``distributed_executor_backend="uni"`` keeps the one GPU worker here too (``UniProcExecutor`` calls
  the worker method directly): the tensors handed to ``load_weights`` reach the worker extension
  (``worker_extension_cls``) as the same objects, which copies them into vLLM's parameters with the
  model's own ``load_weights`` (Hugging Face names in, vLLM's fused layout out). Chosen over CUDA IPC
  handles and vLLM's weight-transfer API because it is one mechanism for both places this engine
  lives: the trainer's process (tensors on the same GPU) and a Ray rollout worker (CPU tensors from the
  object store, where IPC has nothing to share); and because the weight-transfer API changed shape
  between releases of that window. The price: no overlap of vLLM's scheduling with the GPU, one GPU
  only (no tensor parallelism), and vLLM's in-process worker makes a world-size-1 torch.distributed
  group, so a process that has its own group (FSDP ranks) cannot host this engine.
- **max_model_len** = longest prompt + max_new_tokens (``data.max_prompt_len + rollout.max_new_tokens``
  unless given): left unset, vLLM sizes for the model's full context; a request that would pass it is
  refused here rather than cut short by vLLM.
- **Colocated with training** (``colocated=True``): ``enable_sleep_mode``; after each rollout
  ``sleep(level=1)`` (weights offloaded to CPU memory, KV cache freed for the trainer), then
  ``wake_up(tags=["weights"])`` before new weights are loaded (loading into slept memory writes to
  unmapped pages) and ``wake_up(tags=["kv_cache"])`` before the next rollout, so the KV cache is not
  allocated while the weights are replaced. The engine tracks which tags sleep and wakes only those.
- after new weights, ``reset_prefix_cache()``: no KV block computed by old weights is reused.
- building the in-process engine seeds Python's, NumPy's and torch's global generators with the vLLM
  seed (vLLM's docs warn of it); the caller's generator states are put back afterwards.

LoRA (``model.lora_rank`` > 0), written against vLLM's documented LoRA API (``LLM(enable_lora=True,
max_lora_rank=..., max_loras=...)``, ``generate(..., lora_request=LoRARequest(name, int_id, path))``):
vLLM holds the base (the model a LoRA checkpoint names, on a resume) and each weight push, adapter
tensors only, is written as a peft adapter directory (megabytes) that the next ``generate`` names in a
``LoRARequest`` with a new integer id, so vLLM loads it instead of serving the previous one from its
cache; no base weight moves. ``max_lora_rank`` is the rank rounded up to a value vLLM accepts (8, 16, 32,
64, 128, 256, 320, 512). Until the first push (fresh adapters, B = 0) it samples the base, which is the
same policy. Only our side is tested (the stand-in vllm module), not vLLM's LoRA kernels.

Other differences from ``HFEngine``: samples are seeded per prompt (``SamplingParams.seed``), so
reproducible for one vLLM build and GPU, but not the same samples as ``HFEngine`` for a seed; and
``Completion.logprobs`` are vLLM's ``processed_logprobs`` (after temperature, and after top-p / top-k
when those are on), equal to ``HFEngine``'s at the training defaults top_p=1, top_k=0. The trainer
recomputes old log-probs itself unless ``rollout.use_engine_logprobs=true``.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dapo.config import Config
from dapo.rollout.base import Completion, Fingerprints, SamplingParams, compare_fingerprints, weight_fingerprints

_MISSING = ("rollout.engine=vllm needs vLLM, which is not installed here: pip install vllm (Linux with an NVIDIA "
            "GPU; pip install 'dapo[vllm]' gets the versions this engine is written for), or use rollout.engine=hf")
_TAGS = ("weights", "kv_cache")  # what sleep(level=1) releases, and wake_up(tags=...) restores
_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's LoRA config accepts for max_lora_rank


SHARED_GPU_FRACTION, OWN_GPU_FRACTION = 0.5, 0.85
"""``rollout.gpu_memory_utilization`` when unset: beside training on one GPU, and on a GPU of vLLM's own."""


def gpu_memory_fraction(cfg: Config, shares_gpu: bool) -> float:
    """The fraction of its GPU vLLM takes: ``rollout.gpu_memory_utilization``, or its default for the placement."""
    if cfg.rollout.gpu_memory_utilization is not None:
        return cfg.rollout.gpu_memory_utilization
    return SHARED_GPU_FRACTION if shares_gpu else OWN_GPU_FRACTION


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    for r in _MAX_LORA_RANKS:
        if rank <= r:
            return r
    raise ValueError(f"model.lora_rank={rank}: vLLM serves LoRA ranks up to {_MAX_LORA_RANKS[-1]}")


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{_MISSING} ({e})") from None
    return vllm


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Put back Python's, NumPy's and torch's (CPU, and CUDA if started) generator states on exit."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class WeightLoader:
    """Worker extension (``LLM(worker_extension_cls=...)``): vLLM adds it to its GPU worker's bases, so
    ``collective_rpc("dapo_load_weights", ...)`` runs this on the worker (in this process: see above)."""

    def dapo_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        bad = [(n, type(t).__name__) for n, t in named if not isinstance(t, torch.Tensor)]
        if bad:
            raise TypeError(f"weights arrived as {bad[0][1]}, not tensors ({bad[0][0]}...): collective_rpc serialised "
                            "them, so vLLM's engine core is not in this process (VLLM_ENABLE_V1_MULTIPROCESSING "
                            "must be 0 when the LLM is built)")
        model = self.model_runner.model  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        model.load_weights(weights=((n, t.to(device)) for n, t in named))  # one tensor on the device at a time
        return len(named)

    def dapo_weight_dtype(self) -> torch.dtype:
        """The dtype vLLM holds the model's weights in (what ``dtype=auto`` resolved to)."""
        return next(self.model_runner.model.parameters()).dtype  # type: ignore[attr-defined]

    def dapo_fingerprints(self, names: list[str]) -> list[tuple[tuple[str, ...], torch.Tensor]]:
        """Fingerprints of the parameters vLLM holds for ``names`` (Hugging Face names), each with the names it
        is made of: a packed parameter (``packed_modules_mapping``: qkv_proj = q_proj, k_proj, v_proj) stands for
        its parts, and since the fingerprints are sums, the parts' add up to it. Written for models whose vLLM
        parameter names are the Hugging Face ones up to packing (Qwen2, Llama, Mistral)."""
        model = self.model_runner.model  # type: ignore[attr-defined]
        packed = dict(getattr(model, "packed_modules_mapping", None) or {})
        want, out = set(names), []
        for pname, p in model.named_parameters():
            parts = next((tuple(pname.replace(f".{k}.", f".{s}.") for s in subs) for k, subs in packed.items()
                          if f".{k}." in pname), (pname,))
            if want.intersection(parts):
                out.append((parts, weight_fingerprints([(pname, p.data)])[pname]))
        return out


class VLLMEngine:
    """vLLM's ``LLM`` on the model at ``path``: one GPU, ``gpu_memory_fraction`` of its memory.

    ``max_model_len``: the longest prompt + response vLLM must hold (default ``data.max_prompt_len +
    rollout.max_new_tokens``). ``colocated``: the GPU is shared with training, so vLLM sleeps between
    rollouts (see the module docstring).
    """

    def __init__(self, path: str, pad_token_id: int, eos_token_ids: Sequence[int], cfg: Config, *,
                 max_model_len: int | None = None, colocated: bool = False):
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        self._vllm, self._tokens_prompt = vllm, TokensPrompt
        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.weight_version = 0
        self.max_model_len = int(max_model_len if max_model_len is not None
                                 else cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)
        self.colocated = bool(colocated)
        self._asleep: set[str] = set()
        self._held = False  # inside ``awake()``: generate does not sleep after its call
        self.lora_rank, self.lora_alpha = cfg.model.lora_rank, cfg.model.lora_alpha
        self._lora: Any = None  # the LoRARequest every generate names (None: the base alone)
        model, tokenizer, extra = path, cfg.model.tokenizer or path, {}
        if self.lora_rank:
            model, tokenizer, extra = self._lora_setup(path, cfg)
        else:
            from dapo.lora import is_lora_checkpoint

            if is_lora_checkpoint(path):
                raise ValueError(f"rollout.engine=vllm: {path} is a LoRA adapter, which vLLM cannot load as a model "
                                 f"with model.lora_rank=0; merge it first: dapo export {path} --merge OUT")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the LLM is built: engine core in-process
        with _global_rng_kept():
            self.llm = vllm.LLM(
                model=model, tokenizer=tokenizer, **extra,
                dtype=cfg.rollout.dtype if cfg.rollout.dtype != "auto" else cfg.model.dtype,
                trust_remote_code=cfg.model.trust_remote_code, seed=cfg.seed,
                gpu_memory_utilization=gpu_memory_fraction(cfg, self.colocated or cfg.dist.colocate), max_num_seqs=cfg.rollout.batch_size,
                max_model_len=self.max_model_len, enable_prefix_caching=True, enable_sleep_mode=self.colocated,
                logprobs_mode="processed_logprobs", worker_extension_cls=f"{__name__}.WeightLoader",
                tensor_parallel_size=1, distributed_executor_backend="uni",
            )
        self._weight_dtype = None if self.lora_rank else self.llm.collective_rpc("dapo_weight_dtype")[0]

    def _lora_setup(self, path: str, cfg: Config) -> tuple[str, str, dict[str, Any]]:
        """(model, tokenizer, LoRA keywords of ``LLM``); a LoRA checkpoint at ``path`` (a resume) is served on
        the base it names from a copy (the run may prune the checkpoint before vLLM reads it)."""
        import shutil
        import tempfile
        import weakref

        from dapo.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_lora_checkpoint
        from dapo.model import adapter_base

        self._lora_root = tempfile.mkdtemp(prefix="dapo-vllm-lora-")
        weakref.finalize(self, shutil.rmtree, self._lora_root, True)
        self._lora_id = 0
        model = path
        if is_lora_checkpoint(path):
            model = adapter_base(path)
            adapter = self._next_adapter_dir()
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(os.path.join(path, name), adapter / name)
            self._use_adapter(adapter)
        lora = {"enable_lora": True, "max_lora_rank": vllm_max_lora_rank(self.lora_rank), "max_loras": 1}
        return model, cfg.model.tokenizer or model, lora

    def _next_adapter_dir(self) -> Any:
        from pathlib import Path

        self._lora_id += 1  # vLLM caches adapters by this id: a new one makes it read the new files
        d = Path(self._lora_root) / f"v{self._lora_id}"
        d.mkdir()
        return d

    def _use_adapter(self, adapter_dir: Any) -> None:
        import shutil

        from vllm.lora.request import LoRARequest

        old = self._lora
        self._lora = LoRARequest(f"dapo-{self._lora_id}", self._lora_id, str(adapter_dir))
        if old is not None:  # never requested again: the next generate names the new id
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def _sleep(self) -> None:
        if self.colocated:
            self.llm.sleep(level=1)  # weights to CPU memory, KV cache freed: the GPU is the trainer's now
            self._asleep.update(_TAGS)

    @contextlib.contextmanager
    def awake(self) -> Iterator[None]:
        """Stay awake across the ``generate`` calls inside (a multi-turn rollout's turns): a colocated engine sleeps
        once, at the end, instead of after each call, and its prefix cache keeps the turns' shared history."""
        if self._held:
            yield
            return
        self._held = True
        try:
            yield
        finally:
            self._held = False
            if not self._asleep:
                self._sleep()

    def _wake(self, *tags: str) -> None:
        """Wake the given memory tags that sleep (waking an awake tag is not something to rely on). vLLM's sleep
        pool lives outside PyTorch's caching allocator: what the update freed but PyTorch still caches is handed
        back to the driver first, or vLLM cannot map it."""
        todo = [t for t in tags if t in self._asleep]
        if todo:
            torch.cuda.empty_cache()  # a no-op where CUDA was never started
            self.llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Completion]:
        assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts"
        longest = max((len(p) for p in prompts), default=0)
        if longest + params.max_new_tokens > self.max_model_len:
            raise ValueError(f"a {longest}-token prompt + max_new_tokens={params.max_new_tokens} passes the vLLM "
                             f"engine's max_model_len={self.max_model_len} (data.max_prompt_len + "
                             "rollout.max_new_tokens): vLLM would cut its responses short")
        v = self._vllm
        stop = sorted(set(self.eos_token_ids) | set(params.stop_token_ids))
        sps = [v.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                                logprobs=0, seed=int(s) & 0x7FFFFFFF, stop_token_ids=stop, detokenize=False)
               for s in seeds]
        inputs = [self._tokens_prompt(prompt_token_ids=list(p)) for p in prompts]
        self._wake(*_TAGS)
        lora = {"lora_request": self._lora} if self._lora is not None else {}
        outs = self.llm.generate(inputs, sampling_params=sps, use_tqdm=False, **lora)
        if not self._held:
            self._sleep()
        assert len(outs) == len(prompts), f"vLLM answered {len(outs)} of {len(prompts)} prompts"
        return [c for i, out in enumerate(outs) for c in self._completions(i, out, params.n)]

    def _completions(self, i: int, out: Any, n: int) -> list[Completion]:
        """The n samples of prompt i from its ``RequestOutput``; log-probs from each step's {token: Logprob}."""
        assert len(out.outputs) == n, f"prompt {i}: vLLM returned {len(out.outputs)} samples, asked for {n}"
        comps = []
        for o in out.outputs:
            ids = list(o.token_ids)
            if o.logprobs is None or len(o.logprobs) != len(ids):
                raise RuntimeError(f"prompt {i}: vLLM returned log-probs for {len(o.logprobs or [])} of "
                                   f"{len(ids)} tokens")
            if o.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"prompt {i}: vLLM finished a sample with {o.finish_reason!r} (aborted?)")
            lps = [float(step[t].logprob) for step, t in zip(o.logprobs, ids)]
            comps.append(Completion(i, ids, lps, o.finish_reason, self.weight_version))
        return comps

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copy ``state_dict`` (Hugging Face names; any device) into vLLM's model and stamp ``version``. Under
        LoRA ``state_dict`` holds the adapter tensors only (``dapo.lora.adapter_state_dict``'s names): they
        become the adapter the next rollouts request."""
        if self.lora_rank:
            from dapo.lora import save_adapter_state

            adapter = self._next_adapter_dir()
            save_adapter_state(state_dict, adapter, self.lora_rank, self.lora_alpha)
            self._use_adapter(adapter)
            self.weight_version = int(version)
            return
        self._wake("weights")  # the KV cache stays asleep until the next rollout
        self.llm.collective_rpc("dapo_load_weights", args=(list(state_dict.items()),))
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The dtype vLLM holds the weights in (asked of its worker once, at start-up); None under LoRA (adapters travel as
        files, in the trainer's float32)."""
        return self._weight_dtype

    def check_weights(self, expected: Fingerprints) -> None:
        """Compare what vLLM's worker holds with the fingerprints of the push (``WeightSyncError``). Under LoRA
        nothing is checked here: the adapter is the files vLLM reads at the next rollout."""
        if self.lora_rank:
            return
        self._wake("weights")
        held = self.llm.collective_rpc("dapo_fingerprints", args=(list(expected),))[0]
        compare_fingerprints(expected, held, "the vLLM rollout engine")
