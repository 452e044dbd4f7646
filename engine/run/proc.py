"""When this process started, read from /proc: the launch breakdown's zero."""

from __future__ import annotations

import os
from pathlib import Path


def started_at(pid: int | str = "self") -> float:
    """When process `pid` started, in epoch seconds (Linux: /proc), else 0: the launch breakdown
    then starts at `hello`."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
