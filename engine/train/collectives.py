"""What the ranks of a multi-process run do together: take rank 0's commands at the same optimizer
step, report their devices for the step events, and finish together.

Every function here is called by every rank at the same point of training (a collective); with
one process each is a plain local call. The process group is the one the trainer (accelerate)
set up: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from typing import Any

from engine import protocol
from engine.run.control import CommandQueue
from engine.run.distributed import Ranks

GIB = 1024**3
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask the kernel for `sig` when torchrun (our parent) dies, however it dies: the ranks then
    stop, rank 0 saving a checkpoint, instead of training on as orphans. Linux only; elsewhere
    torchrun's own shutdown is all there is."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class SharedCommands:
    """Rank 0's command queue, seen by every rank: `drain` is called by all ranks at each optimizer
    step boundary and returns the same commands everywhere, so a stop, a save or a sample happens
    at the same step on every rank. Other ranks' own queues (a SIGTERM torchrun forwarded) are
    ignored: rank 0 got the same signal."""

    def __init__(self, queue: CommandQueue, ranks: Ranks) -> None:
        self._queue = queue
        self._ranks = ranks

    def put(self, command: protocol.Command) -> None:
        self._queue.put(command)

    def drain(self) -> list[protocol.Command]:
        if not self._ranks.distributed or not _initialized():
            return self._queue.drain()
        import torch.distributed as dist

        mine = [protocol.encode(c) for c in self._queue.drain()] if self._ranks.is_main else None
        box: list[Any] = [mine]
        dist.broadcast_object_list(box, src=0)
        return [protocol.decode_command(line) for line in box[0] or []]


def _nvml(local_index: int) -> tuple[float | None, float | None]:
    """(device memory used in GiB, utilisation %) of this rank's GPU, through torch's NVML helpers
    (they map CUDA_VISIBLE_DEVICES to the physical device). None where NVML is missing."""
    import torch

    used = util = None
    with contextlib.suppress(Exception):  # no NVML (or no permission): leave it out
        util = float(torch.cuda.utilization(local_index))
    with contextlib.suppress(Exception):
        used = torch.cuda.device_memory_used(local_index) / GIB
    return used, util


def device_stat(ranks: Ranks, device: str, host_rss_gb: float | None) -> protocol.DeviceStat:
    """This rank's device now."""
    if device == "cuda":
        import torch

        index = torch.cuda.current_device()
        used, util = _nvml(index)
        return protocol.DeviceStat(
            rank=ranks.rank,
            device=f"cuda:{index}",
            memory_allocated_gb=torch.cuda.memory_allocated(index) / GIB,
            memory_peak_reserved_gb=torch.cuda.max_memory_reserved(index) / GIB,
            memory_used_gb=used,
            utilization_pct=util,
            host_rss_gb=host_rss_gb,
        )
    return protocol.DeviceStat(rank=ranks.rank, device="cpu", host_rss_gb=host_rss_gb)


def gather_devices(ranks: Ranks, device: str, host_rss_gb: float | None) -> list[protocol.DeviceStat]:
    """Every rank's DeviceStat, in rank order (on every rank); [] for a single process."""
    if not ranks.distributed or not _initialized():
        return []
    import msgspec
    import torch.distributed as dist

    mine = msgspec.to_builtins(device_stat(ranks, device, host_rss_gb))
    everyone: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(everyone, mine)
    return [msgspec.convert(d, protocol.DeviceStat) for d in everyone]


def barrier() -> None:
    """Wait for every rank: rank 0 releases the run's lock (the run reads as ended) only once the
    others are done with the run too."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def samples_here(ranks: Ranks, sharded: bool) -> bool:
    """Who generates a live sample. DDP: rank 0 alone (it holds the whole model; the other ranks
    wait for it at the next step's all-reduce). FSDP: every rank, since each forward gathers the
    sharded weights from all of them; only rank 0's emitter writes the tokens."""
    return not ranks.distributed or ranks.is_main or sharded
