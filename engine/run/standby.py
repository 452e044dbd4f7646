"""Warm engines: a process that has imported a backend's libraries before a run asks for one.

Importing Unsloth takes 25-30 s on a GPU box, the hf stack about 15
(bench/results/import-time-h100-2026-12-05.json): most of a second launch of the same recipe.
After a run ends, its engine starts a standby (`hardware.keep_warm` minutes, then it exits), which
imports the run's backend and waits on a Unix socket. The next `python -m engine train|resume`
started with the same environment hands itself over: its stdin, stdout and stderr travel to the
standby (SCM_RIGHTS), which becomes the run's engine, and the launched process stays as a relay,
signals in and exit status out, so the console, `qlc stop` and the launcher see no difference.

- A standby serves one run, then it is that run's process and ends with it.
- It serves only a run whose backend is the one it imported (Unsloth patches transformers, peft and
  TRL as it loads: an hf run must never train in its process) and only an environment equal to
  the one it started with (`env_key`), less what a new SSH login or terminal changes.
- Its socket lives in a folder only its owner can enter, and it checks each caller's uid.
- While it waits it holds a CUDA context (a few hundred MB on the GPU) that no budget counts: a
  run that starts cold stops every standby first (`stop_all`).

Pure Python: the console lists and stops standbys (`qlc warm`) with this module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.paths import cache_root
from engine.versions import TRAINING_STACK, installed

# What a new login, terminal or multiplexer changes and no library reads at import: left out of
# the comparison, so a standby started from one SSH session serves a launch from the next.
VOLATILE_PREFIXES = (
    "SSH_", "TERM", "TMUX", "STY", "WINDOW", "DISPLAY", "XDG_SESSION_", "XDG_SEAT", "XDG_VTNR",
    "DBUS_", "LC_TERMINAL", "COLORTERM", "LS_COLORS", "KITTY_", "VSCODE_", "WEZTERM_", "ITERM_",
    "TEXTUAL", "MOTD_", "PROMPT_COMMAND", "PS1",
)  # fmt: skip
VOLATILE = {"OLDPWD", "PWD", "SHLVL", "_", "COLUMNS", "LINES", "MAIL", "LOGNAME_SESSION"}

READY_WAIT_S = 90.0  # a launch waits this long for a standby still importing (Unsloth: 25-30 s)
REPLY_WAIT_S = 60.0  # for the standby's yes or no (it reads the run's config and picks a backend)
STOP_WAIT_S = 10.0

# Set in a standby's process once it serves a run: when the relay that handed it over started, for
# the launch breakdown (engine.train.recipe.process_started_at), and a line for the run's log.
served: dict[str, float | int] = {}
# Signals a standby kept while it took a launch, for the run's handler (engine/__main__.py).
pending_signals: list[int] = []
# The environment this engine was launched with, before the allocator or a library edited it
# (engine/__main__.py fills it): a standby kept after the run starts with it.
launch_env: dict[str, str] = {}


def env_key(env: Mapping[str, str], executable: str = sys.executable) -> str:
    """What a standby and a launch must share: the interpreter, the cache folder, the code (the
    engine's files and the training libraries' versions: an update must not train with the old
    ones), and every environment variable but the volatile ones (a setting read at import, such
    as PYTORCH_ALLOC_CONF, CUDA_VISIBLE_DEVICES or a fault plan, must match)."""
    kept = sorted((k, v) for k, v in env.items() if k not in VOLATILE and not k.startswith(VOLATILE_PREFIXES))
    text = json.dumps([executable, str(cache_root()), code_signature(), kept])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@functools.cache
def code_signature() -> str:
    """The engine's source files (name, size, modification time) and the libraries' versions."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*.py")
    )
    return hashlib.sha256(json.dumps([files, installed(TRAINING_STACK)]).encode()).hexdigest()[:16]


def socket_dir() -> Path:
    """A folder of this user's alone, in the temporary folder (a socket path is at most 108
    bytes): the sockets and the registry. Refuses one that someone else owns or can enter."""
    folder = Path(tempfile.gettempdir()) / f"qlc-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{folder} is not this user's private folder")
    return folder


def registry_dir() -> Path:
    """The registry of one cache folder's standbys, inside the private folder (a cache folder may
    be shared with a group, to share its models)."""
    digest = hashlib.sha256(str(cache_root()).encode()).hexdigest()[:12]
    return socket_dir() / f"cache-{digest}"


