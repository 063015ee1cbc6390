"""Rollout on Ray: N workers, each owning an engine on its own copy of the model.

``RayEngine`` is a ``RolloutEngine``: ``generate`` cuts the prompts into N contiguous slices (a
prompt's G samples are drawn by one worker, so groups stay whole), runs the slices in parallel and
concatenates the completions in prompt order. Every sample is seeded from its prompt's seed, so the
result does not depend on N.

Weights travel as chunks of about ``dist.weight_chunk_mb`` through the Ray object store: the sender
holds one chunk at a time in its own memory, each worker copies one chunk at a time into its model,
and the new version is stamped only when every tensor has arrived, so ``Completion.weight_version``
proves which weights sampled it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import ray
import torch
from ray.exceptions import RayActorError

from dapo.config import Config
from dapo.distributed.cluster import Cluster, DistError, actor_death_reason, wait_all, where
from dapo.rollout.base import Completion, Fingerprints, SamplingParams, WeightSyncError, weight_fingerprints

ChunkRefs = list  # list[ray.ObjectRef], each a dict[str, Tensor] of about dist.weight_chunk_mb


def put_chunks(tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int, dtype: torch.dtype | None = None,
               fingerprints: Fingerprints | None = None, skip: set[str] = frozenset()) -> tuple[ChunkRefs, int]:
    """Put (name, tensor) pairs into the object store in chunks; returns (chunk refs, tensor count).

    ``tensors`` may be a generator (e.g. FSDP parameters gathered one by one): at most one chunk is
    held in this process at a time. ``dtype``: the samplers' (``RolloutEngine.weight_dtype``); floating-point
    tensors are cast to it on their device, before they leave (float32 master weights to bfloat16 samplers:
    half the bytes through the object store). ``fingerprints``: filled with those of what was put, in the
    dtype put, except for the names in ``skip`` (tied copies).
    """
    refs, chunk, size, n = [], {}, 0, 0
    for name, t in tensors:
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if fingerprints is not None and name not in skip:
            fingerprints.update(weight_fingerprints([(name, t)]))
        chunk[name] = t.cpu()
        size += t.numel() * t.element_size()
        n += 1
        if size >= chunk_bytes:
            refs.append(ray.put(chunk))
            chunk, size = {}, 0
    if chunk:
        refs.append(ray.put(chunk))
    return refs, n


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of ``parts`` contiguous slices of range(n), sizes differing by at most one."""
    q, r = divmod(n, parts)
    bounds, s = [], 0
    for k in range(parts):
        e = s + q + (k < r)
        bounds.append((s, e))
        s = e
    return bounds


def sample_in_slices(prompts: Sequence[Sequence[int]], seeds: Sequence[int], parts: int,
                     run: Callable[[list[tuple[int, list[list[int]], list[int]]]], dict[int, list[Completion]]]
                     ) -> list[Completion]:
    """Sample ``prompts`` in ``parts`` contiguous slices (a prompt's samples stay in one): ``run`` gets
    (part k, its prompts, their seeds) for every non-empty slice, answers {k: completions}; the result is
    every completion in prompt order, with ``prompt_index`` counted over all the prompts."""
    assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts"
    bounds = {k: (s, e) for k, (s, e) in enumerate(split_evenly(len(prompts), parts)) if e > s}
    res = run([(k, [list(p) for p in prompts[s:e]], list(seeds[s:e])) for k, (s, e) in bounds.items()])
    out: list[Completion] = []
    for k, (s, _) in bounds.items():
        for c in res[k]:
            c.prompt_index += s
            out.append(c)
    return out


