"""What the ranks of a multi-process run do together: start the process group, take rank 0's
commands at the same optimizer step, report their devices for the step events, and finish together.

Every function here is called by every rank at the same point of training; with one process each
is a plain local call. The engine starts the process group itself, before the trainer, with its
own limit (QLC_COLLECTIVE_TIMEOUT_S) and NCCL's communicator made at once, so that a failure to
start shows as that, not as a hang somewhere inside accelerate; accelerate then uses this group.

The waits that are not data (rank 0's commands at each step, the end of the run) go through the
run's TCP store (the one torchrun's workers rendezvous at), with a limit each: a rank that waits
too long raises a WaitTimeout that names what it waited for and which ranks did not come. Past a
limit NCCL itself would only abort the process from its own thread, with no word to the console.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from datetime import timedelta
from typing import Any

from engine import protocol
from engine.errors import UserError
from engine.run.control import CommandQueue
from engine.run.distributed import Ranks, Timeouts, WaitTimeout
from engine.train import faults, watchdog

GIB = 1024**3
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# A limit of our own above the process group's: its own error (a Python exception) comes first.
WATCH_MARGIN_S = 30.0


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


def start_process_group(ranks: Ranks, device: str, sharded: bool, timeouts: Timeouts) -> str | None:
    """Start the run's process group (NCCL on GPUs, gloo on CPUs) and pass one value through it:
    returns a line for the log, or None for a single process (or a group already started).

    The backend is the one accelerate would pick (with FSDP's full state dicts, a gloo group for
    CPU tensors beside NCCL). On GPUs `device_id` makes NCCL build its communicator now, inside
    this wait, and binds the group to the rank's GPU. A rank that does not come within the limit:
    the others fail with one line here (gloo and the store raise; NCCL's start, which cannot time
    out by itself, is cut by the watchdog)."""
    if not ranks.distributed or _initialized():
        return None
    import torch
    import torch.distributed as dist

    kwargs: dict[str, Any] = {}
    if device == "cuda":
        backend, name = ("cuda:nccl,cpu:gloo" if sharded else "nccl"), "NCCL"
        kwargs["device_id"] = torch.device("cuda", ranks.local_rank)
    else:
        backend, name = "gloo", "gloo"
    plural = "s" if ranks.world_size != 1 else ""
    what = f"the process group ({name}, {ranks.world_size} rank{plural}) to start"
    limit = timeouts.collective_s
    hint = (
        "every rank must start: see each rank's lines in engine.log (with NCCL_DEBUG=INFO for NCCL's "
        f"own); {Timeouts.variable('collective_s')} sets the limit"
    )
    faults.stall_at(ranks.rank, "init")
    t0 = time.monotonic()
    start = f"the start of the process group ({name}, {ranks.world_size} rank{plural})"
    with watchdog.waiting(start, limit + WATCH_MARGIN_S, hint):
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=limit), **kwargs)
            # One value through the group: NCCL (or gloo) really carries data between the ranks.
            probe = torch.ones(1, device=kwargs.get("device_id", "cpu"))
            dist.all_reduce(probe)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            waited = time.monotonic() - t0
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            if waited >= limit * 0.9:
                raise WaitTimeout(
                    f"rank {ranks.rank} waited {waited:.0f} s for {what}: {first}", hint
                ) from None
            error = UserError(
                f"rank {ranks.rank}: {what.replace(' to start', '')} did not start: {first}", hint
            )
            error.kind = "distributed"  # type: ignore[attr-defined]
            raise error from None
        if int(probe.item()) != ranks.world_size:
            raise UserError(
                f"rank {ranks.rank}: the process group summed {probe.item()} over {ranks.world_size} ranks"
            )
    return (
        f"process group: {backend}, {ranks.world_size} rank{plural}, started in {time.monotonic() - t0:.1f} s"
    )


_store: Any = None


def _shared_store(timeout_s: float) -> Any:
    """A client of the run's TCP store (torchrun's, at MASTER_ADDR:MASTER_PORT), under a prefix of
    this torchrun session's own."""
    global _store
    if _store is None:
        import torch.distributed as dist

        client = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=timeout_s),
        )
        session = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        _store = dist.PrefixStore(f"qlc/{session}/", client)
    return _store


def _wait_keys(store: Any, keys: list[str], timeout_s: float) -> float | None:
    """Wait for `keys`; None once all are there, else the seconds waited when the store gave up (its
    limit, or a lost connection: the caller tells them apart)."""
    t0 = time.monotonic()
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except RuntimeError:  # DistStoreError (a timeout), or the connection to the store lost
        return time.monotonic() - t0
    return None


