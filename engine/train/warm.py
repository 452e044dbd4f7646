"""A standby engine's side of engine.run.standby: import a backend, wait for a run, become it.

    python -m engine standby --backend unsloth --minutes 10

The process imports what a run of `backend` imports, listens on its socket, and exits after
`minutes` without a run. A launch (`python -m engine train|resume RUN_DIR` with the same
environment) connects and sends its argv, environment, folder and its stdin, stdout and stderr.
The standby says yes only to a single-process run that trains with its backend, then takes the
three descriptors as its own and runs the launch's `main` in this process; its exit status goes
back to the launch, which relays it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import allocator
from engine.run import distributed, runs, standby

# What every run imports after `hello`, beyond its backend's prepare(): imported here, before the
# launch, so that the run finds them loaded. transformers, peft and TRL come after prepare(): the
# Unsloth backend must be imported before them.
WARM_MODULES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "engine.models.loading",
    "engine.train.backends.trainer",
    "engine.train.callback",
    "engine.data.collate",
)


IMPORT_LIMIT_S = 600  # Unsloth's import takes 25-30 s on a GPU box; ten times that is a hang


def warm(backend: str) -> None:
    import importlib

    from engine.train import backends

    backends.get(backend).prepare()
    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def serve(backend: str, minutes: float, main: Callable[[list[str]], int]) -> int:
    """Import `backend`, wait up to `minutes` for a launch, then run it as `main(argv)` (the
    engine's entry point, which skips the hand-over there)."""
    from engine.run.proc import started_at

    # The key is taken before anything (the allocator's setting, Unsloth's import) edits the
    # environment: a launch compares the environment it was given.
    key = standby.env_key(os.environ)
    standby.launch_env.clear()
    standby.launch_env.update(os.environ)
    path = standby.socket_dir() / f"{os.getpid()}.sock"
    entry = standby.Standby(
        pid=os.getpid(),
        backend=backend,
        key=key,
        socket=str(path),
        started=time.time(),
        pid_started=started_at(),
        python=sys.executable,
    )
    signal.signal(signal.SIGTERM, _exit)  # `qlc warm --stop`, or a run starting cold
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # However the import goes (a hung driver call, a lock), the process ends by this time: SIGALRM's
    # default action. A launch that takes it disarms it.
    signal.alarm(int(IMPORT_LIMIT_S + minutes * 60))
    entry.write()
    try:
        allocator.configure()
        t0 = time.monotonic()
        warm(backend)
        print(f"standby {os.getpid()}: {backend} imported in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(4)
        entry.ready = time.time()
        entry.idle_until = entry.ready + minutes * 60
        entry.write()
        return _wait(listener, entry, main)
    finally:
        entry.remove()


def _exit(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _wait(listener: socket.socket, entry: standby.Standby, main: Callable[[list[str]], int]) -> int:
    while (left := entry.idle_until - time.time()) > 0:
        listener.settimeout(left)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            break
        taken = _take(conn, entry)
        if taken is None:
            conn.close()
            continue
        request, fds = taken
        signal.alarm(0)
        listener.close()
        # Other idle standbys hold GPU memory beside the run, as they would beside a cold start.
        standby.stop_all(but=entry.pid)
        status = _become(request, fds, entry, main)
        with contextlib.suppress(OSError):
            conn.settimeout(5)
            conn.sendall(standby.frame({"exit": status}))
        conn.close()
        return status
    print(
        f"standby {entry.pid}: no run came in {(entry.idle_until - entry.ready) / 60:.0f} min",
        file=sys.stderr,
    )
    return 0


def _take(conn: socket.socket, entry: standby.Standby) -> tuple[dict[str, Any], list[int]] | None:
    """The launch's request and descriptors once it is ours: from this user, a run this standby
    may train, and the launch's go after our yes (a launch that gave up meanwhile starts cold, and
    this standby waits on). None, with everything received closed, otherwise."""
    fds: list[int] = []
    try:
        conn.settimeout(standby.REPLY_WAIT_S)
        if standby.peer(conn)[1] != os.getuid():
            raise ValueError("a launch from another user")
        request, fds = standby.receive_with_fds(conn, 3)  # the launch's stdin, stdout, stderr
        reason = decline_reason(request, entry.backend)
        if reason:
            conn.sendall(standby.frame({"declined": reason}))
            raise ValueError(f"declined: {reason}")
        # Out of the registry before the yes, and from here a stop is the run's: SIGTERM and
        # SIGINT (the relay's, or a cold start's sent before it saw the entry gone) are kept for
        # the run's own handler, which replays them (engine/__main__.py).
        signal.signal(signal.SIGTERM, _keep)
        signal.signal(signal.SIGINT, _keep)
        signal.alarm(0)
        entry.path.unlink(missing_ok=True)
        conn.sendall(standby.frame({"accepted": entry.pid}))
        conn.settimeout(None)  # the launch's go, or its end (EOF): no guess at how long it takes
        if not standby.receive(conn).get("go"):
            raise ValueError("no go")
        return request, fds
    except (OSError, ValueError, ConnectionError) as exc:
        print(f"standby {entry.pid}: {exc}; still waiting", file=sys.stderr)
        for fd in fds:
            os.close(fd)
        if standby.pending_signals:  # asked to stop while it was about to be a run
            raise SystemExit(0) from None
        signal.signal(signal.SIGTERM, _exit)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if entry.ready and not entry.path.exists():
            entry.write()  # back in the registry
        return None


def _keep(signum: int, _frame: object) -> None:
    standby.pending_signals.append(signum)


def decline_reason(request: dict[str, Any], backend: str) -> str:
    """Why this standby must not train the launch (empty: it may). It reads the run's config and
    resolves its backend as the run would; any trouble there is the cold start's to report."""
    from engine.config import load_resolved
    from engine.train import backends

    argv = request.get("argv") or []
    if len(argv) < 2 or argv[0] not in ("train", "resume"):
        return "not a training launch"
    try:
        run_dir = Path(request.get("cwd") or ".") / argv[1]
        cfg = load_resolved(run_dir / runs.CONFIG)
        if distributed.processes_per_node(cfg) != 1:
            return "the run starts several processes"
        name, _ = backends.choose_backend(cfg, backends.choose_device(cfg))
    except Exception as exc:  # the cold start reports it, in its own words
        return f"its config does not resolve here ({exc.__class__.__name__})"
    if name != backend:
        return f"the run trains with {name}, this engine imported {backend}"
    return ""


def _become(
    request: dict[str, Any], fds: list[int], entry: standby.Standby, main: Callable[[list[str]], int]
) -> int:
    """Take the launch's place: its stdin, stdout and stderr, environment and folder; then its main."""
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    standby.adopt_environment(request["env"])
    os.chdir(request.get("cwd") or "/")
    launched = float(request.get("started") or time.time())
    standby.served.update(started=launched, waited=max(0.0, launched - entry.ready), pid=entry.pid)
    return main(list(request["argv"]))