class RolloutWorker:
    """A Ray actor owning one rollout engine (HF or vLLM) on its own copy of the model."""

    def __init__(self, cfg: Config, path: str, pad_id: int, eos: list[int], use_gpu: bool):
        self.whole = cfg.model.lora_rank > 0
        """LoRA: the pushes carry adapter tensors only (megabytes), applied in one call once all have arrived
        (a vLLM engine turns them into one adapter)."""
        device = torch.device("cuda" if use_gpu else "cpu")  # Ray shows the actor only its own GPU
        if cfg.rollout.engine == "vllm":
            from dapo.rollout.vllm import VLLMEngine

            self.engine: Any = VLLMEngine(path, pad_id, eos, cfg)
        else:
            from dapo.model import load_policy, sampler_dtype
            from dapo.rollout.hf import HFEngine

            # a sampler only: its copy of the weights in rollout.dtype / the compute dtype (the trainer keeps
            # float32); under LoRA the base in that dtype with its own float32 adapters, which the pushes fill
            model = load_policy(cfg.model, path, device, sampler_dtype(cfg, device)).eval().requires_grad_(False)
            self.engine = HFEngine(model, pad_id, eos, max_batch=cfg.rollout.batch_size)

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "version": self.engine.weight_version,
                "weight_dtype": self.engine.weight_dtype}

    def weight_mismatch(self, expected: Fingerprints) -> str | None:
        """What the engine's check of its weights against ``expected`` found wrong, or None (a message, not an
        exception: it crosses back to the driver as it is)."""
        try:
            self.engine.check_weights(expected)
        except WeightSyncError as e:
            return str(e)
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        return self.engine.generate(prompts, params, seeds)

    def load_weights(self, refs: ChunkRefs, n_tensors: int, version: int) -> int:
        """Copy the chunks in one at a time; stamp ``version`` only if all ``n_tensors`` arrived and, for an
        HF engine, they named every tensor of the model (every adapter tensor under LoRA) and nothing else."""
        from dapo.model import weights_to_sync

        own = set(weights_to_sync(self.engine.model)) if hasattr(self.engine, "model") else None
        seen: set[str] = set()
        held: dict[str, torch.Tensor] = {}
        for ref in refs:
            chunk = ray.get(ref)
            if own is not None and not own.issuperset(chunk):
                raise DistError(f"weights v{version}: unknown tensors {sorted(set(chunk) - own)[:5]}")
            if self.whole:
                held.update(chunk)
            else:
                self.engine.load_weights(chunk, self.engine.weight_version)  # keep the old version until the end
            seen.update(chunk)
            del chunk
        missing = sorted(own - seen) if own is not None else []
        if len(seen) != n_tensors or missing:
            raise DistError(f"weights v{version}: {len(seen)} of {n_tensors} tensors arrived, missing {missing[:5]}; "
                            f"keeping v{self.engine.weight_version}")
        if self.whole:
            self.engine.load_weights(held, self.engine.weight_version)
        self.engine.weight_version = int(version)
        return self.engine.weight_version

    def set_version(self, version: int) -> None:
        """After a resume the model loaded from the checkpoint already is this version."""
        self.engine.weight_version = int(version)


