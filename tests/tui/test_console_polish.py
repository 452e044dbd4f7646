"""Small console defects, each driven through the real app: the log wrapping at 80 columns, the
export dialog's footer and wording, the start confirmation naming its preset, and the palette
reaching the panes' own keys."""

from __future__ import annotations

from pathlib import Path

from pilot_helpers import FINISHED_RUN, MEMORY_TERMS, memory_pane_shows, screen_text, select_preset, wait_for
from test_export_action import _open_export
from textual.widgets import Input, RichLog, Select, TabbedContent

from tui.history import LogLine
from tui.screens.confirm import ConfirmScreen
from tui.widgets.dashboard import format_log_line
from tui.widgets.runs_pane import RunsPane

LONG = " ".join(f"word{i:02d}" for i in range(18))  # 125 characters: two rows at 80 columns


def _log(app, *texts: str) -> None:
    """Lines in the watched run's log, as its events add them, and the dashboard drawn again."""
    from tui.widgets.dashboard import Dashboard

    for text in texts:
        app.history.log.append(LogLine(300.0, "info", text))
        app.history.log_total += 1
    app.screen.query_one(Dashboard)._redraw()


def _log_rows(text: str) -> list[str]:
    """The log box's rows as drawn, without its frame."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("╭─ log"))
    rows = []
    for line in lines[top + 1 :]:
        if line.startswith("╰"):
            break
        rows.append(line.removeprefix("│").rstrip().removesuffix("│"))
    return rows


async def test_a_long_log_line_wraps_whole_at_80_columns(app_factory, finished_run: Path) -> None:
    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        log = app.screen.query_one("#event-log", RichLog)
        log.write(format_log_line(LogLine(153.0, "error", LONG)))
        await pilot.pause(0.2)
        rows = _log_rows(screen_text(app))
        assert len(rows) == 3  # no row taken by a horizontal scrollbar
        assert log.max_scroll_x == 0
        # Every word whole, in order, over the last two rows (the line's own wrap).
        words = " ".join(rows[-2:]).split()
        assert words[:2] == ["02:33", "✗"]
        assert " ".join(words[2:]) == LONG


async def test_the_export_dialog_footer_offers_its_own_keys(app_factory, finished_run: Path) -> None:
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await _open_export(pilot, app)
        footer = screen_text(app).splitlines()[-1]
        assert "^s Export" in footer and "esc Close" in footer, footer
        for gone in ("Attach", "Mark", "Compare", "Quit", "Keys"):
            assert gone not in footer, footer


async def test_adapter_only_shows_no_dtype_and_the_folder_error_names_the_field(
    app_factory, finished_run: Path
) -> None:
    taken = finished_run / "exports" / "taken"
    taken.mkdir(parents=True)
    (taken / "something").write_text("x")
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_export(pilot, app)
        assert screen.query_one("#export-as").display  # merged: the dtype is shown
        assert screen.query_one("#export-dtype", Select).value == "bf16"
        screen.query_one("#export-kind", Select).value = "adapter"
        await pilot.pause()
        assert not screen.query_one("#export-as").display
        assert "bf16" not in screen_text(app)
        screen.query_one("#export-out", Input).value = str(taken)
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause(0.2)
        text = screen_text(app)
        assert "exists and is not empty" in text and '"to" field' in text
        assert "--out" not in text


async def test_starting_another_run_names_the_preset(app_factory) -> None:
    app = app_factory(steps=400, rate=20)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await select_preset(pilot, "tiny-demo")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.client is not None and app.live(), what="the run to train")
        await pilot.press("1", "s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
        await pilot.pause()
        text = screen_text(app)
        assert "Start tiny-demo as another run?" in text
        assert "This starts preset tiny-demo" in text and "is still training" in text
        await pilot.press("n")


async def _palette(pilot, words: str) -> None:
    await pilot.press("ctrl+p")
    await pilot.pause()
    await pilot.press(*words)
    await pilot.pause(0.3)
    await pilot.press("enter")
    await pilot.pause(0.2)


async def test_the_palette_reaches_the_panes_own_keys(app_factory, finished_run: Path) -> None:
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        names = {c.title for c in app.get_system_commands(app.screen)}
        assert {
            "Choose GPU",
            "Type a GPU size",
            "Memory advice",
            "Filter presets",
            "Mark selected run",
        } <= names
        tabs = app.screen.query_one(TabbedContent)
        for words, pane, focus in (
            ("type a gpu size", "memory", "gpu-size"),
            ("choose gpu", "memory", "gpu-select"),
            ("memory advice", "memory", "advice"),
            ("filter presets", "presets", "preset-filter"),
        ):
            await pilot.press("escape")  # out of any text box, so ctrl+p is the palette's
            await _palette(pilot, words)
            assert tabs.active == pane, words
            assert app.focused is not None and app.focused.id == focus, (words, app.focused)
        await pilot.press("escape")
        runs = app.screen.query_one(RunsPane)
        await _palette(pilot, "mark selected run")
        assert tabs.active == "runs"
        await wait_for(pilot, lambda: runs.summaries, what="the runs list")
        if not runs.marked:  # the list may have been empty when the command ran: mark again
            await _palette(pilot, "mark selected run")
        assert runs.marked == {FINISHED_RUN}


async def test_a_short_terminal_shows_every_metric(app_factory, finished_run) -> None:
    """At 60x18 (a split pane) the metrics panel had one row, lr: under 22 rows the learning-rate
    chart and the checkpoints give way, and every metric shows with its sparkline."""

    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(60, 18)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.pause(0.2)
        text = screen_text(app)
        for metric in ("lr ", "grad norm", "tokens/s", "step ", "torch GiB"):
            assert f"│{metric}" in text, text
        assert "learning rate" not in text and "checkpoints" not in text
        assert "finished: completed at step 120" in text  # the log's last line


async def test_the_gpu_size_box_stays_whole_at_60_columns(app_factory) -> None:
    """At 60 columns the size box was cut to "or a": the GPU picker gives way instead."""
    app = app_factory()
    async with app.run_test(size=(60, 18)) as pilot:
        await pilot.pause()
        await select_preset(pilot, "llama-3.1-8b-rtx4090")
        await pilot.press("2")
        await pilot.pause(0.3)
        assert "or a size: 24GB (t)" in screen_text(app)


async def test_skipped_bad_records_stay_in_sight_at_80x24(app_factory, runs_root: Path) -> None:
    """The run's "bad records were skipped" warning scrolls out of the 3-line log within a few
    steps: the count stays on the log's frame for the whole run."""
    import fake_engine
    import msgspec

    from engine import protocol

    events = [
        msgspec.structs.replace(e, skipped=3) if isinstance(e, protocol.DataReady) else e
        for e in fake_engine.synthetic_run(60, run_id="skips")
    ]
    fake_engine.make_run_dir(runs_root, "skips", events)
    app = app_factory(attach="skips")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.pause(0.2)
        bottom = next(line for line in screen_text(app).splitlines()[::-1] if line.startswith("╰"))
        assert "3 bad records skipped" in bottom, screen_text(app)


