"""Run directories: create, list, find, read and follow events, send commands, tell status.

A run directory (mode 0700) holds everything about one run, so that any console, now or after an
SSH drop, can find it again:

    config.yaml        the resolved RunConfig the engine child reads
    events.jsonl       every event the run has emitted, one JSON line each (the full history)
    control            FIFO (0600): commands from any console, one JSON line each
    lock               held (flock) by the live engine process: held = running
    engine.log         the child's stderr (library warnings, tracebacks of bugs)
    checkpoints/       checkpoint-<step>/ directories written by the trainer
    adapter/           the final LoRA adapter

Pure Python: the console imports this module.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine import protocol
from engine.config import RunConfig, load_resolved
from engine.errors import RunNotFound, UserError
from engine.run import checkpoints as engine_checkpoints

CONFIG = "config.yaml"
EVENTS = "events.jsonl"
CONTROL = "control"
LOCK = "lock"
ENGINE_LOG = "engine.log"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
CHECKPOINT_PREFIX = engine_checkpoints.PREFIX


def runs_root(override: str | os.PathLike[str] | None = None) -> Path:
    """--runs-dir, else $QLC_RUNS_DIR, else the user data folder."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("QLC_RUNS_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("qlora-console")) / "runs"


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9._-]+", "-", text).strip("-")[:40] or "run"


def create_run(root: Path, cfg: RunConfig) -> Path:
    """A new run directory with its resolved config and control FIFO. Called only after the config
    (and data) passed validation, so bad input never leaves a directory behind."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UserError(
            f"runs directory {root}: cannot create it ({exc.strerror or exc})",
            "pass a writable folder with --runs-dir or $QLC_RUNS_DIR",
        ) from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{_slug(cfg.name)}"
    for n in range(1000):
        run_dir = root / (base if n == 0 else f"{base}-{n}")
        try:
            run_dir.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(
                f"runs directory {root}: cannot create a run in it ({exc.strerror or exc})",
                "pass a writable folder with --runs-dir or $QLC_RUNS_DIR",
            ) from None
    else:  # pragma: no cover
        raise UserError(f"{root}: could not create a run directory")
    try:
        os.chmod(run_dir, 0o700)  # mkdir's mode is masked by the umask
        fd = os.open(run_dir / f".{CONFIG}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(cfg.to_yaml())
        os.rename(run_dir / f".{CONFIG}.tmp", run_dir / CONFIG)
        os.mkfifo(run_dir / CONTROL, 0o600)
        os.chmod(run_dir / CONTROL, 0o600)
        (run_dir / CHECKPOINTS).mkdir(mode=0o700)
    except OSError as exc:  # a full disk, say: leave nothing half-made behind
        shutil.rmtree(run_dir, ignore_errors=True)
        raise UserError(f"{run_dir}: cannot create the run ({exc.strerror or exc})") from None
    return run_dir


def run_id(run_dir: Path) -> str:
    return run_dir.name


LAST = ("last", "latest")  # the newest run, by name


def find_run(root: Path, ref: str) -> Path:
    """A run by id, unique id prefix, path, or `last` (the newest)."""
    path = Path(ref).expanduser()
    if (path / CONFIG).is_file():
        return path.resolve()
    candidates = sorted(p for p in root.glob("*") if (p / CONFIG).is_file()) if root.is_dir() else []
    if ref in LAST and candidates:
        return candidates[-1]
    exact = [p for p in candidates if p.name == ref]
    if exact:
        return exact[0]
    matches = [p for p in candidates if p.name.startswith(ref) or ref in p.name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches[:5])
        more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""  # (`qlc runs` lists all)
        raise RunNotFound(f"run {ref!r} is ambiguous: {names}{more}", "give more of the id")
    if not candidates:
        what = "no runs yet" if ref in LAST else f"no run {ref!r}"
        raise RunNotFound(f"{what} under {root}", "there are none yet: start one with `qlc train tiny-demo`")
    raise RunNotFound(f"no run {ref!r} under {root}", "`qlc runs` lists them")


def list_run_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / CONFIG).is_file())


# ---------------------------------------------------------------------------------------------
# Liveness: the engine holds an exclusive flock on RUN_DIR/lock for as long as it lives. The
# kernel drops it when the process dies, however it dies, so a held lock means a live engine.
# ---------------------------------------------------------------------------------------------


def acquire_lock(run_dir: Path) -> int:
    """Called by the engine child. Returns the fd to keep open; raises if another engine holds it."""
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"run {run_dir.name} is already running", "`qlc attach` follows it") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def lock_pid(run_dir: Path) -> int:
    """The pid the engine wrote into its lock (acquire_lock): a warm engine's own, not the launched
    process's. OSError without a lock, ValueError before the engine has written it."""
    return int((run_dir / LOCK).read_text().strip())