def barrier(ranks: Ranks, name: str, what: str, timeout_s: float, hint: str) -> None:
    """Wait until every rank has reached the point `name` (`what` says it for people). Past
    `timeout_s`, raise a WaitTimeout naming the ranks that did not arrive."""
    if not ranks.distributed or not _initialized():
        return
    store = _shared_store(timeout_s)
    keys = [f"barrier/{name}/{r}" for r in range(ranks.world_size)]
    store.set(keys[ranks.rank], b"1")
    waited = _wait_keys(store, keys, timeout_s)
    if waited is None:
        return
    missing = [r for r, key in enumerate(keys) if not _has(store, key)]
    if waited < timeout_s * 0.9:
        raise WaitTimeout(f"rank {ranks.rank} lost the run's store at {what} after {waited:.0f} s", hint)
    who = ", ".join(map(str, missing)) or "?"
    raise WaitTimeout(
        f"rank {ranks.rank} waited {waited:.0f} s at {what}: rank{'s' if len(missing) != 1 else ''} {who} "
        "did not arrive",
        hint,
    )


def _has(store: Any, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except RuntimeError:
        return False


class SharedCommands:
    """Rank 0's command queue, seen by every rank: `drain` is called by all ranks at each optimizer
    step boundary and returns the same commands everywhere, so a stop, a save or a sample happens
    at the same step on every rank. Rank 0 leaves them in the run's store under the boundary's
    number; the others wait for that key (QLC_COLLECTIVE_TIMEOUT_S at most). Other ranks' own
    queues (a SIGTERM torchrun forwarded) are ignored: rank 0 got the same signal."""

    def __init__(self, queue: CommandQueue, ranks: Ranks, timeouts: Timeouts | None = None) -> None:
        self._queue = queue
        self._ranks = ranks
        self._timeouts = timeouts or Timeouts()
        self._boundary = 0  # step boundaries of this session: the same count on every rank
        self.step: int | None = None  # the optimizer step that just ended (watchdog.step_clock)

    def put(self, command: protocol.Command) -> None:
        self._queue.put(command)

    def drain(self) -> list[protocol.Command]:
        if not self._ranks.distributed or not _initialized():
            return self._queue.drain()
        ranks, limit = self._ranks, self._timeouts.collective_s
        where = f"step {self.step}" if self.step is not None else f"step boundary {self._boundary + 1}"
        faults.stall_at(ranks.rank, f"step={self.step}")
        store = _shared_store(limit)
        key = f"commands/{self._boundary}"
        self._boundary += 1
        if ranks.is_main:
            mine = self._queue.drain()
            store.set(key, b"".join(protocol.encode(c) for c in mine))
            if self._boundary > 2:
                # Every rank has read the key two boundaries back: it reached the all-reduce of
                # the step since, which rank 0 has passed.
                with contextlib.suppress(RuntimeError):
                    store.delete_key(f"commands/{self._boundary - 3}")
            return mine
        waited = _wait_keys(store, [key], limit)
        if waited is not None:
            hint = (
                "rank 0 is stuck or gone: its events and engine.log say where (qlc stop writes every "
                f"rank's stacks to the run's stacks-rank*.log); {Timeouts.variable('collective_s')} sets the limit"
            )
            if waited < limit * 0.9:
                raise WaitTimeout(
                    f"rank {ranks.rank} lost the run's store waiting for rank 0's commands after {where}",
                    hint,
                )
            raise WaitTimeout(
                f"rank {ranks.rank} waited {waited:.0f} s for rank 0's commands after {where}", hint
            )
        return [protocol.decode_command(line) for line in store.get(key).splitlines() if line.strip()]


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


def finish(ranks: Ranks, timeouts: Timeouts) -> None:
    """The end of a run that did not fail, on every rank: wait for the others (rank 0 releases the
    run's lock, so that the run reads as ended, only once every rank is done with it), then close
    the process group (NCCL's communicators are torn down here, not in an exit hook)."""
    if not ranks.distributed or not _initialized():
        return
    import torch.distributed as dist

    faults.stall_at(ranks.rank, "end")
    barrier(
        ranks,
        "end",
        "the end of the run" + (" (after rank 0's final save)" if not ranks.is_main else ""),
        timeouts.collective_s,
        "a rank is still saving, or stuck: its lines in engine.log (and stacks-rank*.log) say where; "
        f"{Timeouts.variable('collective_s')} sets the limit",
    )
    with watchdog.waiting("closing the process group", 120.0, "NCCL's teardown hung; the run itself is done"):
        dist.destroy_process_group()


def samples_here(ranks: Ranks, sharded: bool) -> bool:
    """Who generates a live sample. DDP: rank 0 alone (it holds the whole model; the other ranks
    wait for it at the next step's all-reduce). FSDP: every rank, since each forward gathers the
    sharded weights from all of them; only rank 0's emitter writes the tokens."""
    return not ranks.distributed or ranks.is_main or sharded