class RayEngine:
    """The ``RolloutEngine`` interface over N Ray rollout workers.

    A worker that dies is reported with a ``DistError`` naming it, or, while ``dist.worker_restarts``
    lasts, replaced by a new one that first loads the latest weights; the lost slice is then sampled
    again with the same seeds, so the rollout is unchanged. No call waits longer than ``dist.timeout_s``.
    """

    def __init__(self, cfg: Config, path: str, pad_id: int, eos: Sequence[int], cluster: Cluster,
                 log: Callable[[str], None] = print):
        self.cfg, self.path, self.pad_id, self.eos, self.cluster, self.log = cfg, path, pad_id, list(eos), cluster, log
        self.n = cfg.dist.rollout_workers
        self.timeout_s = cfg.dist.timeout_s
        self.chunk_bytes = cfg.dist.weight_chunk_mb << 20
        self.restarts_left = cfg.dist.worker_restarts
        self.restarts = 0
        self._version = 0
        self._latest: tuple[ChunkRefs, int] | None = None  # kept only when workers may be replaced
        self.workers = [self._spawn(k) for k in range(self.n)]
        infos = wait_all([w.info.remote() for w in self.workers], self.names(), self.timeout_s, "starting rollout workers")
        self.where = [where(i) for i in infos]
        self.weight_dtype: torch.dtype | None = infos[0]["weight_dtype"]
        """The workers' engines keep the weights in it (all alike: one config)."""

    def names(self, ks: Iterable[int] | None = None) -> list[str]:
        return [f"rollout worker {k} of {self.n}" for k in (range(self.n) if ks is None else ks)]

    def _spawn(self, k: int) -> Any:
        actor = ray.remote(RolloutWorker).options(**self.cluster.options(k), max_restarts=0)
        return actor.remote(self.cfg, self.path, self.pad_id, self.eos, self.cluster.use_gpu)

    @property
    def weight_version(self) -> int:
        return self._version

    @weight_version.setter
    def weight_version(self, version: int) -> None:
        wait_all([w.set_version.remote(version) for w in self.workers], self.names(), self.timeout_s, "setting the weight version")
        self._version = int(version)

    # -------------------------------------------------------------------------------------------- calls

    def _replace(self, k: int, cause: str) -> None:
        """A new worker k with the latest weights, or a DistError if no restarts are left."""
        if self.restarts_left <= 0:
            raise DistError(
                f"rollout worker {k} of {self.n} ({self.where[k]}) died: {cause}. Set dist.worker_restarts=N "
                f"to replace dead workers with the latest weights, or check the worker's log (ray logs)."
            )
        self.restarts_left -= 1
        self.restarts += 1
        try:
            ray.kill(self.workers[k])
        except Exception:  # noqa: BLE001  already gone
            pass
        self.workers[k] = self._spawn(k)
        w = self.workers[k]
        if self._latest is not None:
            ready = w.load_weights.remote(*self._latest, self._version)
        else:  # no update yet: the weights at model.path are the current ones
            ready = w.set_version.remote(self._version)
        wait_all([ready], self.names([k]), self.timeout_s, f"replacing rollout worker {k}")
        self.where[k] = where(ray.get(w.info.remote(), timeout=self.timeout_s))
        print(f"dapo: rollout worker {k} of {self.n} died ({cause}); replaced it with weights "
              f"v{self._version} ({self.restarts_left} restarts left)", file=sys.stderr)

    def _run(self, call: Callable[[Any, int], Any], ks: Sequence[int], what: str) -> dict[int, Any]:
        """``call(worker, k)`` on workers ``ks`` in parallel; dead workers are replaced and retried (or reported)."""
        pending = {call(self.workers[k], k): k for k in ks}
        out: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise DistError(f"{what}: no answer from {', '.join(self.names(sorted(pending.values())))} within "
                                f"{self.timeout_s:g}s (dist.timeout_s)")
            for ref in ready:
                k = pending.pop(ref)
                try:
                    out[k] = ray.get(ref)
                except RayActorError as e:
                    self._replace(k, f"{what}: {actor_death_reason(e)}")
                    pending[call(self.workers[k], k)] = k
        return out

    # -------------------------------------------------------------------------------------------- RolloutEngine

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        def run(slices):
            args = {k: (ps, ss) for k, ps, ss in slices}
            return self._run(lambda w, k: w.generate.remote(args[k][0], params, args[k][1]), list(args), "generate")

        return sample_in_slices(prompts, seeds, self.n, run)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """From a trainer in this process: chunk the state dict into the object store (in the workers' dtype),
        then sync."""
        refs, n = put_chunks(state_dict.items(), self.chunk_bytes, self.weight_dtype)
        self.load_weight_refs(refs, n, version)

    def check_weights(self, expected: Fingerprints) -> None:
        """Every worker compares what its engine holds with ``expected``; the first that differs is named."""
        ref = ray.put(expected)
        found = self._run(lambda w, k: w.weight_mismatch.remote(ref), range(self.n), "checking the weights")
        for k in sorted(found):
            if found[k] is not None:
                raise WeightSyncError(f"rollout worker {k} of {self.n} ({self.where[k]}): {found[k]}")

    def load_weight_refs(self, refs: ChunkRefs, n_tensors: int, version: int) -> None:
        """Every worker loads the chunks (already in the object store) and stamps ``version``."""
        self._latest = (refs, n_tensors) if self.restarts_left > 0 else None  # a replacement worker loads these
        self._version = int(version)
        self._run(lambda w, k: w.load_weights.remote(refs, n_tensors, version), range(self.n), f"weight sync v{version}")

    def close(self) -> None:
        self.restarts_left = 0  # a call still in flight (an async rollout) must not replace the workers killed here
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001  already gone
                pass
        self.workers = []
        self._latest = None

