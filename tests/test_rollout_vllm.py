"""VLLMEngine against a stand-in ``vllm`` (vLLM needs a GPU and is not installed here).

The stand-in implements only the API surface ``dapo/rollout/vllm.py`` calls, with vLLM's argument
names (``LLM(...)`` keywords, ``generate``, ``collective_rpc``, ``sleep``, ``wake_up``,
``reset_prefix_cache``, ``SamplingParams``, ``TokensPrompt``) and vLLM's output shapes (``RequestOutput``
holding ``CompletionOutput``s whose ``logprobs`` is one {token id: Logprob} dict per generated token).
It behaves as vLLM's documentation says on the points our side depends on: with multiprocessing on,
``collective_rpc`` arguments cross a process boundary (here: tensors become lists, as msgpack gives the
worker); building the engine in-process seeds the global generators; slept memory must be woken before
use. What it cannot tell is whether real vLLM does what its documentation says: that needs a GPU.
"""
import dataclasses
import importlib
import os
import random
import sys
import types
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pytest
import torch

from dapo.config import load_config
from dapo.rollout import SamplingParams
from dapo.rollout.vllm import VLLMEngine, WeightLoader

VOCAB = 50


# ------------------------------------------------------------------------------------------------
# the stand-in


@dataclasses.dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool


class TokensPrompt(TypedDict):  # vllm.inputs.TokensPrompt
    prompt_token_ids: list[int]


