"""Training past one process: ``torchrun`` (or ``accelerate launch``, which sets the same variables) starts
one process per device with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; ``setup`` turns
them into a process group and the loop asks the returned ``Distributed`` a few questions (``is_main``,
``shard``, ``all_sum``...). Without those variables it is a stand-in that changes nothing: one process
trains exactly as it always did.

How a step is split (so N processes with ``--batch-size b`` compute what one process with batch N·b does):
the task's batch order is made at the global micro-batch size b·N — the very order one process with batch
N·b walks, length-grouped or random — and rank r takes its contiguous part of each global micro-batch
(``shard``). The step's loss is the mean over all label tokens of all ranks: each rank divides its summed
loss by the step's global unit count (``all_sum``) and multiplies it by N, because DDP and FSDP average
gradients over ranks and the average of N·partials is their sum. Equal in fp32 up to rounding, with
dropout 0: each rank draws its own dropout masks (rank r > 0 reseeds with seed + r), so with dropout on,
the runs are equally good but not equal.

Strategies (``--strategy``):

- ``ddp``: torch's DistributedDataParallel, applied in place through ``replicate`` (its composable form,
  as ``fully_shard`` is FSDP's), so the model keeps its parameter names and ``forward`` signature and the
  task never sees a wrapper. DDP's reducer buckets only parameters with ``requires_grad``: the frozen base
  is never all-reduced, nor broadcast at start (the trainable weights are broadcast from rank 0 instead).
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block (the model's ``_no_split_modules``) and the
  root: each rank keeps 1/N of every weight — frozen base, LoRA and AdamW moments — and a block is
  all-gathered for its forward and backward, so a base too big for one device trains. Checkpoints and the
  final adapter gather the trainable weights to full tensors, written by rank 0 in PEFT format.

Rank 0 alone writes (config, metrics, checkpoints, the result); every rank reads the same checkpoint on
resume and restores its own RNG state from it. Start-up errors on any rank are printed once, by rank 0,
and ranks that disagree on the config, the data files' contents or the checkpoint to resume stop with one
line naming the difference. A collective in a training step waits ``--dist-timeout`` seconds for the other
ranks (a hung rank), then the job stops; a dead rank is noticed at once (its connections close, and
torchrun stops the others). Slow phases where ranks legitimately wait for each other (loading the model,
rank 0 writing a checkpoint) wait on a separate group with a long timeout.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lorakit.config import RunConfig, config_to_dict
from lorakit.device import cpu_threads
from lorakit.errors import LorakitError, ReportedElsewhere
from lorakit.fileio import sha256_file
from lorakit.train.checkpoint import rng_tensors

T = TypeVar("T")

# Waits where one rank is legitimately slower (loading a large model, rank 0 writing a checkpoint).
SLOW_PHASE_TIMEOUT = timedelta(minutes=30)
# Settings each machine may choose for itself: not compared across ranks.
PER_MACHINE = {("train", "threads")}


@dataclass
class Distributed:
    """The loop's view of the job. The default is one process: every method is then a no-op or identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    strategy: str = "ddp"
    restarts: int = 0  # torchrun's restart count (--max-restarts): above 0, the run continues from its checkpoint
    device: torch.device | None = None  # this rank's device (cuda:LOCAL_RANK, or cpu)
    _slow_group: Any = None  # gloo, long timeout: start-up agreement, RNG exchange, waiting for rank 0
    _model: nn.Module | None = None
    _model_class: type | None = None  # the model's class before DDP/FSDP swapped in their own

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def cpu_threads(self) -> int:
        """Torch threads for this rank: the process's cores shared among the ranks on this machine."""
        return max(1, cpu_threads() // self.local_world_size)

    def summary(self, batch_size: int, grad_accum: int) -> str:
        backend = "nccl" if self.device is not None and self.device.type == "cuda" else "gloo"
        return (f"{self.world_size} processes ({self.strategy} over {backend}); global batch "
                f"{batch_size * self.world_size * grad_accum} = {batch_size} per rank × {self.world_size} ranks "
                f"× {grad_accum} grad-accum")

    # --- data and sums --------------------------------------------------------------------------------

    def shard(self, ids: list[int]) -> list[int]:
        """This rank's contiguous part of a global micro-batch; parts differ in size by at most one (the
        first ``len % N`` ranks take one more), so each is as length-homogeneous as the batch. Empty when
        the batch has fewer examples than there are ranks (an epoch's last one)."""
        if self.world_size == 1:
            return ids
        n, w, r = len(ids), self.world_size, self.rank
        start = r * (n // w) + min(r, n % w)
        return ids[start:start + n // w + (r < n % w)]

    def all_sum(self, *xs: float) -> list[float]:
        """Each of ``xs`` summed over ranks, in one all-reduce (float64, so counts stay exact); ``xs``
        themselves in one process."""
        if self.world_size == 1:
            return list(xs)
        import torch.distributed as dist

        t = torch.tensor(xs, dtype=torch.float64)
        dist.all_reduce(t)  # the default group: --dist-timeout bounds the wait for a hung rank
        return t.tolist()

    def any_rank(self, *flags: bool) -> list[bool]:
        """Whether each of ``flags`` holds on some rank (a stop signal), in one all-reduce: every rank gets
        the same answers."""
        return [s > 0 for s in self.all_sum(*map(float, flags))]

    def sync_gradients(self, on: bool) -> None:
        """Whether the next backward all-reduces gradients (the last micro-batch of a step) or only
        accumulates them locally (the others): one all-reduce per optimizer step."""
        if self._model is not None:
            self._model.set_requires_gradient_sync(on)

    def seed_ranks(self, seed: int) -> None:
        """After the model is built (the same LoRA init everywhere): rank r > 0 draws its dropout masks and
        other noise from seed + r, so ranks do not repeat each other's masks. Rank 0 goes on as one process."""
        if self.rank:
            random.seed(seed + self.rank)
            torch.manual_seed(seed + self.rank)

    def lost_peer(self, e: BaseException) -> bool:
        """Whether ``e`` is a collective failing because another rank died or hung: NCCL and the store raise
        DistError; gloo a RuntimeError from its transport ("Connection reset by peer", "Timed out")."""
        import torch.distributed as dist

        return self.world_size > 1 and (isinstance(e, dist.DistError) or "gloo" in str(e))

    @staticmethod
    def describe(e: BaseException) -> str:
        """The first sentence of a collective's error, without gloo's source path."""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]

    def error(self, message: str) -> LorakitError:
        """An error every rank reaches together: rank 0 prints it, the others exit without a second line."""
        return LorakitError(message) if self.is_main else ReportedElsewhere(message)

    # --- start-up: agreement and errors ---------------------------------------------------------------

    def together(self, step: Callable[[], T]) -> T:
        """Run ``step`` on every rank, then wait for all of them (long timeout: model loading takes
        different times). If any rank failed with a LorakitError, rank 0 prints the first one (naming the
        rank when it is not rank 0) and every rank stops."""
        if self.world_size == 1:
            return step()
        error, result = "", None
        try:
            result = step()
        except ReportedElsewhere:
            raise
        except LorakitError as e:
            error = str(e)
        errors = [b.decode() for b in self._all_gather_bytes(error.encode())]
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            r, e = failed[0]
            raise self.error(e if r == 0 else f"rank {r}: {e}")
        return result

    def check_same(self, cfg: RunConfig, checkpoint: Path | None) -> None:
        """Stop with one line if any rank's resolved config (but per-machine settings), data files'
        contents or checkpoint to resume differ from rank 0's."""
        if self.world_size == 1:
            return
        facts = {f"{section}.{name}": value for section, fields in config_to_dict(cfg).items()
                 for name, value in fields.items() if (section, name) not in PER_MACHINE}
        for flag, path in (("--data", cfg.data.train), ("--val-data", cfg.data.val)):
            if path:
                facts[f"{flag} {path} sha256"] = _file_sha256(Path(path))
        # every machine must see the output folder (shared storage) to resume from it
        facts[f"the checkpoint to resume in {cfg.train.output}"] = checkpoint.name if checkpoint is not None else None
        blobs = self._all_gather_bytes(json.dumps(facts, sort_keys=True, default=str).encode())
        ours = json.loads(blobs[0])
        for r, blob in enumerate(blobs[1:], start=1):
            theirs = json.loads(blob)
            for key in sorted(set(ours) | set(theirs)):
                if ours.get(key) != theirs.get(key):
                    raise self.error(f"ranks disagree on {key}: rank 0 has {ours.get(key)!r}, rank {r} has "
                                     f"{theirs.get(key)!r}; every rank must run the same config on the same data")

    # --- the model: DDP or FSDP in place --------------------------------------------------------------

    def wrap(self, model: nn.Module) -> None:
        """Make ``model`` data-parallel in place (``--strategy``): parameter names and the model's own
        ``forward`` stay, so the task keeps calling it as before. Call before building the optimizer."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        self._model, self._model_class = model, type(model)
        with torch.no_grad():  # the same starting adapter on every rank, whatever each one initialised
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        if self.strategy == "fsdp":
            self._fully_shard(model)
        else:
            from torch.distributed._composable.replicate import replicate

            # DDP's own start-up broadcast would send the whole frozen base; the trainable part went above
            replicate(model, device_id=self.device, init_sync=False, forward_sync_buffers=False,
                      gradient_as_bucket_view=True)

    def _fully_shard(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from lorakit.lora.layer import LoraLayer

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        blocks = set(getattr(model, "_no_split_modules", None) or ())  # transformers' block classes
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)  # one all-gather per block: only one block is whole at a time
        fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, output head
        # A LoRA layer keeps its base module (for merging) whose weight is still the full original tensor:
        # point it at the sharded one, so the full tensor is freed.
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in ("weight", "bias"):
                    if getattr(module.base_layer, name, None) is not None:
                        module.base_layer._parameters[name] = getattr(module, name)

    # --- checkpoints: gather for saving, scatter after loading -----------------------------------------

    @contextmanager
    def saving(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[dict[str, torch.Tensor]]:
        """Every rank enters; rank 0 writes inside. Yields the RNG states to save (every rank's); inside,
        the model and optimizer look as in one process (FSDP's shards gathered to full tensors). On exit the
        other ranks wait (long timeout) until rank 0 has written."""
        rng = self._all_rng()
        with self._full_state(model, optimizer, write_back=False):
            yield rng
        self._wait()

    @contextmanager
    def loading(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Every rank loads the same checkpoint inside; on exit FSDP keeps each rank's part of it."""
        with self._full_state(model, optimizer, write_back=True):
            yield

    def _all_rng(self) -> dict[str, torch.Tensor]:
        """The RNG states a checkpoint keeps: this process's in one process; rank r's under ``rank{r}.``
        (``load_checkpoint(..., rank=r)`` picks them) alongside rank 0's, in the file rank 0 writes."""
        own = rng_tensors()
        if self.world_size == 1:
            return own
        from safetensors.torch import load, save

        # rank 0's python state goes to trainer_state.json as in one process; the others' travel here
        own["python_random"] = torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8)
        blobs = self._all_gather_bytes(save(own))
        out = {k: v for k, v in own.items() if k != "python_random"}
        for r, blob in enumerate(blobs[1:], start=1):
            out.update({f"rank{r}.{k}": v for k, v in load(blob).items()})
        return out

    @contextmanager
    def _full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, write_back: bool) -> Iterator[None]:
        """The model and optimizer as one process has them: the model's own class back (transformers
        records it in config.json), and under FSDP every trainable parameter and AdamW moment as a full
        tensor on every rank (an all-gather each). ``write_back``: keep this rank's part of the full values
        on exit (after loading a checkpoint into them)."""
        if self.world_size == 1:
            yield
            return
        wrapped_class = type(model)
        model.__class__ = self._model_class
        params: list[tuple[nn.Module, str, nn.Parameter]] = []
        moments: list[tuple[dict, str, Any]] = []
        if self.strategy == "fsdp":
            from torch.distributed.tensor import DTensor

            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if isinstance(p, DTensor) and p.requires_grad:
                        params.append((module, name, p))
                        module._parameters[name] = nn.Parameter(p.full_tensor())
            for state in optimizer.state.values():
                for key, value in list(state.items()):
                    if isinstance(value, DTensor):
                        moments.append((state, key, value))
                        state[key] = value.full_tensor()
        try:
            yield
        finally:
            model.__class__ = wrapped_class
            if write_back and params:
                self._write_back(params, optimizer)
            else:
                for module, name, p in params:
                    module._parameters[name] = p
                for state, key, value in moments:
                    state[key] = value

    @staticmethod
    def _write_back(params: list[tuple[nn.Module, str, nn.Parameter]], optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            for module, name, p in params:
                full = module._parameters[name].data
                # every rank holds the same full tensor: each slices its own part, no communication
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
                module._parameters[name] = p
        for p, state in optimizer.state.items():  # loaded moments are full tensors: shard them like their param
            if isinstance(p, DTensor):
                for key, value in list(state.items()):
                    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == p.shape:
                        state[key] = distribute_tensor(value.to(p.to_local().device), p.device_mesh, p.placements,
                                                       src_data_rank=None)

    # --- plumbing ----------------------------------------------------------------------------------

    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (any length), in rank order, over the long-timeout gloo group. Bytes, not
        pickled objects: nothing a peer sends is ever unpickled."""
        import torch.distributed as dist

        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self._slow_group)
        longest = int(max(s.item() for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8)
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
        bufs = [torch.zeros_like(buf) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf, group=self._slow_group)
        return [bytes(b[:int(s.item())].tolist()) for b, s in zip(bufs, sizes, strict=True)]

    def _wait(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._slow_group)

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def setup(cfg: RunConfig) -> Distributed:
    """The job this process belongs to, from the launcher's environment (torchrun, accelerate launch, or
    any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT): one device per rank
    (cuda:LOCAL_RANK with NCCL, or the CPU with gloo). Without WORLD_SIZE > 1: one process, as ever."""
    t = cfg.train
    if t.strategy == "fsdp" and cfg.model.quantization != "none":
        raise LorakitError(f"--strategy fsdp shards a 16/32-bit base; a quantized base (--quantization "
                           f"{cfg.model.quantization}) is not sharded: use --strategy ddp with it, or "
                           "--quantization none with fsdp")
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in env:
            raise LorakitError(f"WORLD_SIZE is {world_size} but {name} is not set: start lorakit train with "
                               "torchrun or accelerate launch (they set both)")
    import torch.distributed as dist
    from torch.distributed.rendezvous import rendezvous

    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
    restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    timeout = timedelta(seconds=t.dist_timeout)
    # torchrun's store outlives a restart (--max-restarts): under one key prefix, the restarted ranks could read
    # the dead attempt's gloo addresses before the live ones are written ("Connection refused"; seen in 4 of 5
    # restarts here). Each attempt gets its own prefix in the store env:// would use.
    store, rank, world_size = next(rendezvous("env://", timeout=SLOW_PHASE_TIMEOUT))
    store = dist.PrefixStore(f"lorakit/attempt-{restarts}", store)
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise LorakitError(f"LOCAL_RANK {local_rank} but this machine shows {torch.cuda.device_count()} GPUs: "
                               "start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # NCCL for the gradients on the GPU; gloo for the few CPU scalars (unit counts, losses)
        dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    job = Distributed(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
                      strategy=t.strategy, restarts=restarts, device=device,
                      _slow_group=dist.new_group(backend="gloo", timeout=SLOW_PHASE_TIMEOUT))
    if job.is_main:
        print(job.summary(t.batch_size, t.grad_accum), file=sys.stderr, flush=True)
    return job


def _file_sha256(path: Path) -> str:
    try:
        return sha256_file(path)[:16]
    except OSError as e:
        return f"unreadable ({e.strerror})"
