"""The Runs pane's Export action: the dialog's defaults, a bad choice refused in the dialog, and an
export followed to its result, with the fake engine's export mode."""

from __future__ import annotations

from pathlib import Path

import fake_engine
from pilot_helpers import FINISHED_RUN, notes, record_notes, screen_text, wait_for
from textual.widgets import Input, Select

from engine.run import runs
from tui.screens.export import ExportScreen
from tui.widgets.runs_pane import RunsPane


async def _open_export(pilot, app) -> ExportScreen:
    await pilot.pause()  # let the panes mount before typing
    await pilot.press("4")
    pane = app.screen.query_one(RunsPane)
    await wait_for(pilot, lambda: pane.summaries, what="the runs list")
    await pilot.press("e")
    await wait_for(pilot, lambda: isinstance(app.screen, ExportScreen), what="the export dialog")
    await pilot.pause()
    return app.screen


async def test_at_60x18_the_dialog_shows_its_buttons_and_the_folder_s_end(
    app_factory, finished_run: Path
) -> None:
    """At 60x18 the buttons were cut to their top edge; a long default folder showed its start
    (the runs folder) and hid its end (the run and the export's own folder, what the choices
    change). Now the end is in the field and the whole folder under it."""
    from textual.widgets import Static

    app = app_factory()
    async with app.run_test(size=(60, 18)) as pilot:
        screen = await _open_export(pilot, app)
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "Export (ctrl+s)" in text and "Close (Esc)" in text, text
        out = screen.query_one("#export-out", Input).value
        assert len(out) > 45 and out.endswith("checkpoint-120-merged-bf16")  # wider than the field
        to_row = next(row for row in text.splitlines() if " to " in row)
        assert "checkpoint-120-merged-bf16" in to_row, text
        where = screen.query_one("#export-where", Static)
        assert where.display and str(where.render()).replace("\n", "") == out


async def test_export_a_run_from_the_runs_pane(app_factory, finished_run: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no llama.cpp: the GGUF choice is off, and says why
    monkeypatch.delenv("QLC_LLAMA_CPP", raising=False)
    app = app_factory(export_launcher=fake_engine.launch_export)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_export(pilot, app)
        # Defaults: the newest checkpoint (this run has no final adapter folder), merged, bf16,
        # into the run's exports folder.
        assert screen.query_one("#export-source", Select).value == "120"
        assert screen.query_one("#export-dtype", Select).value == "bf16"
        assert screen.query_one("#export-gguf", Select).disabled
        out = screen.query_one("#export-out", Input)
        assert out.value.endswith(f"{FINISHED_RUN}/exports/checkpoint-120-merged-bf16")
        text = screen_text(app)
        assert "Export run" in text and "merge needs" in text and "llama.cpp not found" in text
        # Choosing the adapter alone moves the default folder along.
        screen.query_one("#export-kind", Select).value = "adapter"
        await pilot.pause()
        assert out.value.endswith("exports/checkpoint-120-adapter")
        screen.query_one("#export-kind", Select).value = "merged"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen.exported is not None, what="the export's result")
        target = finished_run / "exports" / "checkpoint-120-merged-bf16"
        assert (target / "README.md").is_file()
        await pilot.pause(0.2)
        text = screen_text(app)
        assert "✓ exported 1 files" in text and "tolerance 0.0945" in text and "4/4 finishing" in text
        await wait_for(pilot, lambda: not app._export_clients, what="the export process to end")
        await pilot.press("escape")
        assert not isinstance(app.screen, ExportScreen)
        assert "Export selected run" in {c.title for c in app.get_system_commands(app.screen)}


async def test_a_bad_choice_is_refused_in_the_dialog(app_factory, finished_run: Path) -> None:
    taken = finished_run / "exports" / "taken"
    taken.mkdir(parents=True)
    (taken / "something").write_text("x")
    launched: list[list[str]] = []

    def launcher(run_dir: Path, args: list[str]):
        launched.append(args)
        return fake_engine.launch_export(run_dir, args)

    app = app_factory(export_launcher=launcher)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_export(pilot, app)
        screen.query_one("#export-out", Input).value = str(taken)
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause(0.2)
        assert "exists and is not empty" in screen_text(app)
        assert "--out" not in screen_text(app)  # a CLI flag: the dialog names its "to" field
        await pilot.press("ctrl+s", "ctrl+s", "ctrl+s")
        await pilot.pause(0.2)
        # The reason once, however often Export is pressed (it piled up over the Runs list).
        assert " ".join(screen_text(app).split()).count("exists and is not empty") == 1
        assert launched == [] and screen.client is None
        assert sorted(p.name for p in (finished_run / "exports").iterdir()) == ["taken"]


async def test_a_hidden_export_reports_its_end(app_factory, finished_run: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_EXPORT_DELAY", "0.3")
    app = app_factory(export_launcher=fake_engine.launch_export)
    shown = record_notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_export(pilot, app)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen.client is not None, what="the export to start")
        await pilot.press("escape")  # hide: the export goes on
        assert not isinstance(app.screen, ExportScreen)
        await wait_for(
            pilot, lambda: any("exported to" in n for n in shown), timeout=15, what="the notification"
        )
        assert (
            runs.find_run(app.runs_root, FINISHED_RUN) / "exports" / "checkpoint-120-merged-bf16"
        ).is_dir()


async def test_a_damaged_run_config_is_an_error_not_a_crash(app_factory, finished_run: Path) -> None:
    from tui.screens.error import ErrorScreen

    (finished_run / runs.CONFIG).write_text("train: {lr: lots}\n")
    app = app_factory(export_launcher=fake_engine.launch_export)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("4")
        pane = app.screen.query_one(RunsPane)
        await wait_for(pilot, lambda: pane.summaries, what="the runs list")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen), what="the error dialog")
        assert "Cannot export" in screen_text(app) and "train.lr" in screen_text(app)


async def test_a_run_with_nothing_saved_opens_the_dialog_without_a_crash(
    app_factory, runs_root: Path
) -> None:
    """A run that failed before its first save: the source picker was given Select.BLANK, which is
    no sentinel in Textual 8 (False), and the console died with InvalidSelectValueError."""
    from engine import protocol

    fake_engine.make_run_dir(
        runs_root,
        "20260101-130000-tiny-demo",
        [protocol.Finished(status="failed", step=0)],
    )
    app = app_factory(export_launcher=fake_engine.launch_export)
    async with app.run_test(size=(80, 24)) as pilot:
        await _open_export(pilot, app)
        assert app.screen.query_one("#export-source", Select).value is Select.NULL
        await pilot.press("ctrl+s")
        await pilot.pause(0.3)
        assert app.is_running and isinstance(app.screen, ExportScreen)


async def test_a_cancelled_export_says_cancelled(app_factory, finished_run: Path, monkeypatch) -> None:
    """Cancel read as a failure ("export of ... failed: export cancelled"), and the progress bar
    went on animating "--%" under the closed export."""
    monkeypatch.setenv("FAKE_EXPORT_DELAY", "3")
    app = app_factory(export_launcher=fake_engine.launch_export)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _open_export(pilot, app)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: screen.client is not None, what="the export to start")
        await pilot.pause(0.5)
        screen.action_cancel_export()
        await wait_for(pilot, lambda: not app._export_clients, what="the export process to end")
        await pilot.pause(0.3)
        said = notes(app)
        assert any("cancelled; nothing was written" in n for n in said), said
        assert not any("failed" in n for n in said), said
        assert not screen.query_one("#export-progress").display