@dataclass
class Standby:
    """One standby's entry in the registry (<pid>.json), written by itself."""

    pid: int
    backend: str
    key: str
    socket: str
    started: float
    pid_started: float = 0.0  # the process's start (engine.run.proc): a reused pid is not it
    ready: float = 0.0  # when it began listening; 0 while it imports
    idle_until: float = 0.0
    python: str = ""

    @property
    def path(self) -> Path:
        return registry_dir() / f"{self.pid}.json"

    def write(self) -> None:
        folder = registry_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = folder / f".{self.pid}.json.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        sock = Path(self.socket)
        if sock.parent == socket_dir():  # never a path an entry names elsewhere
            sock.unlink(missing_ok=True)

    def alive(self) -> bool:
        """This very process lives: its pid, not a zombie, started when the entry says."""
        from engine.run import proc

        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or a reused pid of another user
            return False
        if proc.state(self.pid) == "Z":
            return False
        return abs(proc.started_at(self.pid) - self.pid_started) < 2.0


def listed() -> list[Standby]:
    """The standbys alive now, oldest first; entries of ended ones are removed."""
    found = []
    folder = registry_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = Standby(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # another version's entry, or gone meanwhile: not ours to judge
        if entry.alive():
            found.append(entry)
        else:
            entry.remove()
    return sorted(found, key=lambda e: e.started)


def stop_all(wait_s: float = STOP_WAIT_S, but: int = 0) -> list[Standby]:
    """End every standby of this cache folder (but pid `but`): SIGTERM, as an idle one exits at
    once; one that has just taken a launch has left the registry and ignores it."""
    stopped = []
    for entry in listed():
        if entry.pid == but or not entry.path.exists():
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(entry.pid, signal.SIGTERM)
            stopped.append(entry)
    deadline = time.monotonic() + wait_s
    while any(e.alive() for e in stopped) and time.monotonic() < deadline:
        time.sleep(0.05)
    for entry in stopped:
        if entry.alive() and entry.path.exists():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(entry.pid, signal.SIGKILL)
                time.sleep(0.05)
        if not entry.alive():  # one that became a run meanwhile keeps its entry's fate to itself
            entry.remove()
    return stopped


def adopt_environment(launch: Mapping[str, str], environ: MutableMapping[str, str] = os.environ) -> None:
    """A standby taking a launch: only what the launch's environment changes against the one the
    standby started with (volatile names, `env_key`) is applied; what the imports set for
    themselves (Unsloth's UNSLOTH_* flags) stays as they left it. The launch's environment is the
    one the next standby starts from."""
    for name, value in launch_env.items():
        if name not in launch:
            environ.pop(name, None)
        elif launch[name] != value:
            environ[name] = launch[name]
    for name in launch.keys() - launch_env.keys():
        environ[name] = launch[name]
    launch_env.clear()
    launch_env.update(launch)


def log_path() -> Path:
    return registry_dir() / "standby.log"


def spawn(backend: str, minutes: float, env: Mapping[str, str]) -> int:
    """Start a standby for `backend` that waits `minutes` for a run, detached like a run's engine;
    its output goes to `log_path()`. Returns its pid."""
    registry_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "standby", "--backend", backend, "--minutes", str(minutes)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=fd,
            start_new_session=True,
            env=dict(env),
            close_fds=True,
        )
    finally:
        os.close(fd)
    return proc.pid


# ---- the wire: 4-byte length, then JSON --------------------------------------------------------