def is_running(run_dir: Path) -> bool:
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


CHUNK_BYTES = 4 << 20  # an events file is read at most this much at a time, to bound memory


def read_events(run_dir: Path, offset: int = 0, limit: int | None = None) -> tuple[list[protocol.Event], int]:
    """The complete events from byte `offset` on (at most `limit` bytes of them, when given), and
    the offset after the last complete line. A torn last line (the engine is mid-write, or was
    killed mid-write) is left for the next read; an event type from a newer engine is skipped."""
    path = run_dir / EVENTS
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read() if limit is None else f.read(limit)
            end = data.rfind(b"\n") + 1
            if end == 0 and limit is not None and len(data) == limit:  # one line longer than a chunk
                f.seek(offset)
                data = f.readline()
                end = len(data) if data.endswith(b"\n") else 0
    except FileNotFoundError:
        return [], offset
    return protocol.decode_lines(data[:end]), offset + end


def follow_events(run_dir: Path, poll: float = 0.2, stop_when_done: bool = True) -> Iterator[protocol.Event]:
    """The run's whole history, then new events as they arrive, until a `finished` event is read
    while the engine is no longer running (a resumed run appends after an earlier `finished`)."""
    offset = 0
    while True:
        events, offset = read_events(run_dir, offset)
        yield from events
        if stop_when_done and not is_running(run_dir):
            tail, offset = read_events(run_dir, offset)
            yield from tail
            return
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# Commands through the control FIFO
# ---------------------------------------------------------------------------------------------


def send_command(run_dir: Path, command: protocol.Message) -> None:
    """Write one command line to the run's FIFO. Lines under PIPE_BUF are written atomically, so
    commands from several consoles never interleave; each is read, and applied, once."""
    path = run_dir / CONTROL
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"run {run_dir.name} has no control FIFO", "was it created by qlc?") from None
    if not stat.S_ISFIFO(mode):
        raise UserError(f"{path}: not a FIFO", "the run directory is damaged")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader: no engine is running
            raise UserError(f"run {run_dir.name} is not running", _not_running_hint(run_dir)) from None
        raise
    try:
        os.write(fd, protocol.encode(command))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    id: str
    path: Path
    status: str  # running, completed, stopped, failed, crashed, created
    preset: str
    model: str
    step: int
    total_steps: int
    last_loss: float | None
    started: float
    last_checkpoint: str | None
    error: str | None

    def to_dict(self) -> dict:
        d = self.__dict__.copy()
        d["path"] = str(self.path)
        return d


def chat_rows(ready: protocol.DataReady | None, data_format: str) -> bool:
    """Whether a run's rows went through a chat template: the format its data_ready recorded
    (protocol 1.6), else a pinned data.format. Its samples and its model card prompt as it trained:
    a chat turn, or text to continue (a text run's tokenizer still carries the base's template)."""
    fmt = ready.format if ready is not None and ready.format else data_format
    return fmt not in ("text", "tokens")


