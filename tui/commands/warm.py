"""`qlc warm`: the warm engines waiting for a launch (hardware.keep_warm), and `--stop` to end them.

A warm engine has a backend's libraries imported (Unsloth's take 25-30 s) and trains the next run
launched from the same environment (engine/run/standby.py). It holds a CUDA context while it waits.
"""

from __future__ import annotations

import argparse
import time

from rich.table import Table

from engine.run import standby
from tui.output import out, print_json, print_unpadded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("warm", help="list the warm engines waiting for the next launch; --stop ends them")
    p.add_argument("--stop", action="store_true", help="end every warm engine now (each holds GPU memory)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=run_warm)


def run_warm(args: argparse.Namespace) -> int:
    if args.stop:
        stopped = standby.stop_all()
        if args.json:
            print_json([{"pid": e.pid, "backend": e.backend} for e in stopped])
        else:
            out.print(f"stopped {len(stopped)} warm engine{'s' if len(stopped) != 1 else ''}")
        return 0
    entries = standby.listed()
    if args.json:
        print_json([_entry(e) for e in entries])
        return 0
    if not entries:
        out.print("no warm engine: a run with hardware.keep_warm (auto: 10 min on a GPU) leaves one")
        return 0
    table = Table(box=None, header_style="bold")
    for col in ("pid", "backend", "state", "waits"):
        table.add_column(col, no_wrap=True)
    now = time.time()
    for e in entries:
        state = "ready" if e.ready else f"importing ({now - e.started:.0f} s)"
        waits = f"{max(0.0, e.idle_until - now) / 60:.0f} min more" if e.ready else "-"
        table.add_row(str(e.pid), e.backend, state, waits)
    print_unpadded(table)
    return 0


def _entry(e: standby.Standby) -> dict[str, object]:
    return {"pid": e.pid, "backend": e.backend, "ready": bool(e.ready), "idle_until": e.idle_until or None}
