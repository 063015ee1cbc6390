"""A trainer rank's place among the data-parallel ranks, and the collectives the update needs.

The token-mean denominator is the valid-token count of the WHOLE mini-batch (all ranks, all micro-batches),
so each rank's loss is a partial sum of the single-process loss and the SUM of the ranks' gradients is
exactly the single-process gradient; ``DataParallel.reduce_grads`` does that sum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel trainer ranks; rank 0 of 1 is a single process."""

    rank: int = 0
    world: int = 1
    fsdp: bool = False
    """Parameters are FSDP2-sharded: FSDP reduces gradients itself, and every rank must run the same
    number of forward/backward passes (its all-gathers are collectives), so short ranks run empty ones."""
    device: torch.device = torch.device("cpu")
    """Where this rank's collective tensors live: NCCL takes CUDA tensors only."""
    bucket_numel: int = 1 << 24
    """Gradients are all-reduced in flat buckets of at most this many elements."""

    def share(self, idx: list[int], rank: int | None = None) -> list[int]:
        """Rank ``rank``'s (default: this rank's) responses of ``idx``: strided, so shares differ by at most one."""
        return idx[self.rank if rank is None else rank :: self.world]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (a no-op on one rank). ``t`` must be on ``device``."""
        if self.world > 1:
            assert t.device == self.device, f"collective tensor on {t.device}, this rank's device is {self.device}"
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def sum_scalar(self, x: float) -> float:
        """A float summed over ranks (the loss), in float64 on the rank's device."""
        return self.all_reduce(torch.tensor([x], dtype=torch.float64, device=self.device)).item()

    def reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum the ranks' partial gradients, so every rank holds the whole mini-batch's gradient (its shard
        of it under FSDP)."""
        if self.world == 1:
            return
        if self.fsdp:  # FSDP2 reduce-scattered in the last backward, as a MEAN over ranks (gloo has no
            for p in model.parameters():  # pre-scaled sum); the losses already carry the global denominator
                if p.grad is not None:
                    p.grad.mul_(self.world)
            return
        params = [p for p in model.parameters() if p.requires_grad]
        # a parameter no rank touched keeps grad None (as in one process: AdamW then skips it); one
        # that only some ranks touched gets zeros on the others so the sum lines up
        touched = self.all_reduce(torch.tensor([float(p.grad is not None) for p in params], device=self.device))
        params = [p for p, t in zip(params, touched.tolist()) if t > 0]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        for i, p in enumerate(params):
            bucket.append(p.grad)
            if i == len(params) - 1 or sum(g.numel() for g in bucket) + params[i + 1].numel() > self.bucket_numel:
                flat = self.all_reduce(torch.cat([g.reshape(-1) for g in bucket]))
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
                bucket = []

    def gather_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Add up per-rank metric sums (keys may differ: a rank without data has none). Python objects go
        over the object-collective group (gloo), never NCCL."""
        if self.world == 1:
            return sums
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, sums)
        out: dict[str, float] = {}
        for p in parts:
            for k, v in p.items():
                out[k] = out.get(k, 0.0) + v
        return out


def whole_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) as the whole tensor; a plain tensor as is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