def summarize(run_dir: Path) -> RunSummary:
    events, _ = read_events(run_dir)
    # Before the engine says its plan (DataReady), a run set to N steps is at 0 of N, not of 0.
    planned = 0
    try:
        cfg = load_resolved(run_dir / CONFIG)
        preset, model = cfg.name, cfg.model.name_or_path
        planned = cfg.train.max_steps or 0
    except UserError:
        preset = model = "?"
    step, total, loss, ckpt, error = 0, planned, None, None, None
    started = (run_dir / CONFIG).stat().st_mtime
    first_hello = next((ev for ev in events if isinstance(ev, protocol.Hello)), None)
    if first_hello is not None:
        started = first_hello.time or started
    status = session_status(events)
    for ev in events:
        if isinstance(ev, protocol.Step):
            step, total, loss = ev.step, ev.total_steps, ev.loss
        elif isinstance(ev, protocol.DataReady):  # the plan, before the first step is logged
            total = ev.total_steps or total
        elif isinstance(ev, protocol.CheckpointSaved):
            ckpt = ev.path
        elif isinstance(ev, protocol.ErrorEvent):
            error = ev.message
        elif isinstance(ev, protocol.Finished):
            ckpt = ev.last_checkpoint or ckpt
            # Where the session ended: a stop or the last step can fall between logged steps.
            step = max(step, ev.step)
            loss = ev.final_loss if ev.final_loss is not None else loss
    if is_running(run_dir):
        status = "running"
    return RunSummary(run_dir.name, run_dir, status, preset, model, step, total, loss, started, ckpt, error)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: committed with a manifest whose files are all there
    (engine.run.checkpoints). A save cut short is never listed."""
    return engine_checkpoints.complete(run_dir / CHECKPOINTS)


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    found = checkpoints(run_dir)
    if not found:
        if is_running(run_dir):
            raise UserError(
                f"run {run_dir.name} has no checkpoint yet",
                "let it train to its first save, or `qlc stop` it",
            )
        status = last_status(run_dir)
        if status == "completed":
            raise UserError(
                f"run {run_dir.name} kept no checkpoint",
                f"it completed: its final adapter is {run_dir / ADAPTER} (--checkpoint adapter)",
            )
        raise UserError(
            f"run {run_dir.name} has no checkpoint",
            f"{_ended_early(status)}: start it again with `qlc train`",
        )
    if step is None:
        return found[-1]
    for p in found:
        if p.name == f"{CHECKPOINT_PREFIX}{step}":
            return p
    steps = ", ".join(p.name.removeprefix(CHECKPOINT_PREFIX) for p in found)
    raise UserError(f"run {run_dir.name} has no checkpoint at step {step}", f"saved steps: {steps}")


def resolve_adapter(run_dir: Path, checkpoint: str | None) -> Path:
    """`None`: the final adapter if the run completed, else the newest checkpoint; `adapter`;
    a step number; or a checkpoint directory name."""
    if checkpoint in (None, "", "latest"):
        final = run_dir / ADAPTER
        return final if (final / "adapter_config.json").is_file() else find_checkpoint(run_dir)
    if checkpoint in ("adapter", "final"):
        final = run_dir / ADAPTER
        if not (final / "adapter_config.json").is_file():
            raise UserError(
                f"run {run_dir.name} has no final adapter", "it did not complete; name a checkpoint step"
            )
        return final
    step = checkpoint.removeprefix(CHECKPOINT_PREFIX)
    if not step.isdigit():
        raise UserError(f"--checkpoint {checkpoint!r}: expected a step number, 'adapter' or 'latest'")
    return find_checkpoint(run_dir, int(step))


def _not_running_hint(run_dir: Path) -> str:
    status = last_status(run_dir)
    if status == "completed":
        return f"it completed; its adapter is in {run_dir / ADAPTER}"
    if not checkpoints(run_dir):
        return f"{_ended_early(status)}: start it again with `qlc train`"
    return f"`qlc resume {run_dir.name}` continues it"


_ENDED = {"crashed": "crashed", "failed": "failed", "stopped": "was stopped"}


def _ended_early(status: str) -> str:
    """Why a run that is not running has no checkpoint, from its last session's status."""
    if status == "created":
        return "it never started"
    return f"it {_ENDED.get(status, f'ended ({status})')} before its first checkpoint"


def last_status(run_dir: Path) -> str:
    """How the last engine session of the run ended (see `session_status`), from its events file."""
    return session_status(read_events(run_dir)[0])


def session_status(events: list[protocol.Event]) -> str:
    """The status decided by the last engine session (a resume appends a new hello): "created"
    before any hello, that session's `finished` status, or "crashed" if it died without one.
    The process table is not consulted: a live session also reads "crashed" here."""
    status = "created"
    for ev in events:
        if isinstance(ev, protocol.Hello):
            status = "crashed"
        elif isinstance(ev, protocol.Finished):
            status = ev.status
    return status


def resume_point(run_dir: Path) -> Path:
    """The checkpoint a resume would start from, after checking the run can resume at all: it is
    not running and did not complete, it has a checkpoint, and its dataset is the one it started
    with. Raises UserError (one line) otherwise; nothing in the run directory is touched."""
    from engine.run import fingerprint

    if is_running(run_dir):
        raise UserError(f"run {run_dir.name} is running", f"`qlc attach {run_dir.name}` follows it")
    if last_status(run_dir) == "completed":
        # A resume would invent steps past the end, write a checkpoint, rotate an old one out and
        # overwrite the adapter: refuse before anything starts.
        raise UserError(
            f"run {run_dir.name} completed: there is nothing to resume",
            f"its adapter is in {run_dir / ADAPTER}; to train longer, start a new run with a larger "
            "train.max_steps or train.epochs",
        )
    checkpoint = find_checkpoint(run_dir)
    fingerprint.check(run_dir, load_resolved(run_dir / CONFIG))
    return checkpoint
