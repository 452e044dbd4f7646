"""A run's hub sources, before anything loads: downloaded with progress, pinned to commits.

At a run's start rank 0 resolves the model's and the hub datasets' revisions to commits, downloads
what the cache lacks (`downloading` events: bytes, rate, ETA) and records the commits
(RUN_DIR/sources.json). A resume, and every other rank, reads that record and fetches exactly those
commits, which a warm cache serves without a network call. The loaders get local folders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine import protocol
from engine.config import RunConfig
from engine.data.sources import is_local
from engine.hub.cache import Snapshot
from engine.hub.dataset import fetch_dataset
from engine.hub.model import fetch_model
from engine.models import tiny
from engine.models.source import is_hub_model
from engine.run import pins, runs
from engine.run.distributed import Timeouts, WaitTimeout
from engine.run.pins import DATA, MODEL, VAL_DATA, Pin
from engine.train import faults

Emit = Callable[[protocol.Event], None]
WAIT_POLL_S = 0.5


@dataclass
class Sources:
    cfg: RunConfig
    """The run's config with every hub source's revision set to its pinned commit."""
    model_path: str
    """What the loaders read: a snapshot folder, a local folder, or the built-in model's folder."""
    pins: dict[str, Pin] = field(default_factory=dict)

    @property
    def model(self) -> Pin | None:
        return self.pins.get(MODEL)


def _wait_for_record(run_dir: Path, idle_s: float) -> dict[str, Pin]:
    """Ranks other than 0 wait for rank 0's record: it is written once rank 0's downloads are
    done, so they then find the files in the cache (torchrun ends them if rank 0 fails). A long
    download is no reason to give up, so the limit counts only the time in which rank 0 wrote no
    event (a download reports its progress every few seconds); past it, one line says what to
    check."""
    events = run_dir / runs.EVENTS
    seen: tuple[int, int] | None = None
    quiet_since = time.monotonic()
    while (found := pins.read(run_dir)) is None:
        try:
            stat = events.stat()
            mark: tuple[int, int] | None = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            mark = None
        now = time.monotonic()
        if mark != seen:
            seen, quiet_since = mark, now
        elif now - quiet_since > idle_s:
            raise WaitTimeout(
                f"no {run_dir / pins.RECORD} from rank 0 after {now - quiet_since:.0f} s without an event from it",
                "rank 0 writes it once the model and data are in the cache; the run directory must be on "
                f"a filesystem every host sees at the same path ({Timeouts.variable('sources_s')} sets the limit)",
            )
        time.sleep(WAIT_POLL_S)
    return found


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"  # a dataset card, a small split


def _describe(snap: Snapshot, seconds: float, before: int) -> str:
    size = snap.nbytes
    how = "cached" if before >= size else f"downloaded {_size(size - before)} in {seconds:.0f} s"
    return f"{snap.repo} at commit {snap.commit[:12]}: {len(snap.files)} files, {_size(size)} ({how})"


def prepare(run_dir: Path, cfg: RunConfig, emit: Emit, is_main: bool = True) -> Sources:
    """Fetch (and, at a run's start, pin) the model and the hub datasets; see the module doc."""
    recorded = pins.read(run_dir)
    if recorded is None and not is_main:
        recorded = _wait_for_record(run_dir, Timeouts.from_env().sources_s)
    asked = cfg
    cfg = pins.apply(cfg, recorded)
    if not is_main:
        emit = lambda ev: None  # noqa: E731 - rank 0 speaks for the run
    found: dict[str, Pin] = {}

    m = cfg.model
    if tiny.is_builtin(m.name_or_path):
        from engine.models.tiny_build import ensure_builtin  # builds with torch: engine processes only

        model_path = str(ensure_builtin(m.name_or_path))
    elif is_hub_model(m.name_or_path):
        snap = fetch_logged(
            lambda watch: fetch_model(
                m.name_or_path,
                m.revision,
                trust_remote_code=m.trust_remote_code,
                allow_pickle=m.allow_pickle,
                emit=watch,
            ),
            emit,
        )
        found[MODEL] = Pin(m.name_or_path, "model", asked.model.revision, snap.commit)
        model_path = str(snap.path)
    else:
        model_path = m.name_or_path

    d = cfg.data
    datasets = [(DATA, "data.source", d.source, d.split, d.revision, asked.data.revision)]
    if d.val_source:
        same = d.val_source == d.source  # then its "validation" split is read (engine.data.pipeline)
        datasets.append(
            (
                VAL_DATA,
                "data.val_source",
                d.val_source,
                "validation" if same else d.split,
                d.revision if same else d.val_revision,
                asked.data.revision if same else asked.data.val_revision,
            )
        )
    for key, where, source, split, revision, asked_revision in datasets:
        if not source or is_local(source):
            continue
        snap = fetch_logged(
            lambda watch, s=source, sp=split, r=revision, w=where: fetch_dataset(
                s, d.subset, sp, r, where=w, emit=watch
            ),
            emit,
        )
        found[key] = Pin(source, "dataset", asked_revision, snap.commit)

    if is_main and recorded is None:
        faults.stall_at(0, "sources")
        pins.record(run_dir, found)
    return Sources(pins.apply(cfg, found), model_path, found)


def fetch_logged(fetch: Callable[[Emit], Snapshot], emit: Emit) -> Snapshot:
    """Run a fetch, passing its progress on, and log one line: the commit, the size, and how much
    came over the network."""
    t0 = time.perf_counter()
    first: list[int] = []

    def watch(ev: protocol.Event) -> None:
        if isinstance(ev, protocol.StageEvent) and not first:
            first.append(ev.current)  # the first report counts what was on disk before
        emit(ev)

    snap = fetch(watch)
    emit(protocol.Log(message=_describe(snap, time.perf_counter() - t0, first[0] if first else snap.nbytes)))
    return snap