class StandInSamplingParams:  # vllm.SamplingParams, the fields dapo sets
    def __init__(self, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_tokens: int | None = 16, logprobs: int | None = None, seed: int | None = None,
                 stop_token_ids: list[int] | None = None, detokenize: bool = True):
        if not (top_k in (-1, 0) or top_k >= 1):
            raise ValueError(f"top_k must be -1, 0 (disable) or >= 1, got {top_k}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
        self.max_tokens, self.logprobs, self.seed = max_tokens, logprobs, seed
        self.stop_token_ids, self.detokenize = list(stop_token_ids or []), detokenize


class FakeModel(torch.nn.Module):
    """vLLM's model in its worker, in vLLM's layout: Qwen2's q/k/v and gate/up projections packed into one
    parameter each (declared in ``packed_modules_mapping``), tied embeddings' LM head not a parameter of its
    own. ``load_weights(weights)`` consumes Hugging Face (name, tensor) pairs and copies each into its place
    (its rows of a packed parameter), casting to the model's dtype; names it has no place for are only
    recorded. Without a checkpoint (``path`` None) it holds one placeholder parameter."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, path: str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.received: list[tuple[str, Any]] = []
        self.held: dict[str, torch.nn.Parameter] = {}
        self.slots: dict[str, tuple[str, int, int]] = {}  # HF name -> (held name, first row, rows)
        if path is None:
            self.held["w"] = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
            return
        from safetensors.torch import load_file

        parts: dict[str, list[tuple[int, str, torch.Tensor]]] = {}  # packed name -> (place, HF name, tensor)
        for name, t in load_file(str(Path(path) / "model.safetensors")).items():
            place, packed = next(((i, name.replace(f".{s}.", f".{k}.")) for k, subs in self.packed_modules_mapping.items()
                                  for i, s in enumerate(subs) if f".{s}." in name), (0, name))
            parts.setdefault(packed, []).append((place, name, t))
        for packed, ts in parts.items():  # q, k, v (gate, up) one after the other, in that order
            ts.sort(key=lambda x: x[0])
            rows = 0
            for _, name, t in ts:
                self.slots[name] = (packed, rows, t.shape[0])
                rows += t.shape[0]
            self.held[packed] = torch.nn.Parameter(torch.cat([t for _, _, t in ts]).to(dtype), requires_grad=False)

    def named_parameters(self, *args, **kwargs):
        yield from self.held.items()

    @torch.no_grad()
    def load_weights(self, weights) -> set[str]:
        loaded = set()
        for name, t in weights:
            self.received.append((name, t))
            if name in self.slots:
                held, r0, n = self.slots[name]
                self.held[held][r0 : r0 + n].copy_(t)
                loaded.add(name)
        return loaded


class GPUWorker:
    """What vLLM's worker offers an extension: ``self.model_runner.model``."""

    def __init__(self, path: str | None = None, dtype: torch.dtype = torch.float32):
        self.model_runner = types.SimpleNamespace(model=FakeModel(path, dtype))


def _serialised(x):
    """A tensor as the worker of a multiprocess engine core receives it: msgpack has made it a list."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return type(x)(_serialised(y) for y in x)
    return x


@dataclasses.dataclass
class LoRARequest:  # vllm.lora.request.LoRARequest, the fields dapo sets
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


def _read_adapter_dir(path, max_rank):
    """What vLLM reads of a peft adapter directory: adapter_config.json and adapter_model.safetensors."""
    import json

    from safetensors.torch import load_file

    config = json.loads((Path(path) / "adapter_config.json").read_text())
    if config["r"] > max_rank:
        raise ValueError(f"LoRA rank {config['r']} is greater than max_lora_rank {max_rank}")
    return config, load_file(str(Path(path) / "adapter_model.safetensors"))


class LLM:
    """vllm.LLM, the keywords dapo passes (an unknown one is a TypeError, as EngineArgs makes it)."""

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, seed: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int | None = None, max_model_len: int | None = None,
                 enable_prefix_caching: bool | None = None, enable_sleep_mode: bool = False,
                 logprobs_mode: str = "raw_logprobs", worker_extension_cls: str = "",
                 tensor_parallel_size: int = 1, distributed_executor_backend: str | None = None,
                 enable_lora: bool = False, max_lora_rank: int = 16, max_loras: int = 1):
        if enable_lora and max_lora_rank not in (8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError(f"max_lora_rank ({max_lora_rank}) must be one of (8, 16, 32, 64, 128, 256, 320, 512)")
        self.kwargs = dict(model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_num_seqs=max_num_seqs,
                           enable_lora=enable_lora, max_lora_rank=max_lora_rank, max_loras=max_loras,
                           max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                           enable_sleep_mode=enable_sleep_mode, logprobs_mode=logprobs_mode,
                           worker_extension_cls=worker_extension_cls, tensor_parallel_size=tensor_parallel_size,
                           distributed_executor_backend=distributed_executor_backend)
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        self.max_model_len = max_model_len or 32768
        mod, _, cls = worker_extension_cls.rpartition(".")
        ext = getattr(importlib.import_module(mod), cls) if worker_extension_cls else object
        # vLLM's dtype=auto is the checkpoint's (float32 for the tiny test model)
        held = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        # vLLM adds the extension to the worker's bases; a LoRA base is served as it is, never loaded into
        self.worker = type("Worker", (GPUWorker, ext), {})(None if enable_lora else model, held)
        self.sleeping: set[str] = set()
        self.adapters: dict[int, tuple[dict, dict]] = {}  # lora_int_id -> (adapter_config, tensors) as read
        self.events: list[tuple] = []
        self.returned: list[RequestOutput] = []
        if self.in_process and seed is not None:  # the worker seeds the global generators of this process
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        LLM.last = self

    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        if self.sleeping:
            raise RuntimeError(f"generate while {sorted(self.sleeping)} sleep")
        if lora_request is not None:
            if not self.kwargs["enable_lora"]:
                raise ValueError("LoRA is not enabled")
            if lora_request.lora_int_id < 1:
                raise ValueError("lora_int_id must be > 0")
            if lora_request.lora_int_id not in self.adapters:  # vLLM reads an adapter once per id, then caches it
                self.adapters[lora_request.lora_int_id] = _read_adapter_dir(lora_request.lora_path, self.kwargs["max_lora_rank"])
            self.events.append(("lora", lora_request.lora_int_id))
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.events.append(("generate", len(prompts)))
        outs = []
        for r, (p, sp) in enumerate(zip(prompts, sps)):
            ids = p["prompt_token_ids"]
            if len(ids) > self.max_model_len:
                raise ValueError(f"prompt of {len(ids)} tokens is longer than max_model_len={self.max_model_len}")
            g = torch.Generator().manual_seed(sp.seed)
            samples = []
            for k in range(sp.n):
                toks, steps, reason, why = [], [], "length", None
                limit = min(sp.max_tokens, self.max_model_len - len(ids))  # vLLM stops at max_model_len
                while len(toks) < limit:
                    t = int(torch.randint(0, VOCAB, (1,), generator=g))
                    toks.append(t)
                    steps.append({t: Logprob(logprob=-float(torch.rand(1, generator=g)) - 0.01, rank=1)})
                    if t in sp.stop_token_ids:
                        reason, why = "stop", t
                        break
                samples.append(CompletionOutput(k, "", toks, sum(next(iter(s.values())).logprob for s in steps),
                                                steps if sp.logprobs is not None else None, reason, why))
            outs.append(RequestOutput(str(r), None, list(ids), None, samples, True))
        self.returned = outs
        return outs

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        self.events.append(("collective_rpc", method))
        if "weights" in self.sleeping:
            raise RuntimeError("collective_rpc into weights that sleep (their memory is unmapped)")
        if not self.in_process:
            args, kwargs = _serialised(args), _serialised(kwargs or {})
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def sleep(self, level: int = 1) -> None:
        if not self.kwargs["enable_sleep_mode"]:
            raise RuntimeError("Sleep mode is not enabled")
        self.events.append(("sleep", level))
        self.sleeping = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = list(tags) if tags is not None else ["weights", "kv_cache"]
        if not set(tags) <= self.sleeping:
            raise RuntimeError(f"wake_up({tags}) of memory that does not sleep ({sorted(self.sleeping)})")
        self.events.append(("wake_up", tuple(tags)))
        self.sleeping -= set(tags)

    def reset_prefix_cache(self) -> bool:
        self.events.append(("reset_prefix_cache",))
        return True


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, StandInSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    vllm.inputs = inputs
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    lora.request, vllm.lora = request, lora
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # vLLM's default; put back (or removed) afterwards
    return vllm


CFG = load_config(overrides=["data.max_prompt_len=12", "rollout.max_new_tokens=20", "seed=5"])
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
DTYPE_RPC = ("collective_rpc", "dapo_weight_dtype")  # asked once, at start-up: the dtype pushes are cast to


# ------------------------------------------------------------------------------------------------


def test_engine_core_in_process_so_weights_reach_the_worker_as_the_same_tensors(fake_vllm, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eng = VLLMEngine(str(tiny_model_dir), 0, [1], CFG)
    llm = LLM.last
    assert llm.in_process  # VLLM_ENABLE_V1_MULTIPROCESSING=0 was set before the LLM was built
    assert llm.kwargs["max_model_len"] == 12 + 20 == eng.max_model_len
    assert llm.kwargs["worker_extension_cls"] == "dapo.rollout.vllm.WeightLoader"
    assert llm.kwargs["distributed_executor_backend"] == "uni" and llm.kwargs["tensor_parallel_size"] == 1
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs" and llm.kwargs["enable_sleep_mode"] is False
    sd = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    eng.load_weights(sd, version=3)
    got = llm.worker.model_runner.model.received
    assert [n for n, _ in got] == list(sd)
    assert all(t is sd[n] for n, t in got)  # tensors, not lists, and not even copies
    assert llm.events == [DTYPE_RPC, ("collective_rpc", "dapo_load_weights"), ("reset_prefix_cache",)]  # no sleep
    assert eng.weight_version == 3


def test_a_multiprocess_engine_core_would_hand_the_worker_lists_and_that_is_refused():
    worker = type("W", (GPUWorker, WeightLoader), {})()
    t = torch.ones(2, 2)
    assert worker.dapo_load_weights([("a", t)]) == 1 and worker.model_runner.model.received[0][1] is t
    with pytest.raises(TypeError, match="VLLM_ENABLE_V1_MULTIPROCESSING must be 0"):
        worker.dapo_load_weights(_serialised([("a", t)]))


def test_colocated_engine_sleeps_after_rollouts_and_wakes_weights_before_loading(fake_vllm, tiny_model_dir):
    eng = VLLMEngine(str(tiny_model_dir), 0, [1], CFG, colocated=True)
    llm = LLM.last
    assert llm.kwargs["enable_sleep_mode"] is True
    p = SamplingParams(n=2, max_new_tokens=5)
    eng.generate(PROMPTS, p, [1, 2, 3])
    assert llm.sleeping == {"weights", "kv_cache"}  # the trainer has the GPU
    eng.load_weights({"w": torch.zeros(3)}, version=1)
    eng.load_weights({"v": torch.zeros(3)}, version=2)  # a second chunk: weights already awake
    eng.generate(PROMPTS, p, [1, 2, 3])
    assert llm.events == [
        DTYPE_RPC, ("generate", 3), ("sleep", 1),
        ("wake_up", ("weights",)), ("collective_rpc", "dapo_load_weights"), ("reset_prefix_cache",),
        ("collective_rpc", "dapo_load_weights"), ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)), ("generate", 3), ("sleep", 1),
    ]
    eng2 = VLLMEngine(str(tiny_model_dir), 0, [1], CFG, colocated=True)  # a resume loads weights first
    eng2.load_weights({"w": torch.zeros(3)}, version=7)
    eng2.generate(PROMPTS, p, [1, 2, 3])
    assert LLM.last.events == [DTYPE_RPC, ("collective_rpc", "dapo_load_weights"), ("reset_prefix_cache",),
                               ("generate", 3), ("sleep", 1)]


def test_completions_carry_vllm_tokens_logprobs_finish_reasons_and_weight_version(fake_vllm, tiny_model_dir):
    eng = VLLMEngine(str(tiny_model_dir), 0, [1, 4], CFG)
    llm = LLM.last
    eng.load_weights({}, version=9)
    params = SamplingParams(n=4, max_new_tokens=15, temperature=0.7, top_p=0.9, stop_token_ids=(4, 30, 2))
    seeds = [11, 2**40 + 12, 13]
    comps = eng.generate(PROMPTS, params, seeds)
    sent = llm.returned
    assert [c.prompt_index for c in comps] == [0] * 4 + [1] * 4 + [2] * 4
    for c, o in zip(comps, [o for r in sent for o in r.outputs]):
        assert c.token_ids.tolist() == o.token_ids
        torch.testing.assert_close(c.logprobs, torch.tensor([step[t].logprob for step, t in zip(o.logprobs, o.token_ids)],
                                                            dtype=torch.float32), atol=0, rtol=0)
        assert c.finish_reason == o.finish_reason and c.weight_version == 9
        if c.finish_reason == "stop":
            assert int(c.token_ids[-1]) in (1, 2, 4, 30)
        else:
            assert len(c.token_ids) == 15
    assert {c.finish_reason for c in comps} == {"stop", "length"}
    # what was asked of vLLM: per-prompt seeds (31 bits), every stop id, one log-prob per token, no text
    sent_params = _sent_params(eng, params, seeds)
    assert [s.seed for s in sent_params] == [11, 12, 13]
    s0 = sent_params[0]
    assert (s0.n, s0.temperature, s0.top_p, s0.top_k, s0.max_tokens) == (4, 0.7, 0.9, -1, 15)
    assert s0.stop_token_ids == [1, 2, 4, 30] and s0.logprobs == 0 and s0.detokenize is False


def _sent_params(eng, params, seeds):
    """Run generate once more with a recording SamplingParams and return what dapo built."""
    made = []
    real = sys.modules["vllm"].SamplingParams

    def record(**kw):
        made.append(real(**kw))
        return made[-1]

    sys.modules["vllm"].SamplingParams = record
    try:
        eng.generate(PROMPTS, params, seeds)
    finally:
        sys.modules["vllm"].SamplingParams = real
    return made


def test_max_model_len_from_config_or_argument_and_requests_past_it_are_refused(fake_vllm, tiny_model_dir):
    eng = VLLMEngine(str(tiny_model_dir), 0, [1], CFG, max_model_len=10)
    assert LLM.last.kwargs["max_model_len"] == 10
    eng.generate([[1, 2, 3, 4, 5]], SamplingParams(n=1, max_new_tokens=5), [1])  # 5 + 5 fits exactly
    with pytest.raises(ValueError, match=r"6-token prompt \+ max_new_tokens=5 passes .* max_model_len=10"):
        eng.generate([[1, 2], [1, 2, 3, 4, 5, 6]], SamplingParams(n=1, max_new_tokens=5), [1, 2])


def test_building_the_engine_leaves_the_callers_random_streams_alone(fake_vllm, tiny_model_dir):
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    VLLMEngine(str(tiny_model_dir), 0, [1], CFG)
    after = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert after == (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_an_aborted_sample_is_an_error_not_a_completion(fake_vllm, tiny_model_dir, monkeypatch):
    eng = VLLMEngine(str(tiny_model_dir), 0, [1], CFG)
    real = LLM.generate

    def aborted(self, *a, **kw):
        outs = real(self, *a, **kw)
        outs[0].outputs[0].finish_reason = "abort"
        return outs

    monkeypatch.setattr(LLM, "generate", aborted)
    with pytest.raises(RuntimeError, match="'abort'"):
        eng.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=4), [1, 2, 3])


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_max_rank_is_rounded_up_to_a_value_vllm_accepts():
    from dapo.rollout.vllm import vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 16, 17, 300, 512)] == [8, 8, 16, 16, 32, 320, 512]
    with pytest.raises(ValueError, match="up to 512"):
        vllm_max_lora_rank(513)


def test_lora_pushes_become_adapter_requests_and_the_base_is_never_touched(fake_vllm, tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from dapo.lora import adapter_state_dict, apply_lora, load_lora_checkpoint, save_lora_checkpoint

    cfg = load_config(overrides=["data.max_prompt_len=12", "rollout.max_new_tokens=20", "seed=5",
                                 "model.lora_rank=4", "model.lora_alpha=8"])
    eng = VLLMEngine(str(tiny_model_dir), 0, [1], cfg)
    llm = LLM.last
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_lora_rank"], llm.kwargs["max_loras"]) == (True, 8, 1)
    p = SamplingParams(n=2, max_new_tokens=5)
    eng.generate(PROMPTS, p, [1, 2, 3])  # fresh adapters have B = 0: the base is the policy, nothing requested
    trained = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), rank=4, alpha=8)
    paths = []
    for version, seed in ((1, 0), (2, 1)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t in adapter_state_dict(trained).values():
                t.copy_(torch.randn(t.shape, generator=g))
        sent = adapter_state_dict(trained)
        eng.load_weights(sent, version)
        assert eng.weight_version == version
        eng.generate(PROMPTS, p, [1, 2, 3])
        paths.append(eng._lora.lora_path)
        # what vLLM read is this push's adapter, exactly: a peft adapter that puts the same tensors in a model
        config, tensors = llm.adapters[version]
        assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
        assert sum(t.numel() for t in tensors.values()) == sum(t.numel() for t in sent.values())
        got = adapter_state_dict(load_lora_checkpoint(AutoModelForCausalLM.from_pretrained(tiny_model_dir), paths[-1]))
        assert got.keys() == sent.keys() and all(torch.equal(got[k], sent[k]) for k in sent)
    assert llm.events == [("generate", 3), ("lora", 1), ("generate", 3), ("lora", 2), ("generate", 3)]  # no collective_rpc
    assert not Path(paths[0]).exists() and Path(paths[1]).exists()  # an adapter no request names again is deleted
    # a resume: vLLM holds the base the checkpoint names, and the first rollout requests the checkpoint's adapter
    ckpt = save_lora_checkpoint(trained, tmp_path / "step_2", base_model_path=str(tiny_model_dir))
    VLLMEngine(str(ckpt), 0, [1], cfg).generate(PROMPTS, p, [1, 2, 3])
    llm2 = LLM.last
    assert llm2.kwargs["model"] == llm2.kwargs["tokenizer"] == str(tiny_model_dir)
    assert llm2.events == [("lora", 1), ("generate", 3)] and llm2.adapters[1][0]["r"] == 4
    # without model.lora_rank an adapter is not a model vLLM can load
    with pytest.raises(ValueError, match="dapo export .* --merge OUT"):
        VLLMEngine(str(ckpt), 0, [1], CFG)


# ------------------------------------------------------------------------------------------------ the weight-sync guard


def _trained(tiny_model_dir, seed=3):
    """The tiny model's state dict after a "step": every tensor moved, so a stale one differs from it."""
    from transformers import AutoModelForCausalLM

    from dapo.model import tied_copies

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model.state_dict(), tied_copies(model)


def test_vllm_guard_passes_a_whole_push_and_names_a_corrupted_or_missing_tensor(fake_vllm, tiny_model_dir):
    from dapo.rollout.base import WeightSyncError, weight_fingerprints

    bf16 = load_config(overrides=["data.max_prompt_len=12", "rollout.max_new_tokens=20", "rollout.dtype=bfloat16"])
    sd, tied = _trained(tiny_model_dir)
    eng = VLLMEngine(str(tiny_model_dir), 0, [1], bf16)
    assert eng.weight_dtype == torch.bfloat16  # asked of the worker
    expected = weight_fingerprints(((k, v) for k, v in sd.items() if k not in tied), eng.weight_dtype)
    eng.load_weights(sd, 1)
    eng.check_weights(expected)  # a whole push passes, through vLLM's packed layout
    held = LLM.last.worker.model_runner.model.held
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(held[qkv], torch.cat([sd[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"]).bfloat16())

    bad = dict(sd)
    bad["model.layers.1.self_attn.k_proj.weight"] = sd["model.layers.1.self_attn.k_proj.weight"] * 1.5
    eng.load_weights(bad, 2)
    with pytest.raises(WeightSyncError, match=r"vLLM rollout engine holds other values for .*layers\.1\.self_attn\.q_proj"
                                              r"\.weight \+ .*layers\.1\.self_attn\.k_proj\.weight"):
        eng.check_weights(expected)

    fresh = VLLMEngine(str(tiny_model_dir), 0, [1], bf16)  # holds the checkpoint's weights, not the trained ones
    fresh.load_weights({k: v for k, v in sd.items() if k != "model.norm.weight"}, 1)
    with pytest.raises(WeightSyncError, match=r"other values for model\.norm\.weight "):
        fresh.check_weights(expected)
    eng.load_weights(sd, 3)  # the good push again: passes, and a tensor vLLM has no place for is named
    eng.check_weights(expected)
    with pytest.raises(WeightSyncError, match=r"holds no tensor model\.extra\.weight"):
        eng.check_weights({**expected, "model.extra.weight": torch.zeros(3, dtype=torch.float64)})


def test_every_wake_up_comes_right_after_the_caching_allocator_is_emptied(fake_vllm, tiny_model_dir, monkeypatch):
    eng = VLLMEngine(str(tiny_model_dir), 0, [1], CFG, colocated=True)
    llm = LLM.last
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: llm.events.append(("empty_cache",)))
    p = SamplingParams(n=2, max_new_tokens=5)
    for v in (1, 2):
        eng.generate(PROMPTS, p, [1, 2, 3])
        eng.load_weights({"w": torch.zeros(3)}, version=v)
    eng.generate(PROMPTS, p, [1, 2, 3])
    wakes = [i for i, e in enumerate(llm.events) if e[0] == "wake_up"]
    assert len(wakes) == 4 and all(llm.events[i - 1] == ("empty_cache",) for i in wakes)
    assert llm.events.count(("empty_cache",)) == 4  # and only then


class _Twice:
    """Answers the first turn with " ok" and ends the trajectory after the second."""

    def reset(self, row):
        return None

    def step(self, text):
        from dapo.envs.base import StepResult

        self.turns = getattr(self, "turns", 0) + 1
        return StepResult(None if self.turns == 2 else " ok", None, self.turns == 2)


def test_multi_turn_rollouts_on_vllm_send_each_turn_the_trajectory_so_far_as_token_ids(fake_vllm, tiny_model_dir):
    """With vLLM every turn is one generate call whose prompts are each live trajectory's ids so far (prompt,
    sampled tokens, the observation tokenised alone): no text round trip, and vLLM's prefix cache (on) serves
    the history a turn shares with the last one. The first turn is the single-turn call (G samples a prompt)."""
    from dapo.data.example import Example
    from dapo.items import PromptItem
    from dapo.model import load_tokenizer
    from dapo.rollout.multiturn import MultiTurnRollout

    tok = load_tokenizer(CFG.model, str(tiny_model_dir))
    stops = list(range(1, 12))  # random tokens over VOCAB: most turns stop within 20 tokens
    eng = VLLMEngine(str(tiny_model_dir), 0, stops, CFG)
    assert eng.llm.kwargs["enable_prefix_caching"]
    items = [PromptItem(k, Example(p, "x"), p) for k, p in enumerate(PROMPTS)]
    mt = MultiTurnRollout(eng, tok, _Twice, max_turns=3)
    assert not mt.kv_cache
    calls = []
    real = eng.llm.generate
    eng.llm.generate = lambda prompts, *a, **kw: calls.append([p["prompt_token_ids"] for p in prompts]) or real(prompts, *a, **kw)
    _, trajs = mt.run(items, SamplingParams(n=2, max_new_tokens=20, stop_token_ids=tuple(stops)), [5, 6, 7])
    obs = tok(" ok")["input_ids"]
    assert calls[0] == PROMPTS and len(calls) >= 2  # turn 0: each prompt once, n=2
    assert sum(t.turns == 2 for t in trajs) >= 2 and len(trajs) == 6
    second = iter(calls[1])
    for t in trajs:
        c = t.completion
        ids, mask = c.token_ids.tolist(), c.mask.tolist()
        if t.turns == 1:  # its first turn ran out of tokens: nothing for the environment to read
            assert c.finish_reason == "length" and all(mask)
            continue
        assert t.turns == 2
        n1 = len(ids) - len(obs) - len(t.last_turn)  # the first turn's tokens
        assert ids[n1 : n1 + len(obs)] == obs and mask == [1] * n1 + [0] * len(obs) + [1] * len(t.last_turn)
        prompt = PROMPTS[c.prompt_index]
        assert next(second) == prompt + ids[: n1 + len(obs)]  # the history as ids, observation appended
        assert c.logprobs[n1 : n1 + len(obs)].eq(0).all()


def test_a_colocated_engine_stays_awake_for_all_turns_of_a_rollout_and_sleeps_once(fake_vllm, tiny_model_dir):
    from dapo.data.example import Example
    from dapo.items import PromptItem
    from dapo.model import load_tokenizer
    from dapo.rollout.multiturn import MultiTurnRollout

    tok = load_tokenizer(CFG.model, str(tiny_model_dir))
    stops = list(range(1, 12))
    eng = VLLMEngine(str(tiny_model_dir), 0, stops, CFG, colocated=True)
    items = [PromptItem(k, Example(p, "x"), p) for k, p in enumerate(PROMPTS)]
    MultiTurnRollout(eng, tok, _Twice, max_turns=3).run(items, SamplingParams(n=2, max_new_tokens=20), [5, 6, 7])
    events = [e[0] for e in eng.llm.events if e[0] in ("generate", "sleep", "wake_up")]
    assert events.count("generate") >= 2 and events[-1] == "sleep" and events.count("sleep") == 1
    eng.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=4), [1, 2, 3])  # a single-turn call sleeps after it
    assert [e[0] for e in eng.llm.events][-2:] == ["generate", "sleep"]
