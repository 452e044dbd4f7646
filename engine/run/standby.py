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
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.paths import cache_root

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
# The environment this engine was launched with, before the allocator or a library edited it
# (engine/__main__.py fills it): a standby kept after the run starts with it.
launch_env: dict[str, str] = {}


def env_key(env: Mapping[str, str], executable: str = sys.executable) -> str:
    """What a standby and a launch must share: the interpreter, the cache folder, and every
    environment variable but the volatile ones (a setting read at import, such as
    PYTORCH_ALLOC_CONF, CUDA_VISIBLE_DEVICES or a fault plan, must match)."""
    kept = sorted((k, v) for k, v in env.items() if k not in VOLATILE and not k.startswith(VOLATILE_PREFIXES))
    text = json.dumps([executable, str(cache_root()), kept])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def registry_dir() -> Path:
    return cache_root() / "standby"


def socket_dir() -> Path:
    """A folder of this user's alone for the sockets, short enough for a socket path (108 bytes):
    $XDG_RUNTIME_DIR, else the temporary folder. Refuses one that someone else owns or can enter."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())
    folder = base / f"qlc-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not folder.is_dir() or folder.is_symlink():
        raise PermissionError(f"{folder} is not this user's private folder")
    return folder


@dataclass
class Standby:
    """One standby's entry in the registry (cache/standby/<pid>.json), written by itself."""

    pid: int
    backend: str
    key: str
    socket: str
    started: float
    ready: float = 0.0  # when it began listening; 0 while it imports
    idle_until: float = 0.0
    python: str = ""

    @property
    def path(self) -> Path:
        return registry_dir() / f"{self.pid}.json"

    def write(self) -> None:
        folder = registry_dir()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{self.pid}.json.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        Path(self.socket).unlink(missing_ok=True)

    def alive(self) -> bool:
        return _alive(self.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child that ended, not yet reaped) has finished: /proc says so.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def listed() -> list[Standby]:
    """The standbys alive now, oldest first; entries of ended ones are removed."""
    found = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            entry = Standby(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if entry.alive():
            found.append(entry)
        else:
            entry.remove()
    return sorted(found, key=lambda e: e.started)


def stop_all(wait_s: float = STOP_WAIT_S) -> list[Standby]:
    """End every standby of this cache folder (SIGTERM: a waiting standby exits at once)."""
    stopped = []
    for entry in listed():
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry.pid, signal.SIGTERM)
            stopped.append(entry)
    deadline = time.monotonic() + wait_s
    while any(e.alive() for e in stopped) and time.monotonic() < deadline:
        time.sleep(0.05)
    for entry in stopped:
        if entry.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry.pid, signal.SIGKILL)
        entry.remove()
    return stopped


def spawn(backend: str, minutes: float, env: Mapping[str, str]) -> int:
    """Start a standby for `backend` that waits `minutes` for a run, detached like a run's engine;
    its output goes to cache/standby/standby.log. Returns its pid."""
    folder = registry_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "standby.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
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


# ---- the launch's side: hand the run over, then relay ----------------------------------------


def _frame(payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return struct.pack("!I", len(body)) + body


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the standby closed the connection")
        data += chunk
    return data


def _reply(conn: socket.socket) -> dict:
    (size,) = struct.unpack("!I", _recv_exact(conn, 4))
    return json.loads(_recv_exact(conn, size))


def candidates(key: str, backend: str | None) -> list[Standby]:
    """This environment's standbys that could serve a run of `backend` (None: any)."""
    return [e for e in listed() if e.key == key and (backend is None or e.backend == backend)]


def hand_over(argv: list[str], env: Mapping[str, str], backend: str | None, log: object = None) -> int | None:
    """Give this launch to a standby of the same environment: None when none takes it (the caller
    then starts cold), else the run's exit status, after relaying signals to it until it ends."""
    key = env_key(env)
    deadline = time.monotonic() + READY_WAIT_S
    tried: set[int] = set()
    while True:
        waiting = [e for e in candidates(key, backend) if e.pid not in tried]
        for entry in (e for e in waiting if e.ready):
            tried.add(entry.pid)
            status = _offer(entry, argv, env, log)
            if status is not None:
                return status
        if not any(not e.ready for e in waiting) or time.monotonic() > deadline:
            return None
        time.sleep(0.1)  # one is still importing: sooner ready than a cold start


def _say(log: object, text: str) -> None:
    if log is not None:
        print(f"qlc: {text}", file=log, flush=True)  # type: ignore[arg-type]


def _offer(entry: Standby, argv: list[str], env: Mapping[str, str], log: object) -> int | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(REPLY_WAIT_S)
        conn.connect(entry.socket)
        request = {"argv": argv, "env": dict(env), "cwd": os.getcwd(), "started": _process_started()}
        header = _frame(request)
        socket.send_fds(conn, [header[:4]], [0, 1, 2])
        conn.sendall(header[4:])
        answer = _reply(conn)
    except (OSError, ValueError, ConnectionError):
        conn.close()
        return None  # gone, busy with another launch, or never listening: start cold
    if "declined" in answer:
        _say(log, f"warm engine {entry.pid} declined: {answer['declined']}")
        conn.close()
        return None
    _say(log, f"handed to warm engine {entry.pid} ({entry.backend}, imports done before the launch)")
    return _relay(conn, entry.pid)


def _relay(conn: socket.socket, pid: int) -> int:
    """Wait for the run's status, passing on the signals that stop a run (SIGTERM, SIGINT)."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    conn.settimeout(None)
    try:
        return int(_reply(conn)["exit"])
    except (OSError, ValueError, KeyError, ConnectionError):
        return 1  # it died without a word (killed): the run's events say how far it got
    finally:
        conn.close()


def _process_started() -> float:
    from engine.run.proc import started_at

    return started_at()
