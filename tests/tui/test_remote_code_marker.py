"""trust_remote_code is visible wherever a run's settings or header are shown: the Presets pane
(before the description, so a narrow terminal never cuts it off), the dashboard's run header, and
`qlc train`/`qlc attach`'s first line. No shipped preset sets it, so the snapshots never show it."""

from __future__ import annotations

from pathlib import Path

import fake_engine
import msgspec
import pytest
from pilot_helpers import FINISHED_RUN, recorded_events, screen_text, wait_for

from engine import protocol
from tests.conftest import REPO
from tui.follow import EventPrinter
from tui.widgets.presets_pane import PresetsPane

MARK = "⚠ trust_remote_code"


@pytest.fixture
def remote_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    folder = tmp_path / "presets"
    folder.mkdir()
    text = (REPO / "presets" / "tiny-demo.yaml").read_text(encoding="utf-8")
    text = text.replace("trust_remote_code: false", "trust_remote_code: true").replace(
        "data/tiny-instruct.jsonl", str(REPO / "presets" / "data" / "tiny-instruct.jsonl")
    )
    (folder / "remote-demo.yaml").write_text(text, encoding="utf-8")
    monkeypatch.setenv("QLC_PRESETS_DIR", str(folder))
    return "remote-demo"


async def test_the_presets_pane_marks_a_preset_that_runs_model_code(app_factory, remote_preset) -> None:
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        pane = app.screen.query_one(PresetsPane)
        pane.select(remote_preset)
        await wait_for(pilot, lambda: MARK in screen_text(app), what="the remote-code marker")
        pane.select("tiny-demo")
        await wait_for(pilot, lambda: MARK not in screen_text(app), what="the marker to go")


def _with_remote_code(events: list[protocol.Event]) -> list[protocol.Event]:
    return [
        msgspec.structs.replace(e, trust_remote_code=True) if isinstance(e, protocol.Hello) else e
        for e in events
    ]


async def test_the_dashboard_header_marks_a_run_that_runs_model_code(app_factory, runs_root: Path) -> None:
    fake_engine.make_run_dir(runs_root, FINISHED_RUN, _with_remote_code(recorded_events()))
    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await wait_for(pilot, lambda: "⚠ remote code" in screen_text(app), what="the header marker")


def test_the_command_line_marks_it_in_the_run_line(capsys: pytest.CaptureFixture[str]) -> None:
    printer = EventPrinter()
    printer(protocol.Hello(run_id="r", backend="hf", device="cpu", trust_remote_code=True))
    printer(protocol.Hello(run_id="s", backend="hf", device="cpu"))
    first, second = capsys.readouterr().out.strip().splitlines()[:2]
    assert MARK in first and MARK not in second
