"""What /proc says of a process: when it started (the launch breakdown's zero, a warm engine's
identity) and its state."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces or parentheses):
    the state first."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def state(pid: int | str) -> str:
    """Process `pid`'s state letter (R, S, Z...), or '' where /proc cannot tell."""
    try:
        return _stat(pid)[0]
    except (OSError, IndexError):
        return ""


def started_at(pid: int | str = "self") -> float:
    """When process `pid` started, in epoch seconds (Linux: /proc), else 0: the launch breakdown
    then starts at `hello`."""
    try:
        ticks = int(_stat(pid)[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
