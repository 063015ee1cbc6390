"""The rollout-engine interface: token ids in, sampled completions with log-probs out.

Engines know nothing about text or rewards. Each prompt's samples are seeded from (run seed, step,
prompt index), so a rollout is reproducible whatever the batch it is part of.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch

from dapo.ragged import as_numpy, from_pickled


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Samples per prompt (G)."""
    max_new_tokens: int = 24
    """Stop after this many generated tokens (finish_reason 'length')."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = off."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after emitting any of these (finish_reason 'stop'); the token is kept."""


@dataclass(eq=False)
class Completion:
    prompt_index: int
    """Index of the prompt in the ``generate`` call."""
    token_ids: torch.Tensor
    """(T,) int64: generated tokens, including the stop token when finish_reason == 'stop'. Lists are
    converted on construction. Its own storage, not a view into a batch's buffer: a completion is pickled
    (Ray) and saved (carried groups in checkpoints) on its own, and a view would carry the whole buffer."""
    logprobs: torch.Tensor
    """(T,) float32: log pi(token | prefix) under the sampling distribution (after temperature, before
    top-p/top-k). Lists are converted on construction."""
    finish_reason: str
    """'stop' (a stop token was generated) or 'length' (max_new_tokens reached: truncated); a multi-turn
    trajectory (``dapo.rollout.multiturn``): 'stop' (the environment said done), 'length' (its token budget ran
    out) or 'turns' (``rollout.max_turns`` turns and the environment still not done)."""
    weight_version: int = 0
    """Version of the weights that produced it (proves the rollout used the latest policy)."""
    mask: torch.Tensor | None = None
    """(T,) bool: True on tokens the model sampled, False on tokens an environment appended (observations, whose
    ``logprobs`` are 0); None = every token is the model's. Lists are converted on construction."""

    def __post_init__(self):
        self.token_ids = torch.as_tensor(self.token_ids, dtype=torch.long)
        self.logprobs = torch.as_tensor(self.logprobs, dtype=torch.float32)
        if self.token_ids.dim() != 1 or self.token_ids.shape != self.logprobs.shape:
            raise ValueError(f"Completion: token_ids {tuple(self.token_ids.shape)} and logprobs "
                             f"{tuple(self.logprobs.shape)} must be 1-D and of equal length")
        if self.mask is not None:
            self.mask = torch.as_tensor(self.mask, dtype=torch.bool)
            if self.mask.shape != self.token_ids.shape:
                raise ValueError(f"Completion: mask {tuple(self.mask.shape)} and token_ids "
                                 f"{tuple(self.token_ids.shape)} must be of equal length")

    @property
    def n_model_tokens(self) -> int:
        """Tokens the model sampled (all of them without a mask)."""
        return len(self.token_ids) if self.mask is None else int(self.mask.sum())

    def __eq__(self, other: object) -> bool:
        """Equal fields (tensors by value: ``torch.equal``)."""
        if not isinstance(other, Completion):
            return NotImplemented
        return (self.prompt_index, self.finish_reason, self.weight_version) == (
            other.prompt_index, other.finish_reason, other.weight_version) and torch.equal(
            self.token_ids, other.token_ids) and torch.equal(self.logprobs, other.logprobs) and (
            (self.mask is None) == (other.mask is None)) and (self.mask is None or torch.equal(self.mask, other.mask))

    __hash__ = None  # mutable, compared by value

    def __reduce__(self):
        """Pickled (Ray: rollout workers -> driver) with numpy buffers for the tensors: about 4x faster than
        torch's per-tensor pickling at a step's 16k completions (``dapo.ragged.as_numpy``)."""
        return _completion_from_pickle, (self.prompt_index, as_numpy(self.token_ids), as_numpy(self.logprobs),
                                         self.finish_reason, self.weight_version,
                                         None if self.mask is None else as_numpy(self.mask))


def _completion_from_pickle(prompt_index, token_ids, logprobs, finish_reason, weight_version, mask=None) -> Completion:
    return Completion(prompt_index, from_pickled(token_ids), from_pickled(logprobs), finish_reason, weight_version,
                      None if mask is None else from_pickled(mask))


