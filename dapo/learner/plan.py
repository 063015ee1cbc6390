"""How a rank cuts its share of a mini-batch into micro-batches, and how each is laid out for the model.

One ``MicroBatchPlan`` per learner, built from ``optim.micro_batch_size`` / ``optim.micro_batch_tokens`` and
the rank's place (``DataParallel``): the old log-prob pass and the update both ask it, so the layout is decided
in one place. Under FSDP every rank must issue the same collectives: the same number of passes (short ranks
run empty ones) and, in each pass, the same number of decoder calls. The shared-prompt prefill runs the
decoder twice, so it is decided for every rank at once: each rank plans every rank's micro-batches from the
same data (no collective) and shares the k-th pass's prompts only if all ranks' k-th micro-batches would.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dapo.learner.parallel import DataParallel
from dapo.learner.policy import PackedBatch, SeqBatch, make_packed_batch, make_seq_batch, shares_prompts

if TYPE_CHECKING:
    from dapo.learner.batch import TrainBatch


def micro_batches_of(idx: list[int], lengths: list[int], size: int, tokens: int = 0) -> list[list[int]]:
    """Micro-batches of ``idx`` (the token-mean gradient does not depend on how they are cut).

    ``tokens`` = 0: length-sorted runs of ``size`` rows (padded to their longest: little padding).
    ``tokens`` > 0: as many sequences as fit in ``tokens`` (``lengths[i]`` each, prompt + response), best-fit
    over the longest first (a near-minimal number of micro-batches, O(n log n)); a sequence longer than the
    budget goes alone. Deterministic: ties break by index.

    >>> micro_batches_of([0, 1, 2, 3], [5, 3, 4, 2], 2)
    [[3, 1], [2, 0]]
    >>> micro_batches_of([0, 1, 2, 3], [5, 3, 4, 2], 0, tokens=7)
    [[0, 3], [2, 1]]
    """
    if tokens <= 0:
        idx = sorted(idx, key=lambda i: lengths[i])
        return [idx[k : k + size] for k in range(0, len(idx), size)]
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (tokens left, bin), sorted: the tightest bin that fits, by bisection
    for i in sorted(idx, key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(rooms, (lengths[i], -1))
        if k == len(rooms):
            bins.append([])
            room, b = tokens, len(bins) - 1
        else:
            room, b = rooms.pop(k)
        bins[b].append(i)
        bisect.insort(rooms, (room - lengths[i], b))
    return bins


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward pass of this rank: its responses (empty: an empty pass, so the collectives line
    up under FSDP) and whether the pass shares each prompt's prefill among its rows."""

    rows: list[int]
    share_prompts: bool = False


class MicroBatchPlan:
    """``plan(batch, rows)``: this rank's micro-batches of ``rows``; ``layout(batch, mb)``: one of them as the
    model's input, padded side by side (``SeqBatch``) or packed into one row (``PackedBatch``)."""

    def __init__(self, size: int, tokens: int, pad_id: int, dp: DataParallel):
        self.size, self.tokens, self.pad_id, self.dp = size, tokens, pad_id, dp
        self.packed = tokens > 0
        """Packed rows (``optim.micro_batch_tokens`` > 0) have no cache to share a prompt's prefill through."""

    def plan(self, batch: "TrainBatch", rows: list[int]) -> list[MicroBatch]:
        lengths = batch.seq_lengths
        dp = self.dp
        lockstep = dp.fsdp and dp.world > 1
        ranks = range(dp.world) if lockstep else [dp.rank]
        cuts = {r: micro_batches_of(dp.share(rows, r), lengths, self.size, self.tokens) for r in ranks}
        mine = cuts[dp.rank]
        if not lockstep:
            return [MicroBatch(mb, self._shares(batch, mb)) for mb in mine]
        n = max(len(c) for c in cuts.values())
        return [MicroBatch(mine[k] if k < len(mine) else [],
                           all(k < len(c) and self._shares(batch, c[k]) for c in cuts.values())) for k in range(n)]

    def _shares(self, batch: "TrainBatch", rows: list[int]) -> bool:
        return not self.packed and shares_prompts([tuple(batch.prompts[i]) for i in rows])

    def layout(self, batch: "TrainBatch", mb: MicroBatch) -> SeqBatch | PackedBatch:
        """No rows: one padding token (the empty pass)."""
        prompts = [batch.prompts[i] for i in mb.rows] or [[self.pad_id]]
        responses = [batch.responses[i] for i in mb.rows] or [[self.pad_id]]
        if self.packed:
            return make_packed_batch(prompts, responses)
        return make_seq_batch(prompts, responses, self.pad_id, share_prompts=mb.share_prompts)
