"""Data-parallel trainer ranks on Ray: M actors in one ``torch.distributed`` group (gloo on CPU, NCCL on GPU).

Every rank holds the model (whole, or an FSDP2 shard when ``dist.fsdp``), its optimiser state and the
same schedule, and runs ``dapo.learner`` - the very code of the single-process path - on its
share of every mini-batch, with the mini-batch's global token count as the loss denominator. Summing
the ranks' gradients (all-reduce; under FSDP2 its reduce-scatter's mean scaled back by the world size) gives exactly
the single-process gradient, and every rank takes the same optimiser step.

``RankGroup`` is the driver's handle: a ``Learner`` (old log-probs, update, weights to the rollout
engine, optimiser state and model files for checkpoints) that fans each call out to the ranks. With
``dist.rollout_on_ranks`` the ranks also sample (``RankEngine``), each with an engine on its own replica.
"""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
import torch
import torch.distributed as tdist

from dapo.config import Config
from dapo.distributed.cluster import Cluster, nccl_note, wait_all, where
from dapo.distributed.rollout import put_chunks, sample_in_slices
from dapo.learner import DataParallel, LocalLearner, TrainBatch, needs_recompute, whole_tensor
from dapo.learner.policy import ResponseLogprobs
from dapo.learner.state import OPTIMIZER_FILE, load_optimizer_state
from dapo.ragged import Ragged
from dapo.rollout.base import Completion, Fingerprints, RolloutEngine, SamplingParams


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _shard(policy: ResponseLogprobs, mesh: Any, compute_dtype: torch.dtype) -> None:
    """FSDP2: each transformer block is one shard unit (HF names them in ``_no_split_modules``), and the
    rest (embeddings, final norm, LM head) belongs to the root unit, ``ResponseLogprobs`` around the LM,
    whose forward is where the trainer uses them. The shards stay float32 (the optimiser's master weights);
    the blocks' parameters are gathered in the compute dtype, the root's in float32 (the LM head computes the
    log-probs, in float32 by design), and gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = set(getattr(policy.lm, "_no_split_modules", None) or [])
    units = [m for m in policy.lm.modules() if type(m).__name__ in blocks]
    if not units:  # the root alone would hold the whole model, gathered: nothing sharded, all the memory used
        raise ValueError(f"dist.fsdp: {type(policy.lm).__name__} names no transformer block class that is in the "
                         f"model (_no_split_modules={sorted(blocks)}); cannot shard it")
    for m in units:
        fully_shard(m, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32))
    fully_shard(policy, mesh=mesh, reshard_after_forward=False,  # the root is needed again in backward
                mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))


def _by_index(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An FQN-keyed optimiser state dict (torch.distributed.checkpoint) in ``optimizer.state_dict()``'s
    integer-keyed form, so checkpoints of 1 and M ranks are interchangeable."""
    idx = {n: i for i, n in enumerate(names)}
    return {"state": {idx[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [idx[k] for k in g["params"]]} for g in osd["param_groups"]]}


