"""Terminal output for the headless commands: one rich Console each for stdout and stderr,
honouring NO_COLOR, and plain JSON for --json."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_ranks(devices: list[Any]) -> str:
    """Each rank's device in a few characters: 'r0 10.4 GB 97% · r1 10.5 GB 96%' (GPU peak reserved
    and utilisation), or host RSS on CPU ranks: 'r0 0.68 GB · r1 0.69 GB'."""
    parts = []
    for d in devices:
        gb = d.memory_peak_reserved_gb if d.memory_peak_reserved_gb is not None else d.host_rss_gb
        text = f"r{d.rank} {gb:.2f} GB" if gb is not None else f"r{d.rank} -"
        if d.utilization_pct is not None:
            text += f" {d.utilization_pct:.0f}%"
        parts.append(text)
    return " · ".join(parts)