async def test_log_lines_wrap_again_when_the_terminal_is_resized(app_factory, finished_run: Path) -> None:
    """RichLog wraps at the width a line was written at: after a resize to 80 columns the lines
    written at 120 ran past the box."""
    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        log = app.screen.query_one("#event-log", RichLog)
        log.write(format_log_line(LogLine(153.0, "error", LONG)))
        app.history.log.append(LogLine(153.0, "error", LONG))  # as the run's own line
        app.history.log_total += 1
        await pilot.pause(0.2)
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.3)
        assert log.max_scroll_x == 0
        assert max(len(strip.text.rstrip()) for strip in log.lines) <= log.scrollable_content_region.width
        words = " ".join(_log_rows(screen_text(app))[-2:]).split()
        assert " ".join(words[2:]) == LONG


async def test_under_22_rows_each_log_line_keeps_one_row_with_its_stamp(
    app_factory, finished_run: Path
) -> None:
    """At 60x18 the log has two rows: following its tail it showed a wrapped message's last two
    rows, with neither its stamp nor its start. There each message keeps one row, cut; back to
    wrapped whole when the window grows."""
    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(60, 18)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        app.history.log.append(LogLine(153.0, "error", LONG))  # as the run's own line
        app.history.log_total += 1
        _log(app)
        await pilot.pause(0.3)
        rows = _log_rows(screen_text(app))
        assert rows and all(row.split()[0] == "02:33" for row in rows), rows
        assert LONG.split()[0] in rows[-1]  # the message's start, not its tail
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.3)
        words = " ".join(_log_rows(screen_text(app))[-2:]).split()
        assert " ".join(words[2:]) == LONG


async def test_every_memory_term_shows_at_60x18(app_factory) -> None:
    """Under 22 rows the breakdown box has about five rows: each term takes one (what it is made
    of cut to the row) instead of the weights term's wrapped parts filling the box; back to full
    rows when the window grows."""
    app = app_factory()
    async with app.run_test(size=(60, 18)) as pilot:
        await memory_pane_shows(pilot, "tiny-demo", "FITS", what="the verdict")
        await pilot.pause(0.2)
        text = screen_text(app)
        for term in MEMORY_TERMS:
            assert f"{term} " in text, text
        await pilot.resize_terminal(100, 40)
        await pilot.pause(0.3)
        assert "made of" in screen_text(app)  # the header, and parts wrapped whole again


async def test_the_log_stays_where_a_person_scrolled_it(app_factory, finished_run: Path) -> None:
    """Scrolled up to read, the log snapped back to its tail at the next event; it follows the
    tail again once scrolled back to the bottom."""
    from tui.widgets.dashboard import Dashboard

    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.pause(0.2)
        log = app.screen.query_one("#event-log", RichLog)
        dash = app.screen.query_one(Dashboard)

        def grow(n: int) -> None:
            for i in range(n):
                app.history.log.append(LogLine(200.0 + i, "info", f"line {i}"))
                app.history.log_total += 1
            dash._redraw()

        assert log.max_scroll_y > 0
        log.scroll_to(y=0, animate=False)
        await pilot.pause(0.1)
        grow(3)
        await pilot.pause(0.2)
        assert log.scroll_y == 0
        log.scroll_end(animate=False)
        await pilot.pause(0.1)
        grow(3)
        await pilot.pause(0.2)
        assert log.is_vertical_scroll_end and "line 2" in screen_text(app)