def frame(payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return struct.pack("!I", len(body)) + body


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        data += chunk
    return data


def receive(conn: socket.socket) -> dict:
    (size,) = struct.unpack("!I", recv_exact(conn, 4))
    return json.loads(recv_exact(conn, size))


def send_with_fds(conn: socket.socket, payload: dict, fds: list[int]) -> None:
    """`payload` framed as `receive` reads it, with `fds` riding on its length (SCM_RIGHTS)."""
    data = frame(payload)
    socket.send_fds(conn, [data[:4]], fds)
    conn.sendall(data[4:])


def receive_with_fds(conn: socket.socket, count: int) -> tuple[dict, list[int]]:
    """What `send_with_fds` sent: the payload and exactly `count` descriptors, now this
    process's (closed again when anything is missing or garbled)."""
    head, fds, _flags, _addr = socket.recv_fds(conn, 4, count)
    try:
        if len(fds) != count or len(head) != 4:
            raise ValueError(f"expected {count} descriptors with the message")
        (size,) = struct.unpack("!I", head)
        return json.loads(recv_exact(conn, size)), list(fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def peer(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end (SO_PEERCRED)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


# ---- the launch's side: hand the run over, then relay ----------------------------------------


def candidates(key: str, backend: str | None) -> list[Standby]:
    """This environment's standbys that could serve a run of `backend` (None: any)."""
    return [e for e in listed() if e.key == key and (backend is None or e.backend == backend)]


class _HeldSignals:
    """SIGTERM and SIGINT while the launch looks for a standby: held, then passed to the standby
    that took the run, or re-raised here when none did (as if they had come to a cold start)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.held: list[int] = []
        self.target = 0
        self.before = {sig: signal.signal(sig, self._on) for sig in self.SIGNALS}

    def _on(self, signum: int, _frame: object) -> None:
        if self.target:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.target, signum)
        else:
            self.held.append(signum)

    def forward_to(self, pid: int) -> None:
        self.target = pid
        for signum in self.held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        self.held.clear()

    def restore(self) -> None:
        for sig, handler in self.before.items():
            signal.signal(sig, handler)
        for signum in self.held:
            os.kill(os.getpid(), signum)


def hand_over(argv: list[str], env: Mapping[str, str], backend: str | None, log: object = None) -> int | None:
    """Give this launch to a standby of the same environment: None when none takes it (the caller
    then starts cold), else the run's exit status, once the standby has exited."""
    key = env_key(env)
    if not candidates(key, backend):
        return None
    signals = _HeldSignals()
    deadline = time.monotonic() + READY_WAIT_S
    tried: set[int] = set()
    while not signals.held:
        waiting = [e for e in candidates(key, backend) if e.pid not in tried]
        for entry in (e for e in waiting if e.ready):
            tried.add(entry.pid)
            conn = _offer(entry, argv, env, log)
            if conn is not None:
                signals.forward_to(entry.pid)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                return _relay(conn, entry.pid, log)
        if not any(not e.ready for e in waiting) or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # one is still importing: sooner ready than a cold start
    signals.restore()
    return None


def _say(log: object, text: str) -> None:
    if log is not None:
        print(f"qlc: {text}", file=log, flush=True)  # type: ignore[arg-type]


def _offer(entry: Standby, argv: list[str], env: Mapping[str, str], log: object) -> socket.socket | None:
    """The connection to `entry` once it has taken the run (and been told to go), else None."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(REPLY_WAIT_S)
        conn.connect(entry.socket)
        if peer(conn) != (entry.pid, os.getuid()):
            raise ConnectionError("not the standby its entry names")
        request = {"argv": argv, "env": dict(env), "cwd": os.getcwd(), "started": _process_started()}
        send_with_fds(conn, request, [0, 1, 2])
        answer = receive(conn)
        if "accepted" in answer:
            conn.sendall(frame({"go": True}))  # from here the standby is the run's engine
        else:
            conn.close()
            with contextlib.suppress(OSError, ValueError):
                _say(log, f"warm engine {entry.pid} declined: {answer.get('declined')}")
            return None
    except (OSError, ValueError, ConnectionError):
        conn.close()
        return None  # gone, busy with another launch, never listening, or not ours: start cold
    with contextlib.suppress(OSError, ValueError):
        _say(log, f"handed to warm engine {entry.pid} ({entry.backend}, imports done before the launch)")
    return conn


def _relay(conn: socket.socket, pid: int, log: object) -> int:
    """The run's exit status, once the standby's process has exited (its lock released). Waits on
    both the connection and the process: a child it left behind may hold the connection open."""
    try:
        ended = os.pidfd_open(pid)
    except (OSError, AttributeError):
        ended = None
    status: int | None = None
    try:
        while status is None:
            ready, _, _ = select.select([conn] + ([ended] if ended is not None else []), [], [])
            if conn in ready:
                try:
                    status = int(receive(conn)["exit"])
                except (OSError, ValueError, KeyError, ConnectionError):
                    break
            elif ended is not None and ended in ready:
                conn.settimeout(1.0)  # its status, if it sent one before it ended
                with contextlib.suppress(OSError, ValueError, KeyError, ConnectionError):
                    status = int(receive(conn)["exit"])
                break
    finally:
        conn.close()
    if ended is not None:
        select.select([ended], [], [], 180.0)
        os.close(ended)
    else:
        _wait_exit(pid)
    if status is None:
        with contextlib.suppress(OSError, ValueError):
            _say(log, f"warm engine {pid} ended without an exit status (killed?)")
        return 1
    return status


def _wait_exit(pid: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _process_started() -> float:
    from engine.run.proc import started_at

    return started_at()
