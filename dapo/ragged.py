"""Variable-length rows in one flat buffer: how a step's token ids and log-probs travel.

A step at the paper's scale holds 8192 responses of a few thousand tokens each: tens of millions of
token ids and log-probs. As Python lists they cost about 70 bytes a token (an int or float object and a
pointer) and a Python loop wherever they are touched; here they are one tensor (8 bytes a token id, 4 a
log-prob) with row offsets, pickled by Ray and saved by ``torch.save`` as one buffer, and padded into
(B, T) blocks by indexing instead of a loop over rows. Imports only torch (numpy to unpickle): the rollout
layer's ``Completion`` and the trainer's batches both use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Ragged:
    """N rows of different lengths: row i is ``values[offsets[i] : offsets[i + 1]]``.

    >>> r = Ragged.of([[1, 2, 3], [], [4]], torch.long)
    >>> len(r), r.lengths.tolist(), r[2].tolist()
    (3, [3, 0, 1], [4])
    >>> r.padded(torch.tensor([2, 0]), 2).tolist()
    [[4, 0], [1, 2]]
    """

    values: torch.Tensor  # (total,)
    offsets: torch.Tensor  # (N + 1,) int64, offsets[0] == 0, non-decreasing

    def __reduce__(self):
        """Pickled (Ray, multiprocessing) as numpy buffers: several times faster than torch's own tensor
        pickling, which goes through ``torch.save`` per storage (see ``as_numpy``)."""
        return _ragged_from_pickle, (as_numpy(self.values), as_numpy(self.offsets))

    def __post_init__(self):
        assert self.values.dim() == 1 and self.offsets.dim() == 1 and self.offsets.dtype == torch.long, (
            f"Ragged: values must be 1-D and offsets 1-D int64, got {tuple(self.values.shape)}, "
            f"{tuple(self.offsets.shape)} {self.offsets.dtype}")

    @classmethod
    def of(cls, rows: Sequence[Sequence[float] | torch.Tensor], dtype: torch.dtype) -> "Ragged":
        """From per-row sequences (lists or 1-D tensors), copied into one buffer of ``dtype``."""
        parts = [torch.as_tensor(r, dtype=dtype).reshape(-1) for r in rows]
        lens = torch.tensor([len(p) for p in parts], dtype=torch.long)
        offsets = torch.zeros(len(parts) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lens, 0)
        values = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
        return cls(values, offsets)

    def like(self, values: torch.Tensor) -> "Ragged":
        """Other values with these rows (e.g. log-probs of these token ids); shares the offsets."""
        assert values.shape == self.values.shape, f"{tuple(values.shape)} values for rows of {tuple(self.values.shape)}"
        return Ragged(values, self.offsets)

    def clone(self) -> "Ragged":
        return Ragged(self.values.clone(), self.offsets)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        """Row ``i`` (a view)."""
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) int64."""
        return self.offsets[1:] - self.offsets[:-1]

    def tolist(self) -> list[list]:
        vals, offs = self.values.tolist(), self.offsets.tolist()
        return [vals[a:b] for a, b in zip(offs[:-1], offs[1:])]

    def positions(self, idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(sum of their lengths,) int64: where rows ``idx`` lie in ``values``, row after row."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        starts = self.offsets[idx]  # (k,)
        lens = self.offsets[idx + 1] - starts  # (k,)
        shift = starts - (torch.cumsum(lens, 0) - lens)  # each row's start minus where it lands in the output
        return torch.repeat_interleave(shift, lens) + torch.arange(int(lens.sum()))

    def padded(self, idx: torch.Tensor | Sequence[int], T: int, fill: float = 0.0) -> torch.Tensor:
        """(len(idx), T): rows ``idx`` left-aligned, cut at ``T``, ``fill`` after their end."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        starts = self.offsets[idx]  # (k,)
        lens = self.offsets[idx + 1] - starts  # (k,)
        cols = torch.arange(T)
        inside = cols[None, :] < lens[:, None]  # (k, T)
        if self.values.numel() == 0:
            return torch.full((len(idx), T), fill, dtype=self.values.dtype)
        at = (starts[:, None] + cols[None, :]).clamp_(max=self.values.numel() - 1)  # (k, T)
        return torch.where(inside, self.values[at], torch.tensor(fill, dtype=self.values.dtype))


def as_numpy(t: torch.Tensor):
    """A CPU tensor as a numpy array sharing its memory, for pickling: numpy arrays pickle as raw buffers
    (out of band under pickle protocol 5, as Ray sends them), torch tensors through ``torch.save`` per
    storage (~0.15 ms a tensor, and a copy at ~1 GB/s on this machine's CPU). Tensors numpy cannot hold
    (bfloat16, CUDA) are returned as they are."""
    if t.device.type == "cpu" and not t.requires_grad and t.dtype in (torch.int64, torch.int32, torch.float32,
                                                                      torch.float64, torch.bool, torch.uint8):
        return t.numpy()
    return t


def from_pickled(x) -> torch.Tensor:
    """The tensor of ``as_numpy``'s array (copied when the buffer is read-only, as Ray's object store hands
    them out: torch tensors are always writable)."""
    if isinstance(x, torch.Tensor):
        return x
    import numpy as np

    return torch.from_numpy(x if x.flags.writeable else np.array(x))


def _ragged_from_pickle(values, offsets) -> Ragged:
    return Ragged(from_pickled(values), from_pickled(offsets))


__all__ = ["Ragged", "as_numpy", "from_pickled"]
