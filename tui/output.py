"""Terminal output for the headless commands: one rich Console each for stdout and stderr,
honouring NO_COLOR, and plain JSON for --json."""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

from rich.console import Console, RenderableType
from rich.segment import Segment, Segments


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Rich's own answer to a closed pipe is SystemExit(1), and 1 is a verdict here (the run
        failed, it does not fit). A closed stdout goes up to tui.cli.main as the BrokenPipeError it
        is, which ends the command as Unix tools end (exit 141); a closed stderr only silences
        stderr, since what the command prints on stdout still has a reader."""
        self.quiet = True  # nothing more to this stream, whoever catches the error
        if not self.stderr:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def _console(stderr: bool) -> Console:
    """Rich wraps at the terminal's width, and at 80 columns when the stream is not a terminal. A
    YAML written to a file, a log line in a pipe or a one-line error must come out whole, so
    nothing is ever wrapped (soft_wrap: a terminal folds long lines itself), and through a pipe
    tables get all the width they want instead of cutting run ids."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return _Console(stderr=stderr, highlight=False, soft_wrap=True, width=None if tty else 100_000)


out = _console(stderr=False)
err = _console(stderr=True)


def print_unpadded(renderable: RenderableType) -> None:
    """Print to stdout without the spaces that end each line: rich pads every row of a table to
    its widest, so one long cell in the last column made every line that long (a pipe into
    `less`, a log, a terminal narrower than the widest row: each row wrapped onto blank ones)."""
    segments: list[Segment] = []
    for line in out.render_lines(renderable, pad=False):
        segments += [*_rstrip(line), Segment.line()]
    out.print(Segments(segments), end="")


def _rstrip(line: list[Segment]) -> list[Segment]:
    """A rendered line without its trailing whitespace (padding only: no style shows on it here)."""
    line = list(line)
    while line and not line[-1].control and not line[-1].text.rstrip():
        line.pop()
    if line and not line[-1].control:
        last = line[-1]
        line[-1] = Segment(last.text.rstrip(), last.style)
    return line


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


def plural(n: float, word: str) -> str:
    """ "1 token", "2 tokens", "1 batch", "3 batches"; `word` is the plural ("tokens", "batches")."""
    if n != 1:
        return f"{n:g} {word}" if isinstance(n, float) else f"{n} {word}"
    singular = word[:-2] if word.endswith(("ches", "shes", "xes", "sses")) else word.removesuffix("s")
    return f"1 {singular}"


def fmt_amount(n: float, unit: str) -> str:
    """A count in its unit: bytes as '1.2 GB' (decimal, as downloads are quoted), others '12.3k rows'."""
    if unit == "B":
        for name, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if n >= size:
                return f"{n / size:.1f} {name}"
        return f"{n:.0f} B"
    for name, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{name}" + (f" {unit}" if unit else "")
    return plural(round(n), unit) if unit else f"{n:.0f}"


def fmt_progress(
    current: int, total: int, unit: str = "", rate: float | None = None, eta_s: float | None = None
) -> str:
    """'3.2 GB of 16.1 GB (20%) · 85.0 MB/s · ETA 2:31' for a StageEvent's progress; '' when it has none."""
    if not total and not current:
        return ""
    if unit:
        text = fmt_amount(current, unit)
        if total:
            # "1 of 4 batches", not "1 batch of 4 batches": a count says its unit once.
            if unit != "B":
                text = fmt_amount(current, "")
            text += f" of {fmt_amount(total, unit)} ({100 * current / total:.0f}%)"
    else:
        text = f"{current}/{total}" if total else str(current)
    if rate is not None and rate > 0:
        text += f" · {fmt_amount(rate, unit)}/s"
    if eta_s is not None and current != total:
        text += f" · ETA {fmt_duration(eta_s)}"
    return text


def fmt_ranks(devices: list[Any]) -> str:
    """Each rank's device in a few characters: 'r0 10.4 GiB 97% · r1 10.5 GiB 96%' (GPU peak
    reserved and utilisation), or host RSS on CPU ranks: 'r0 0.68 GiB · r1 0.69 GiB'."""
    parts = []
    for d in devices:
        gb = d.memory_peak_reserved_gb if d.memory_peak_reserved_gb is not None else d.host_rss_gb
        text = f"r{d.rank} {gb:.2f} GiB" if gb is not None else f"r{d.rank} -"
        if d.utilization_pct is not None:
            text += f" {d.utilization_pct:.0f}%"
        parts.append(text)
    return " · ".join(parts)