Fingerprints = dict[str, torch.Tensor]
"""Tensor name -> (3,) float64: the sum, the sum of absolute values and the sum of squares of its elements."""


class WeightSyncError(RuntimeError):
    """A rollout engine holds weights other than the ones pushed to it (stale, partial or corrupted)."""


def _fingerprint(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(3,) float64 sums of ``t`` (cast to ``dtype`` first, as a push would), in chunks of 16M elements so the
    float64 copy stays small."""
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    out = torch.zeros(3, dtype=torch.float64, device=t.device)
    for c in t.reshape(-1).split(1 << 24):
        c = c.double()
        out += torch.stack([c.sum(), c.abs().sum(), c.square().sum()])
    return out.cpu()


def weight_fingerprints(named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> Fingerprints:
    """Fingerprints of (name, tensor) pairs, each cast to ``dtype`` as a push to an engine holding that dtype.

    Whole-tensor sums rather than a sample of rows: they are additive, so an engine that stores tensors fused
    (vLLM's qkv_proj is q, k and v one after the other) or padded with zero rows (vLLM's vocabulary) can still
    be compared tensor group by tensor group; and a float64 reduction reads each weight once, about what one
    decode step reads. They catch a stale, missing, zeroed or corrupted tensor, not a permutation within one
    or a change of a few ulps (below the comparison's tolerance)."""
    return {n: _fingerprint(t, dtype) for n, t in named}


FP_RTOL = 1e-9
"""Relative tolerance of a fingerprint comparison: float64 sums in another order (another device, another
reduction) differ by ~1e-16 x sqrt(elements); a stale or corrupted tensor by far more."""


def compare_fingerprints(expected: Fingerprints, held: Iterable[tuple[tuple[str, ...], torch.Tensor]],
                         where: str = "the rollout engine") -> None:
    """Raise ``WeightSyncError`` unless every tensor of ``expected`` is held with its fingerprint.

    ``held``: (the names of the pushed tensors a held tensor is made of, its fingerprint); one name each for
    an engine that stores tensors as pushed, several for a fused one (their expected fingerprints add up).
    Held tensors that stand for nothing pushed are ignored."""
    covered: set[str] = set()
    for names, fp in held:
        names = tuple(names)
        if not all(n in expected for n in names):
            continue
        want = torch.stack([expected[n] for n in names]).sum(0)
        covered.update(names)
        s, a, q = fp.double().tolist()
        ws, wa, wq = want.tolist()
        tol = FP_RTOL * max(a, wa)
        if abs(s - ws) > tol or abs(a - wa) > tol or abs(q - wq) > FP_RTOL * max(q, wq):
            raise WeightSyncError(
                f"{where} holds other values for {' + '.join(names)} than were pushed (sum {s:.9g} vs {ws:.9g}, "
                f"sum |x| {a:.9g} vs {wa:.9g}, sum x^2 {q:.9g} vs {wq:.9g}): stale, partly loaded or corrupted weights")
    missing = [n for n in expected if n not in covered]
    if missing:
        raise WeightSyncError(f"{where} holds no tensor {missing[0]} of the pushed weights ({len(missing)} missing: "
                              f"{missing[:5]})")


class RolloutEngine(Protocol):
    weight_version: int
    weight_dtype: torch.dtype | None
    """The dtype the engine keeps pushed floating-point weights in (None: it keeps the tensors it is given, e.g.
    the trainer's own model). Pushes are cast to it before they leave the trainer, and fingerprinted in it."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int]
    ) -> list[Completion]:
        """n completions per prompt, grouped: all n of prompt 0, then prompt 1, ... ``seeds[i]`` seeds prompt i."""
        ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the policy's weights (after an optimiser step) and record their version."""
        ...

    def check_weights(self, expected: Fingerprints) -> None:
        """Raise ``WeightSyncError`` naming the first tensor whose held values do not match ``expected``
        (``weight_fingerprints`` of what was pushed), or that the engine does not hold."""
        ...


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, prompt id, ...), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF
