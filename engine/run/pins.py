"""The commits a run's hub sources resolved to when it started: RUN_DIR/sources.json.

A branch moves: `main` of a model or dataset repo may get a new commit between a run's start and its
resume, and the restored data position would then point into other rows, the adapter sit on other
weights. So the engine records, before it loads anything, the commit each hub source resolved to,
and every later engine process of the run (resume, sample, export) loads exactly those commits.
Local files are fingerprinted instead (engine/fingerprint.py).

Pure Python: the console imports this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from engine.config import RunConfig, load_resolved
from engine.errors import UserError
from engine.run.runs import CONFIG

RECORD = "sources.json"
# The config fields a hub source comes from, as keys of the record.
MODEL, DATA, VAL_DATA = "model", "data.source", "data.val_source"


@dataclass(frozen=True)
class Pin:
    repo: str
    repo_type: str  # "model" or "dataset"
    revision: str | None  # what the config asked for (None: the default branch)
    commit: str  # what it resolved to

    @property
    def short(self) -> str:
        return f"{self.repo}@{self.commit[:12]}"


def record(run_dir: Path, pins: dict[str, Pin]) -> None:
    """Write RUN_DIR/sources.json (temporary file, then rename)."""
    tmp = run_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps({k: asdict(p) for k, p in pins.items()}, indent=1), encoding="utf-8")
    os.chmod(tmp, 0o600)
    tmp.rename(run_dir / RECORD)


def read(run_dir: Path) -> dict[str, Pin] | None:
    """The run's pins; None for a run that has no record yet (or started before pins existed)."""
    try:
        data = json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
        return {k: Pin(**v) for k, v in data.items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        raise UserError(f"{run_dir / RECORD}: unreadable", "the run directory is damaged") from None


def apply(cfg: RunConfig, pins: dict[str, Pin] | None) -> RunConfig:
    """`cfg` with each pinned hub source's revision set to its recorded commit. A pin applies only
    while the config still names the same repo."""
    if not pins:
        return cfg
    model, data = cfg.model, cfg.data
    if (p := pins.get(MODEL)) and p.repo == model.name_or_path:
        model = replace(model, revision=p.commit)
    if (p := pins.get(DATA)) and p.repo == data.source:
        data = replace(data, revision=p.commit)
    if (p := pins.get(VAL_DATA)) and p.repo == data.val_source:
        data = replace(data, val_revision=p.commit)
    return replace(cfg, model=model, data=data)


def load_pinned(run_dir: Path) -> RunConfig:
    """The run's resolved config with its hub sources pinned: what every engine process of the run
    after its start loads (resume, sample, export)."""
    return apply(load_resolved(run_dir / CONFIG), read(run_dir))