async def test_a_resize_keeps_the_log_where_a_person_scrolled_it(app_factory, finished_run: Path) -> None:
    """Re-wrapping after a resize cleared the view and wrote it again from the tail: a person
    reading further up was sent to the bottom, and lines beyond the 300 an opened run shows first
    were lost."""
    from tui.widgets.dashboard import LOG_REPLAY, Dashboard

    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.pause(0.2)
        log = app.screen.query_one("#event-log", RichLog)
        for i in range(LOG_REPLAY + 50):
            app.history.log.append(LogLine(200.0 + i, "info", f"line {i}"))
            app.history.log_total += 1
        app.screen.query_one(Dashboard)._redraw()
        await pilot.pause(0.2)
        held = len(log.lines)
        log.scroll_to(y=log.max_scroll_y // 3, animate=False)
        await pilot.pause(0.1)
        await pilot.resize_terminal(100, 30)
        await pilot.pause(0.4)
        assert not log.is_vertical_scroll_end
        assert 0.2 < log.scroll_y / log.max_scroll_y < 0.45
        assert len(log.lines) >= held
        await pilot.resize_terminal(120, 30)
        await pilot.pause(0.2)
        log.scroll_end(animate=False)
        await pilot.pause(0.1)
        await pilot.resize_terminal(90, 30)
        await pilot.pause(0.4)
        assert log.is_vertical_scroll_end


async def test_log_lines_that_came_behind_another_pane_are_readable(app_factory, finished_run: Path) -> None:
    """Lines that arrived while the Runs pane was shown were wrapped at no width: "…" rows when
    the dashboard came back, until a resize."""

    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.pause(0.2)
        await pilot.press("4")
        await pilot.pause(0.2)
        _log(app, *(f"line {i} came behind the runs pane" for i in range(5)))
        await pilot.pause(0.2)
        await pilot.press("3")
        await pilot.pause(0.3)
        rows = _log_rows(screen_text(app))
        assert not any(row.strip() == "…" for row in rows), rows
        assert all(any(f"line {i} came behind the runs pane" in row for row in rows) for i in range(5)), rows


async def test_the_log_follows_its_tail_after_the_window_shrinks(app_factory, finished_run: Path) -> None:
    """A smaller window left the view where it was with more below it: read as "scrolled up",
    the log stopped following and new lines stayed out of sight."""

    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.pause(0.2)
        log = app.screen.query_one("#event-log", RichLog)
        assert log.is_vertical_scroll_end
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.4)
        _log(app, *(f"new line {i}" for i in range(3)))
        await pilot.pause(0.3)
        assert log.is_vertical_scroll_end and "new line 2" in screen_text(app)


async def test_a_log_that_all_fits_follows_new_lines(app_factory, finished_run: Path) -> None:
    """Scrolled to the top, then a window tall enough for every line: nothing moved, so the log
    still counted as scrolled up, and new lines went out of sight with no scrollbar to say so."""
    from tui.widgets.dashboard import Dashboard

    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(120, 24)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        log = app.screen.query_one("#event-log", RichLog)
        dash = app.screen.query_one(Dashboard)
        kept = list(app.history.log)[-7:]
        app.history.log.clear()
        app.history.log.extend(kept)
        dash.show(app.history, "completed")  # seven lines: more than the 3 a short window shows
        await pilot.pause(0.3)
        log.scroll_to(y=0, animate=False)
        await pilot.pause(0.1)
        assert log.max_scroll_y > 0 and not dash._log_follows
        await pilot.resize_terminal(120, 60)  # a tall window: the log shows 8 lines
        await pilot.pause(0.4)
        assert log.max_scroll_y == 0
        _log(app, *(f"more {i}" for i in range(5)))
        await pilot.pause(0.3)
        assert log.is_vertical_scroll_end and "more 4" in screen_text(app)


def test_the_verdict_keeps_a_cards_name_on_one_line() -> None:
    """At 80 columns word wrapping left "RTX" at the end of the verdict's line and "4060" under it."""
    from rich.text import Text

    from tui.widgets.memory_pane import _keep_parts_whole

    parts = [
        Text("✗ DOES NOT FIT  19.38 ± 0.64 of 8.00 GiB", style="bold red"),
        Text("11.38 GiB over"),
        Text("NVIDIA GeForce RTX 4060"),
    ]
    lines = _keep_parts_whole(parts, 78)
    assert [line.plain for line in lines] == [
        "✗ DOES NOT FIT  19.38 ± 0.64 of 8.00 GiB · 11.38 GiB over",
        "NVIDIA GeForce RTX 4060",
    ]
    assert {str(line.style) for line in lines} == {"bold red"}  # the card's line keeps the verdict's colour
    assert [line.plain for line in _keep_parts_whole(parts, 118)] == [" · ".join(p.plain for p in parts)]
