"""More than one process per run: how many, how they are started, and who each one is.

A run with `hardware.gpus: N` (N > 1, or `auto` finding several GPUs) is started through PyTorch's
own launcher, `python -m torch.distributed.run` (torchrun), one engine process per GPU. torchrun
hands each process its place in environment variables (RANK, LOCAL_RANK, WORLD_SIZE, ...), which
`Ranks.from_env` reads. Only global rank 0 speaks for the run: it holds the run's lock, writes the
events, checkpoints and final adapter, and reads commands (stdin, the control FIFO); it passes
them to the other ranks at each optimizer step (engine/train/collectives.py).

With `hardware.device: cpu`, `gpus: N` means N CPU processes over gloo: the same code path on a
machine without GPUs, which is how the test suite runs it.

Pure Python (no torch): the launcher, and so the console, import this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.config import RunConfig
from engine.errors import UserError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run, as torchrun set it (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    torchrun: bool = False  # started by torchrun (even as its only process: a world of one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Train through a process group (DDP or FSDP), with collectives at each step."""
        return self.torchrun or self.world_size > 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Ranks:
        env = os.environ if env is None else env

        def num(name: str, default: int) -> int:
            try:
                return int(env.get(name, default))
            except ValueError:
                return default

        world = num("WORLD_SIZE", 1)
        return cls(
            rank=num("RANK", 0),
            local_rank=num("LOCAL_RANK", 0),
            world_size=world,
            local_world_size=num("LOCAL_WORLD_SIZE", world),
            torchrun="TORCHELASTIC_RUN_ID" in env or "WORLD_SIZE" in env,
        )


@dataclass(frozen=True)
class Nodes:
    """Where this host stands in a run spread over several hosts. One host (the default) needs
    none of it: torchrun's --standalone finds a free local port by itself."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # node 0's host:port, which every node can reach

    @property
    def multi_host(self) -> bool:
        return self.nnodes > 1

    def check(self) -> None:
        if self.nnodes < 1:
            raise UserError(f"--nnodes: must be at least 1, got {self.nnodes}")
        if not self.multi_host and self.node_rank:
            raise UserError("--node-rank: a run on one host has only node 0", "add --nnodes N")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(
                f"--node-rank: {self.node_rank} is not a node of {self.nnodes}",
                f"give 0 to {self.nnodes - 1}; node 0 writes the run's events and checkpoints",
            )
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if self.multi_host and not (host and port.isdigit()):
            raise UserError(
                f"--rdzv-endpoint: {self.rdzv_endpoint or '(none)'!s} is not host:port",
                "every node must reach it, e.g. --rdzv-endpoint node0.cluster:29500",
            )


def visible_gpus() -> int:
    """CUDA GPUs this process may use, without torch: CUDA_VISIBLE_DEVICES if set, else NVML."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError:
        return 0
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def processes_per_node(cfg: RunConfig, gpus_here: int | None = None) -> int:
    """How many engine processes this host starts for `cfg`: hardware.gpus resolved and checked
    against the GPUs present. Raises a UserError naming the field when they cannot be had."""
    hw = cfg.hardware
    if hw.device == "cpu":
        # N CPU processes over gloo; `auto` has no GPUs to count, so it means one.
        return 1 if hw.gpus == "auto" else int(hw.gpus)
    have = visible_gpus() if gpus_here is None else gpus_here
    if hw.gpus == "auto":
        return max(have, 1)
    want = int(hw.gpus)
    if want > 1 and have < want:
        seen = f"{have} CUDA GPU{'s' if have != 1 else ''} {'is' if have == 1 else 'are'} visible"
        if have == 0:
            hint = f"set hardware.gpus=1, or hardware.device=cpu to run {want} CPU processes (gloo)"
        else:
            hint = f"set hardware.gpus={have} (or auto), or check CUDA_VISIBLE_DEVICES"
        raise UserError(f"hardware.gpus: {want} asked for but {seen}", hint)
    return want


def torchrun_command(nproc: int, engine_args: list[str], nodes: Nodes = Nodes()) -> list[str]:
    """`python -m torch.distributed.run ... -m engine <engine_args>`: torchrun's documented flags,
    nothing home-made. One host: --standalone (a local rendezvous on a free port). Several hosts:
    torchrun's static rendezvous at `nodes.rdzv_endpoint` with the node ranks as given, so that
    node 0, whose console started the run, holds global rank 0 (the c10d rendezvous numbers the
    nodes in the order they arrive)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nodes.multi_host:
        host, _, port = nodes.rdzv_endpoint.rpartition(":")
        cmd += [
            f"--nnodes={nodes.nnodes}",
            f"--node-rank={nodes.node_rank}",
            f"--master-addr={host}",
            f"--master-port={port}",
        ]
    else:
        cmd.append("--standalone")
    cmd += [
        f"--nproc-per-node={nproc}",
        # A stop saves a checkpoint before the processes exit: give them time after a SIGTERM
        # before torchrun's SIGKILL (its default is 30 s, short for a large model's save).
        "--shutdown-timeout=120",
        # torchrun forwards these to the workers; SIGHUP is not one of them (a lost terminal is no
        # reason to stop, and the run has none: it runs in its own session).
        "--signals-to-handle=SIGTERM,SIGINT",
        "-m",
        "engine",
        *engine_args,
    ]
    return cmd


def describe(ranks: Ranks, strategy: str, device: str) -> str:
    """'2 x cuda (NCCL, fsdp)' for the hello event; one process says only its device."""
    if not ranks.distributed:
        return device
    backend = "gloo" if device == "cpu" else "NCCL"
    return f"{ranks.world_size} x {device} ({backend}, {strategy})"


def change_processes(run_dir: Path, gpus: str) -> RunConfig:
    """Resume on another number of processes: rewrite the run's hardware.gpus (and nothing else),
    validated, atomically. DDP and FSDP checkpoints hold full state dicts, so any number works; what
    changes is the global batch (micro_batch x grad_accum x processes), hence steps per epoch and
    the order in which the rest of the data is read."""
    from engine.config import config_from_dict, load_resolved
    from engine.run.runs import CONFIG

    path = run_dir / CONFIG
    data = load_resolved(path).to_dict()
    value: int | str = gpus.strip().lower()
    if value != "auto":
        try:
            value = int(value)
        except ValueError:
            raise UserError(f"--gpus {gpus!r}: expected a number or auto") from None
    data["hardware"]["gpus"] = value
    cfg = config_from_dict(data, f"--gpus {gpus}")
    processes_per_node(cfg)
    tmp = path.with_name(f".{CONFIG}.tmp")
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    tmp.rename(path)
    return cfg
