"""Scaling out on Ray: rollout workers, data-parallel trainer ranks, weight sync.

    dapo train dist.rollout_workers=2 dist.trainer_ranks=2            # local loopback cluster
    dapo train dist.ray_address=auto dist.rollout_workers=8 dist.trainer_ranks=8 dist.fsdp=true
    dapo train dist.trainer_ranks=2 dist.rollout_on_ranks=true          # ranks sample with their own model

The driver runs the same loop as one process; ``RayEngine`` (rollout) and ``RankGroup`` (training)
stand behind the same two interfaces the loop calls (``RankEngine`` when the ranks sample too).
See the README's "Scaling out".
"""
from dapo.distributed.cluster import Cluster, DistError, start_local_ray, wait_all
from dapo.distributed.ranks import RankEngine, RankGroup, TrainerRank
from dapo.distributed.rollout import RayEngine, RolloutWorker, put_chunks, split_evenly

__all__ = [
    "Cluster", "DistError", "RankEngine", "RankGroup", "RayEngine", "RolloutWorker", "TrainerRank", "put_chunks",
    "split_evenly", "start_local_ray", "wait_all",
]
