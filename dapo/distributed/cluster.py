"""The Ray cluster a run uses, where each actor goes, and waiting on actors without hanging.

``Cluster`` connects to ``dist.ray_address`` or, when it is empty, starts a local cluster bound to
127.0.0.1 only (no dashboard) and shuts it down at the end. A cluster the caller already started
(``ray.init`` before ``train``) is used as is and left running.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError:  # pragma: no cover - exercised only without ray
    raise ImportError(
        "dist.rollout_workers / dist.trainer_ranks need Ray: pip install 'dapo[ray]' (or pip install ray)"
    ) from None

from dapo.config import DistConfig


class DistError(RuntimeError):
    """A rollout worker or trainer rank died, hung or could not be placed; the message names it."""


_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(num_cpus: int) -> None:
    """A single-machine Ray cluster bound to 127.0.0.1 only, without the dashboard.

    On Linux Ray turns a node address of 127.0.0.1 into the machine's outward address (and its servers
    then listen on every interface) unless it is told this is a single-node cluster; that switch is read
    from the environment by Ray's processes and from a module constant here, so both are set while the
    cluster starts (its processes keep the environment they were started with) and restored after.
    """
    import ray._private.ray_constants as ray_constants

    old_env, old_const = os.environ.get(_SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(_SINGLE_NODE_ENV, None)
        else:
            os.environ[_SINGLE_NODE_ENV] = old_env


class Cluster:
    """Connection to Ray plus the resources each rollout worker and trainer rank asks for.

    Apart: every actor asks for 1 CPU (and 1 GPU when the cluster has GPUs). Colocated: rollout worker
    i and trainer rank i share bundle i of one placement group, half of its CPU and GPU each.
    """

    def __init__(self, d: DistConfig, want_gpu: bool = True, log: Callable[[str], None] = print):
        self.d = d
        self.started = False
        if not ray.is_initialized():
            if d.ray_address:
                ray.init(address=d.ray_address, log_to_driver=True)
            else:
                start_local_ray(max(os.cpu_count() or 1, d.rollout_workers + d.trainer_ranks))
                self.started = True
        res = ray.cluster_resources()
        self.use_gpu = bool(want_gpu and res.get("GPU", 0) >= 1)
        log(f"ray: {'started a local cluster on 127.0.0.1' if self.started else 'connected'}; "
            f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; rollout on {d.rollout_workers} workers, "
            f"training on {d.trainer_ranks} rank(s){' (colocated)' if d.colocate else ''}"
            f"{'; the ranks sample too' if d.rollout_on_ranks else ''}")
        self.pg = None
        if d.colocate:
            n = max(d.rollout_workers, d.trainer_ranks)
            bundle = {"CPU": 1.0, **({"GPU": 1.0} if self.use_gpu else {})}
            self.pg = placement_group([bundle] * n, strategy="PACK")
            try:
                ray.get(self.pg.ready(), timeout=min(d.timeout_s, 600))
            except GetTimeoutError:
                remove_placement_group(self.pg)
                self.close()
                raise DistError(
                    f"dist.colocate: cannot place {n} bundles of {bundle} on this cluster ({res}); "
                    f"add nodes or lower dist.rollout_workers / dist.trainer_ranks"
                ) from None

    def options(self, index: int) -> dict[str, Any]:
        """``.options(...)`` for the rollout worker or trainer rank number ``index``."""
        if self.pg is not None:
            n = len(self.pg.bundle_specs)
            return {"num_cpus": 0.5, "num_gpus": 0.5 if self.use_gpu else 0,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index % n)}
        return {"num_cpus": 1, "num_gpus": 1 if self.use_gpu else 0}

    def close(self) -> None:
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001  the cluster may be gone already
                pass
            self.pg = None
        if self.started and ray.is_initialized():
            ray.shutdown()
            self.started = False


def wait_all(refs: Sequence[Any], names: Sequence[str], timeout_s: float, what: str) -> list[Any]:
    """``ray.get`` every ref, failing fast: the first dead actor raises a ``DistError`` naming it, an
    error inside an actor is re-raised as is, and no answer within ``timeout_s`` names who is silent."""
    pending = {ref: i for i, ref in enumerate(refs)}
    out: list[Any] = [None] * len(refs)
    deadline = time.monotonic() + timeout_s
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            silent = ", ".join(names[i] for i in sorted(pending.values()))
            raise DistError(f"{what}: no answer from {silent} within {timeout_s:g}s (dist.timeout_s)")
        for ref in ready:
            i = pending.pop(ref)
            try:
                out[i] = ray.get(ref)
            except RayActorError as e:
                raise DistError(f"{what}: {names[i]} died ({actor_death_reason(e)})") from None
    return out


def actor_death_reason(e: BaseException) -> str:
    """The first line of Ray's (long) actor-death message."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def where(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('node')}"


NVSWITCH_NCCL_ENV = {"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0"}
"""The NCCL settings reported to help trainer ranks on Ray behind per-actor ``CUDA_VISIBLE_DEVICES`` masking on
NVSwitch nodes (ray issue 61073: all-reduce through Ray actors on H200 nodes far slower than under torchrun; with
both set, small all-reduces ran at full speed there, while 64 MB ones still hung)."""


def nccl_note(env: dict[str, str]) -> str | None:
    """A start-up line naming the NVSwitch NCCL settings the user has not set (None when all are set)."""
    unset = {k: v for k, v in NVSWITCH_NCCL_ENV.items() if k not in env}
    if not unset:
        return None
    return ("note: NCCL trainer ranks on Ray see one GPU each (CUDA_VISIBLE_DEVICES masking), reported to make NCCL "
            "slow or hang on NVSwitch nodes (ray issue 61073); if collectives crawl or hang, start with "
            + " ".join(f"{k}={v}" for k, v in unset.items()) + " in the environment of the Ray workers")