def _by_name(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {"state": {names[int(k)]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}


class TrainerRank:
    """One trainer rank (a Ray actor)."""

    def __init__(self, cfg: Config, path: str, pad_id: int, rank: int, world: int, use_gpu: bool,
                 ref_path: str | None = None, eos: list[int] | None = None):
        self.cfg, self.path, self.pad_id, self.rank, self.world, self.use_gpu = cfg, path, pad_id, rank, world, use_gpu
        self.ref_path, self.eos = ref_path, eos
        self.learner: LocalLearner | None = None
        self._batch: TrainBatch | None = None
        self.engine: Any = None
        """This rank's sampler on its own replica (``dist.rollout_on_ranks``)."""

    def address(self) -> tuple[str, int]:
        """Rank 0's rendezvous address for the process group."""
        host = ray.util.get_node_ip_address()
        return host, _free_port(host)

    def setup(self, host: str, port: int) -> dict[str, Any]:
        from dapo.memory import check_device_memory
        from dapo.model import compute_dtype, load_policy, make_optimizer, reference_model

        cfg = self.cfg
        if self.use_gpu:  # Ray shows the actor only its own GPU(s)
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if host in ("127.0.0.1", "localhost") and os.path.exists("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a loopback cluster's ranks talk over loopback
        # tensors go over NCCL on GPUs; Python objects (metric sums) over gloo on the CPU beside it
        tdist.init_process_group("cpu:gloo,cuda:nccl" if self.use_gpu else "gloo", init_method=f"tcp://{host}:{port}",
                                 rank=self.rank, world_size=self.world, device_id=device if self.use_gpu else None,
                                 timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))
        torch.manual_seed(cfg.seed)
        dtype = compute_dtype(cfg.model.dtype, device)
        check_device_memory(cfg, self.path, device, self.world if cfg.dist.fsdp else 1)
        model = load_policy(cfg.model, self.path, device)  # float32, or a compute-dtype base + fp32 adapters
        ref = None
        if cfg.algo.kl_coef > 0:  # replicated even under FSDP: it only runs forward, outside the policy's root
            ref = reference_model(cfg.model, model, self.path, self.ref_path, device)  # None under LoRA: no copy
        policy = ResponseLogprobs(model, dtype, cfg.model.head_tf32)
        if cfg.dist.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            _shard(policy, init_device_mesh(device.type, (self.world,)), dtype)
        optimizer, scheduler = make_optimizer(cfg.optim, model)
        if cfg.dist.rollout_on_ranks:
            from dapo.rollout.hf import HFEngine

            if not self.eos:
                raise ValueError("dist.rollout_on_ranks: the ranks need the stop token ids (RankGroup(eos=...))")
            self.engine = HFEngine(model, self.pad_id, self.eos, max_batch=cfg.rollout.batch_size, compute_dtype=dtype,
                                   merge_lora=cfg.rollout.lora_merge)  # under LoRA: re-merged when the version moves
        self.learner = LocalLearner(cfg, model, optimizer, scheduler, self.pad_id, device, dtype, ref,
                                    DataParallel(self.rank, self.world, cfg.dist.fsdp, device), policy,
                                    sampler_shares_model=self.engine is not None)
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": str(device),
                "samples_the_policy": self.learner.samples_the_policy}

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], version: int) -> list[Completion]:
        """Sample with this rank's replica, whose weights are ``version`` (``dist.rollout_on_ranks``)."""
        self.engine.weight_version = version
        return self.engine.generate(prompts, params, seeds)

    # -------------------------------------------------------------------------------------------- training

    def old_logp(self, batch: TrainBatch) -> tuple[list[int], torch.Tensor]:
        self._batch = batch  # kept for this step's update: the batch crosses to the ranks once
        return self.learner.old_logp_share(batch)

    def update(self, batch: TrainBatch | None, weights: Ragged | None, old_logp: Ragged, step: int) -> dict[str, Any]:
        """``batch`` None: the one ``old_logp`` received this step, under the correction's ``weights``."""
        batch = self._batch.weighted(weights) if batch is None else batch
        self._batch = None
        m: dict[str, Any] = self.learner.update(batch, old_logp, step)
        if not self.learner.dp.fsdp:  # replicated parameters: a fingerprint to compare across ranks
            with torch.no_grad():
                m["_checksum"] = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                              for p in self.learner.model.parameters()
                                              if p.requires_grad]).cpu()  # (n_trained, 2): a frozen base cannot drift
        return m

    # -------------------------------------------------------------------------------------------- weights, state

    def nonfinite_params(self) -> list[str]:
        """This rank's parameters (its shards under FSDP) that hold NaN or inf."""
        with torch.no_grad():
            return [n for n, p in self.learner.model.named_parameters()
                    if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]

    def _resharded(self) -> torch.nn.Module:
        """The model with every FSDP unit back in its sharded state (the root stays gathered after a
        forward that had no backward, e.g. old log-probs of a step whose updates were all skipped)."""
        if self.learner.dp.fsdp:
            for m in self.learner.policy.modules():
                if hasattr(m, "reshard"):
                    m.reshard()
        return self.learner.policy

    def publish_weights(self, chunk_bytes: int, dtype: torch.dtype | None = None
                        ) -> tuple[list, int, Fingerprints] | None:
        """The whole state dict (under LoRA: the adapter tensors only) into the object store in chunks, cast to the
        sampler's ``dtype`` here (rank 0 returns the refs, the tensor count and the fingerprints of what it put).
        Under FSDP each tensor is all-gathered in turn, a collective every rank joins, so only one chunk is ever
        whole here."""
        from dapo.model import tied_copies, weights_to_sync

        self._resharded()
        named = weights_to_sync(self.learner.model)
        fps: Fingerprints | None = {} if self.cfg.rollout.verify_weights else None  # None: nothing to check
        if not self.learner.dp.fsdp:  # no collective: rank 0 alone puts its replica away
            if self.rank:
                return None
            refs, n = put_chunks(named.items(), chunk_bytes, dtype, fps, tied_copies(self.learner.model))
            return refs, n, fps
        done: list = []
        gathered = self._gathered(named, done)
        if self.rank:
            for _ in gathered:
                pass
            return None
        try:
            refs, n = put_chunks(gathered, chunk_bytes, dtype, fps, tied_copies(self.learner.model))
        except BaseException:
            if not done:  # the others wait on the next tensor: they stop now, not at dist.timeout_s
                self._still_publishing(False)
            raise
        return refs, n, fps

    def _gathered(self, named: dict[str, torch.Tensor], done: list) -> Iterator[tuple[str, torch.Tensor]]:
        """Each FSDP tensor whole, an all-gather every rank joins; after each, the ranks agree that rank 0 (which
        puts them into the object store) is still going, so when it fails every rank stops at that point (the
        others quietly: rank 0 reports its own error to the driver). ``done`` gets an item once the last
        tensor's agreement is over (no rank waits any more)."""
        for k, v in named.items():
            yield k, whole_tensor(v)
            if not self._still_publishing(True):
                return
        done.append(True)

    def _still_publishing(self, ok: bool) -> bool:
        """All ranks: whether every rank says ``ok`` (a one-float all-reduce)."""
        return self.learner.dp.sum_scalar(float(ok)) == self.world

    def state_dict(self) -> dict[str, Any] | None:
        """Rank 0's schedule and streak (the optimiser state goes to its own file: ``save_optimizer``)."""
        p = self.learner
        return None if self.rank else {"scheduler": p.scheduler.state_dict(), "bad_streak": p.bad_streak}

    def save_optimizer(self, path: str) -> None:
        """The optimiser state, whole and in the single-process layout, written by rank 0 to ``path`` (under
        FSDP every rank takes part in the gather). It goes straight to the file: sent to the driver it was a
        second and third copy (Ray's and the driver's), which at 0.5B parameters (4 GB of AdamW moments) ran
        a 24 GB machine out of memory."""
        p = self.learner
        if p.dp.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            self._resharded()
            osd = get_optimizer_state_dict(p.policy, p.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            osd = _by_index(osd, [n for n, _ in p.policy.named_parameters()]) if self.rank == 0 else None
        else:
            osd = p.optimizer.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            torch.save(osd, path)

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """``st["optimizer"]`` (a checkpoint of one process), or ``st["optimizer_file"]``: the file each rank
        maps into memory itself (page cache shared between the ranks, no copy through the driver)."""
        p = self.learner
        if not p.dp.fsdp:  # replicated: the single-process learner's own restore
            p.load_state_dict(st)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        osd = _by_name(load_optimizer_state(st), [n for n, _ in p.policy.named_parameters()])
        set_optimizer_state_dict(p.policy, p.optimizer, osd, options=StateDictOptions(full_state_dict=True))
        p.scheduler.load_state_dict(st["scheduler"])
        p.bad_streak = int(st.get("bad_streak", st.get("bad_in_a_row", 0)))

    def save_pretrained(self, path: str) -> None:
        """Hugging Face files of the whole model (under LoRA: the adapter), written by rank 0 (``path`` must be
        visible to it)."""
        from dapo.model import save_model, tied_copies

        p = self.learner
        if not p.dp.fsdp:
            if self.rank == 0:
                save_model(p.model, path)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        sd = get_model_state_dict(self._resharded(), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        tied = tied_copies(p.model)  # lm_head.weight of tied embeddings: gathered by name, it is here twice
        sd = {k.removeprefix("lm."): v for k, v in sd.items() if k.removeprefix("lm.") not in tied}  # .lm: ResponseLogprobs
        if self.rank == 0:  # an unsharded skeleton without memory, so the saved config names the real class
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(p.model.config)
            skeleton.save_pretrained(path, state_dict=sd, safe_serialization=True)
            if getattr(p.model, "generation_config", None) is not None:
                p.model.generation_config.save_pretrained(path)

    def close(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()


class RankGroup:
    """The driver's ``dapo.learner.Learner`` over M ``TrainerRank`` actors. A rank that dies stops the run with a
    ``DistError`` naming it (a process group cannot lose a member); resume from the last checkpoint."""

    def __init__(self, cfg: Config, path: str, pad_id: int, cluster: Cluster, log: Callable[[str], None] = print,
                 ref_path: str | None = None, eos: list[int] | None = None):
        self.cfg, self.cluster = cfg, cluster
        self.m = cfg.dist.trainer_ranks
        self.timeout_s = cfg.dist.timeout_s
        self.names = [f"trainer rank {r} of {self.m}" for r in range(self.m)]
        self.actors = [ray.remote(TrainerRank).options(**cluster.options(r), max_restarts=0)
                       .remote(cfg, path, pad_id, r, self.m, cluster.use_gpu, ref_path, eos) for r in range(self.m)]
        host, port = wait_all([self.actors[0].address.remote()], self.names[:1], self.timeout_s, "starting trainer ranks")[0]
        infos = self._all("setup", host, port, what="starting trainer ranks")
        self.where = [where(i) for i in infos]
        self.samples_the_policy = all(i["samples_the_policy"] for i in infos)  # see old_logp
        self._sent: Ragged | None = None
        """The responses of the batch the ranks hold from this step's ``old_logp`` (sent once a step)."""
        self.bad_streak = 0
        """The ranks' streak of skipped non-finite updates, as rank 0 last reported it."""
        log(f"trainer: {self.m} ranks ({'FSDP2-sharded' if cfg.dist.fsdp else 'replicated'}) on {infos[0]['device']}, "
            f"process group at {host}:{port}")
        note = nccl_note(dict(os.environ)) if cluster.use_gpu else None
        if note:
            log(note)

    def _all(self, method: str, *args: Any, what: str) -> list[Any]:
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return wait_all(refs, self.names, self.timeout_s, what)

    def old_logp(self, batch: TrainBatch) -> Ragged:
        out = batch.behaviour_logp.clone()
        self._sent = None
        if self.samples_the_policy or not needs_recompute(self.cfg):  # nothing to recompute: no batch to send
            return out
        self._sent = batch.responses  # the ranks keep this batch for the update
        for rows, vals in self._all("old_logp", ray.put(batch), what="old log-probs"):
            if rows:
                out.values[batch.responses.positions(rows)] = vals
        return out

    def update(self, batch: TrainBatch, old_logp: Ragged, step: int) -> dict[str, float]:
        kept = self._sent is batch.responses  # the batch the ranks got for old log-probs: send its weights only
        self._sent = None
        outs = self._all("update", None if kept else ray.put(batch), ray.put(batch.weights) if kept else None,
                         ray.put(old_logp), step, what=f"update (step {step})")
        sums = [o.pop("_checksum", None) for o in outs]
        m = outs[0]
        if sums[0] is not None:  # replicated ranks must hold identical parameters: 0.0 or something is wrong
            m["dist/param_sync_err"] = max(float((s - sums[0]).abs().max()) for s in sums)
        self.bad_streak = int(m["actor/bad_streak"])  # rank 0's learner owns the streak; this is its report
        return m

    def push_weights(self, engine: RolloutEngine, version: int) -> Fingerprints | None:
        if isinstance(engine, RankEngine) and engine.group is self:  # the ranks sample with what they train
            engine.weight_version = version
            return None
        refs, n, fps = self._publish("publishing weights", engine.weight_dtype)
        if hasattr(engine, "load_weight_refs"):  # Ray workers fetch the chunks themselves
            engine.load_weight_refs(refs, n, version)
        else:  # an engine in the driver process
            engine.load_weights(self._fetch(refs), version)
        return fps

    def _publish(self, what: str, dtype: torch.dtype | None = None) -> tuple[list, int, Fingerprints | None]:
        return self._all("publish_weights", self.cfg.dist.weight_chunk_mb << 20, dtype, what=what)[0]

    def _fetch(self, refs: list) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for ref in refs:
            sd.update(ray.get(ref, timeout=self.timeout_s))
        return sd

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's tensors (under LoRA: the adapter tensors), gathered in this process (for an engine here)."""
        return self._fetch(self._publish("gathering weights")[0])

    def state_dict(self) -> dict[str, Any]:
        """Schedule and streak; the optimiser state is written by rank 0 into the checkpoint's own
        ``OPTIMIZER_FILE`` by ``save_pretrained`` (a checkpoint is saved with both, in one step)."""
        return {**self._all("state_dict", what="gathering the trainer state")[0], "optimizer_file": OPTIMIZER_FILE}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        # the optimiser state inline (a checkpoint of one process) or its file, by an absolute path by now
        # (load_trainer_state): the ranks must see it, as they see the run directory
        keep = {k: st[k] for k in ("optimizer", "optimizer_file", "scheduler", "bad_streak", "bad_in_a_row") if k in st}
        self._all("load_state_dict", ray.put(keep), what="restoring optimiser state")
        self.bad_streak = int(st.get("bad_streak", st.get("bad_in_a_row", 0)))

    def save_pretrained(self, path: str | Path) -> None:
        """The model files (written by rank 0) and the optimiser state (``OPTIMIZER_FILE``, likewise)."""
        self._all("save_pretrained", str(path), what="saving the model")
        self._all("save_optimizer", str(Path(path) / OPTIMIZER_FILE), what="saving the optimiser state")

    def nonfinite_params(self) -> list[str]:
        """Parameter tensors holding NaN or inf on any rank (each checks its own, or its shards under FSDP)."""
        return sorted({name for names in self._all("nonfinite_params", what="checking the weights") for name in names})

    def close(self) -> None:
        try:
            wait_all([a.close.remote() for a in self.actors], self.names, 30.0, "closing trainer ranks")
        except Exception:  # noqa: BLE001  a dead rank cannot close; kill below either way
            pass
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []


class RankEngine:
    """The ``RolloutEngine`` over the trainer ranks themselves (``dist.rollout_on_ranks``).

    ``generate`` cuts the prompts into contiguous slices, one per rank (a prompt's G samples stay on one
    rank), and each rank samples its slice with an HF engine on its own replica; every sample is seeded
    from its prompt's seed, and the replicas are identical, so the result does not depend on the split.
    The weights never travel: after an update the ranks already hold them, and ``weight_version`` only
    counts. A rank that dies stops the run (a process group cannot lose a member).
    """

    weight_dtype = None  # the weights never travel

    def __init__(self, group: RankGroup):
        self.group = group
        self.weight_version = 0

    def generate(self, prompts: Any, params: SamplingParams, seeds: Any) -> list[Completion]:
        g = self.group

        def run(slices):
            refs = [g.actors[k].generate.remote(ps, params, ss, self.weight_version) for k, ps, ss in slices]
            return dict(zip([k for k, _, _ in slices], wait_all(refs, [g.names[k] for k, _, _ in slices], g.timeout_s,
                                                                "generate")))

        return sample_in_slices(prompts, seeds, g.m, run)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        raise RuntimeError("the ranks sample with the weights they train (dist.rollout_on_ranks): nothing to load")

    def check_weights(self, expected: Fingerprints) -> None:
        """Nothing to check: the ranks sample with the very weights they train."""
