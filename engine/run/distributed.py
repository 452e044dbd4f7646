"""More than one process per run: how many, how they are started, and who each one is.

A run with `hardware.gpus: N` (N > 1, or `auto` finding several GPUs) is started through PyTorch's
own launcher, `python -m torch.distributed.run` (torchrun), one engine process per GPU. torchrun
hands each process its place in environment variables (RANK, LOCAL_RANK, WORLD_SIZE, ...), which
`Ranks.from_env` reads. Only global rank 0 speaks for the run: it holds the run's lock, writes the
events, checkpoints and final adapter, and reads commands (stdin, the control FIFO); it passes
them to the other ranks at each optimizer step (engine/train/collectives.py).

With `hardware.device: cpu`, `gpus: N` means N CPU processes over gloo: the same code path on a
machine without GPUs, which is how the test suite runs it. `QLC_TORCHRUN=1` starts even one process
through torchrun (a world of one): the multi-process path on a machine with one GPU.

Every wait between processes has a limit (`Timeouts`, from the environment) and ends in one line
naming what was waited for, for how long, and what to do (`WaitTimeout`).

Pure Python (no torch): the launcher, and so the console, import this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine import protocol
from engine.config import RunConfig
from engine.errors import UserError

FORCE_TORCHRUN = "QLC_TORCHRUN"  # 1: start even one process through torchrun (a world of one)
STACKS = "stacks-rank{rank}.log"  # every thread's stack of one rank, dumped on SIGUSR1 or a stall


class WaitTimeout(UserError):
    """A wait between processes ran past its limit. Its message names what was waited for and for
    how long; its hint what to do. Reaches the console as an ErrorEvent of kind `timeout`."""

    kind = "timeout"


TIMEOUT_ENV = {
    "rendezvous_s": "QLC_RDZV_TIMEOUT_S",
    "collective_s": "QLC_COLLECTIVE_TIMEOUT_S",
    "sources_s": "QLC_SOURCES_TIMEOUT_S",
    "stall_s": "QLC_STALL_DUMP_S",
}


@dataclass(frozen=True)
class Timeouts:
    """How long the processes of a run wait for one another, in seconds. Generous by default (a
    big model's checkpoint or a long live sample keeps the other ranks waiting); each can be set
    in the environment of `qlc train` / `qlc resume` (and `qlc join`), which the engine inherits."""

    rendezvous_s: float = 600.0  # torchrun's rendezvous: every host's torchrun has joined
    collective_s: float = 1800.0  # process group start (NCCL init), the command handoff, barriers
    sources_s: float = 600.0  # other ranks: rank 0's sources.json, while rank 0 writes no event
    stall_s: float = 1800.0  # no optimizer step for this long: dump every thread's stack (0: never)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Timeouts:
        env = os.environ if env is None else env
        values: dict[str, float] = {}
        for field, name in TIMEOUT_ENV.items():
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if value < 0 or (value == 0 and field != "stall_s"):
                raise UserError(
                    f"{name}={raw!r}: expected a number of seconds above 0",
                    "unset it for the default"
                    + (" (0 turns the stack dumps off)" if field == "stall_s" else ""),
                )
            values[field] = value
        return cls(**values)

    @classmethod
    def variable(cls, field: str) -> str:
        return TIMEOUT_ENV[field]


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
    """CUDA GPUs this process may use, without torch: CUDA_VISIBLE_DEVICES if set, else NVML (0
    where NVML cannot answer)."""
    return _count_gpus(no_driver=lambda: 0, unanswered=0) or 0


def known_gpus() -> int | None:
    """CUDA GPUs this process may use, or None where that cannot be told without torch: NVML
    failed on a machine that has the CUDA driver library (a Jetson has CUDA but no NVML). No
    NVML library and no CUDA driver library: no GPU."""

    def no_driver() -> int | None:
        import ctypes.util

        return None if ctypes.util.find_library("cuda") else 0

    return _count_gpus(no_driver=no_driver, unanswered=None)


def _count_gpus(no_driver: Callable[[], int | None], unanswered: int | None) -> int | None:
    """CUDA_VISIBLE_DEVICES's count if set, else NVML's: `no_driver()` where NVML cannot start,
    `unanswered` where it cannot be imported or count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import pynvml
    except ImportError:
        return unanswered
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return no_driver()
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError:
        return unanswered
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


def forced_torchrun(env: dict[str, str] | None = None) -> bool:
    """QLC_TORCHRUN=1: one process is started through torchrun too (a world of one)."""
    env = os.environ if env is None else env
    return env.get(FORCE_TORCHRUN, "").strip() in ("1", "true", "yes")


def torchrun_command(
    nproc: int, engine_args: list[str], nodes: Nodes = Nodes(), timeouts: Timeouts | None = None
) -> list[str]:
    """`python -m torch.distributed.run ... -m engine <engine_args>`: torchrun's documented flags,
    nothing home-made. One host: --standalone (a local rendezvous on a free port). Several hosts:
    torchrun's static rendezvous at `nodes.rdzv_endpoint` with the node ranks as given, so that
    node 0, whose console started the run, holds global rank 0 (the c10d rendezvous numbers the
    nodes in the order they arrive).

    Only flags every torchrun since torch 2.4 knows are on the command line: an unknown flag makes
    torchrun exit at once with a usage message (torch 2.11's has no --shutdown-timeout, which is how
    a world of one on a GPU machine never started). Newer settings travel as torchrun's PET_*
    environment variables (`torchrun_env`), which a torchrun without them ignores."""
    timeouts = timeouts or Timeouts.from_env()
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
    rdzv = int(timeouts.rendezvous_s)
    cmd += [
        f"--nproc-per-node={nproc}",
        # How long the hosts' torchruns wait for one another (c10d: join_timeout; static: timeout).
        f"--rdzv-conf=join_timeout={rdzv},timeout={rdzv}",
        "-m",
        "engine",
        *engine_args,
    ]
    return cmd


SHUTDOWN_TIMEOUT_S = 120


def torchrun_env(nodes: Nodes = Nodes()) -> dict[str, str]:
    """torchrun settings newer than torch 2.4, as its PET_<FLAG> environment variables: read by a
    torchrun that has the flag, ignored by one that has not (see `torchrun_command`); and, on one
    host, the loopback interface for NCCL's and gloo's sockets. The launcher sets each only where
    the environment does not already."""
    env = {
        # A stop saves a checkpoint before the processes exit: give them time after a SIGTERM
        # before torchrun's SIGKILL (30 s by default, short for a large model's save; torch 2.12+).
        "PET_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S),
        # torchrun forwards these to the workers; SIGHUP is not one of them (a lost terminal is no
        # reason to stop, and the run has none: it runs in its own session).
        "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT",
    }
    if not nodes.multi_host:
        # One host: the rendezvous and the workers' store on the loopback address, not on the
        # address torchrun would look up for the host's name (socket.getfqdn(): slow, or a name
        # that does not resolve, on a machine without DNS). NCCL's bootstrap and gloo too: every
        # rank is here (NCCL moves the data itself over NVLink or PCIe, not through sockets).
        env["PET_LOCAL_ADDR"] = "127.0.0.1"
        env["NCCL_SOCKET_IFNAME"] = "lo"
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def is_torchrun(command: list[str]) -> bool:
    return command[1:3] == ["-m", "torch.distributed.run"]


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


# ---------------------------------------------------------------------------------------------
# What the other ranks write, and where a hang shows
# ---------------------------------------------------------------------------------------------


class RankLogSink:
    """The events of a rank other than 0, as one text line each on its stderr (the run's
    engine.log, or its host's log): its errors, warnings and end. Rank 0 alone writes events."""

    def __init__(self, rank: int, stream: object = None) -> None:
        self.rank = rank
        self._stream = stream

    def write(self, line: bytes) -> None:
        try:
            ev = protocol.decode_event(line)
        except protocol.ProtocolError:
            return
        text = None
        if isinstance(ev, protocol.ErrorEvent):
            text = f"error ({ev.kind}): {ev.message}" + (f" (hint: {ev.hint})" if ev.hint else "")
        elif isinstance(ev, protocol.WarningEvent):
            text = f"warning: {ev.message}"
        elif isinstance(ev, protocol.Log) and ev.level in ("warning", "error"):
            text = f"{ev.level}: {ev.message}"
        elif isinstance(ev, protocol.Finished):
            text = f"finished: {ev.status} at step {ev.step}"
        if text is not None:
            stream = self._stream or sys.stderr
            print(f"[rank {self.rank}] {text}", file=stream, flush=True)  # type: ignore[call-overload]

    def close(self) -> None:
        pass


def stack_file(run_dir: Path, rank: int) -> Path:
    return run_dir / STACKS.format(rank=rank)


def rank_processes(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of this host's engine processes that train `run_dir` (torchrun's workers, or the
    one engine of a single-process run); torchrun itself is left out. Linux (/proc)."""
    found: dict[int, int] = {}
    target = str(run_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if target not in argv or b"engine" not in argv or b"torch.distributed.run" in argv:
                continue
            if argv[argv.index(b"engine") - 1] != b"-m":
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), b"0")
        found[int(rank) if rank.isdigit() else 0] = int(entry.name)
    return found


def dump_stacks(run_dir: Path) -> dict[int, Path]:
    """SIGUSR1 to each of this host's rank processes of the run: each writes every thread's stack to
    its RUN_DIR/stacks-rank<R>.log (engine/train/watchdog.py). Returns {rank: file} of those
    signalled."""
    import signal

    files = {}
    for rank, pid in sorted(rank_processes(run_dir).items()):
        # A process still starting has no handler yet, and SIGUSR1 would end it.
        if not _catches(pid, signal.SIGUSR1):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGUSR1)
            files[rank] = stack_file(run_dir, rank)
    return files


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (the SigCgt mask of /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False
