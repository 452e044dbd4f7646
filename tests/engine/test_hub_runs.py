"""A run on a hub model and a hub dataset, served by the Hub stand-in (tests/hubserver.py): the real
`qlc train` shows the downloads' progress, records the commits it started from, and its resume
loads those commits after `main` moved on, even from an empty cache; a second run on a warm cache
makes no request at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine import protocol
from engine.run import pins, runs
from tests.conftest import as_if_crashed, qlc
from tests.engine.test_hub import CARD, TINY_FILES, _chats, _parquet
from tests.hubserver import HubServer

pytestmark = pytest.mark.slow

SETS = [
    x
    for o in (
        "model.name_or_path=owner/tiny",
        "data.source=owner/chats",
        "data.split=train",
        "data.val_fraction=0",
        "train.max_steps=4",
        "train.save_steps=2",
        "train.logging_steps=1",
    )
    for x in ("--set", o)
]


def _env(hub: HubServer, hf_home: Path, qlc_cache: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return {
        **base,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "QLC_CACHE_DIR": str(qlc_cache),
    }


def _session(run_dir: Path, mode: str) -> list[protocol.Event]:
    """The events of the run's last session in `mode` (train or resume)."""
    events, _ = runs.read_events(run_dir)
    starts = [i for i, e in enumerate(events) if isinstance(e, protocol.Hello) and e.mode == mode]
    return events[starts[-1] :]


def _one(events: list[protocol.Event], kind: type) -> protocol.Event:
    (found,) = [e for e in events if isinstance(e, kind)]
    return found


def test_a_run_pins_its_hub_sources_and_a_resume_loads_them(tmp_path: Path) -> None:
    from engine.models.tiny_build import ensure_builtin

    folder = ensure_builtin("builtin:tiny-llama")
    model = {name: (folder / name).read_bytes() for name in TINY_FILES}
    rows = _chats()
    with HubServer() as hub:
        model_a = hub.push("owner/tiny", model)
        data_a = hub.push(
            "owner/chats",
            {
                "README.md": CARD,
                "data/train-0.parquet": _parquet(rows[:400]),
                "data/test-0.parquet": _parquet(rows[400:]),
            },
            repo_type="dataset",
        )
        env = _env(hub, tmp_path / "hf", tmp_path / "qlc")
        root = tmp_path / "runs"

        started = qlc("--runs-dir", str(root), "train", "tiny-demo", *SETS, env=env, timeout=600)
        assert started.returncode == 0, started.stderr + started.stdout
        assert "downloading" in started.stdout and "owner/tiny at commit" in started.stdout
        (run_dir,) = runs.list_run_dirs(root)
        first = _session(run_dir, "train")
        downloads = [e for e in first if isinstance(e, protocol.StageEvent) and e.stage == "downloading"]
        assert {e.unit for e in downloads} == {"B"}
        assert downloads[-1].current == downloads[-1].total > 0
        ready = _one(first, protocol.ModelReady)
        assert (ready.repo, ready.commit) == ("owner/tiny", model_a)
        recorded = pins.read(run_dir)
        assert {k: p.commit for k, p in recorded.items()} == {"model": model_a, "data.source": data_a}
        fingerprint = json.loads((run_dir / "dataset.json").read_text())
        assert fingerprint["source"] == {
            "kind": "hub", "id": "owner/chats", "split": "train", "subset": None, "revision": data_a,
        }  # fmt: skip
        examples = _one(first, protocol.DataReady).train_examples
        assert examples == 400

        # Upstream moves on: new commits on main for both, the dataset with other rows.
        model_b = hub.push(
            "owner/tiny", {**model, "config.json": model["config.json"].replace(b"{", b'{"note": "b",', 1)}
        )
        data_b = hub.push(
            "owner/chats",
            {"README.md": CARD, "data/train-0.parquet": _parquet(rows[:50])},
            repo_type="dataset",
        )
        assert model_b != model_a and data_b != data_a

        # Resume from step 2, on a machine whose cache is empty: everything comes from the hub again,
        # at the pinned commits.
        as_if_crashed(run_dir, after_checkpoint=2)
        hub.requests.clear()
        elsewhere = _env(hub, tmp_path / "hf-elsewhere", tmp_path / "qlc-elsewhere")
        resumed = qlc("--runs-dir", str(root), "resume", run_dir.name, env=elsewhere, timeout=600)
        assert resumed.returncode == 0, resumed.stderr + resumed.stdout
        asked = [r.path for r in hub.requests if r.path != "/api/agent-harnesses"]
        assert asked and all(model_a in p or data_a in p or p.startswith("/lfs/") for p in asked), asked
        assert any(model_a in p for p in asked) and any(data_a in p for p in asked)
        assert not [p for p in asked if model_b in p or data_b in p or "/main" in p]
        again = _session(run_dir, "resume")
        assert _one(again, protocol.Hello).resumed_from == "checkpoint-2"
        ready = _one(again, protocol.ModelReady)
        assert (ready.repo, ready.commit) == ("owner/tiny", model_a)
        assert _one(again, protocol.DataReady).train_examples == examples
        assert _one(again, protocol.Finished).status == "completed"

        # A new run on the first machine: its cache is warm (main was model_a there), so nothing
        # is asked of the hub at all.
        hub.requests.clear()
        warm = qlc("--runs-dir", str(root), "train", "tiny-demo", *SETS, env=env, timeout=600)
        assert warm.returncode == 0, warm.stderr + warm.stdout
        assert hub.requests == []
        second = max(runs.list_run_dirs(root), key=lambda d: d.name)
        assert second != run_dir and pins.read(second)["model"].commit == model_a
        assert "(cached)" in warm.stdout
