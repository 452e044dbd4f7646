"""Each pane and its actions, by keyboard, against run directories and the fake engine."""

from __future__ import annotations

import time
from pathlib import Path

import fake_engine
import pytest
from pilot_helpers import (
    CRASHED_RUN,
    FINISHED_RUN,
    MEMORY_TERMS,
    memory_pane_shows,
    noted,
    notes,
    overrides_shown,
    recorded_events,
    screen_text,
    select_preset,
    type_ahead,
    wait_for,
)
from textual.widgets import Input, OptionList, Select, TabbedContent

from engine import protocol
from engine.config import draft_preset
from engine.run import runs
from tui.screens.error import ErrorScreen
from tui.widgets.line_chart import LineChart
from tui.widgets.memory_pane import MemoryPane
from tui.widgets.overrides import OverridesEditor, check_override
from tui.widgets.preset_settings import SettingsTable, parse_preset_doc
from tui.widgets.presets_pane import PresetsPane
from tui.widgets.progress import RunProgress
from tui.widgets.runs_pane import RunsPane
from tui.widgets.sample_pane import SamplePane

# ---- Presets -----------------------------------------------------------------------------------


def test_preset_comments_are_read_from_the_yaml() -> None:
    doc = parse_preset_doc(
        "# Header line one\n# and two\n\nname: x   # its name\nlora:\n  # the rank\n  r: 16\n"
        '  alpha: 32  # "#" in a comment is fine\nsystem: "a # not a comment"\n'
    )
    assert doc.header == "Header line one and two"
    assert doc.comment("name") == "its name"
    assert doc.comment("lora.r") == "the rank"
    assert doc.comment("lora.alpha") == '"#" in a comment is fine'
    assert doc.comment("system") == ""
    assert [s.path for s in doc.settings if s.is_section] == ["lora"]


def test_overrides_validate_with_the_cli_rules() -> None:
    draft = draft_preset("tiny-demo")
    ok, message, after = check_override(draft, "lr=1e-4")
    assert ok and message == "train.lr: 0.0001 (was 0.003)"
    assert after is not None and after.overrides == ("lr=1e-4",) and after.value("train.lr") == 1e-4
    ok, message, _ = check_override(draft, "train.lrr=1")
    assert not ok and "did you mean 'train.lr'" in message
    ok, message, _ = check_override(draft, "train.micro_batch=zero")
    assert not ok and "train.micro_batch" in message
    ok, message, _ = check_override(draft, "lora.dropout=1.5")
    assert not ok and "lora.dropout" in message


def test_an_override_to_the_presets_own_value_is_no_override() -> None:
    """`hardware.strategy=ddp` on a ddp preset counted as an override (`ddp*`); setting a value
    back to the preset's drops the override that changed it."""
    draft = draft_preset("tiny-demo")
    ok, message, after = check_override(draft, f"hardware.strategy={draft.value('hardware.strategy')}")
    assert ok and "the preset's own value: no override" in message
    assert after is not None and after.overrides == ()
    changed = draft.with_overrides(["train.lr=1e-4", "train.max_steps=7"])
    ok, message, after = check_override(changed, f"lr={draft.value('train.lr')}")
    assert ok and after is not None and after.overrides == ("train.max_steps=7",)
    assert after.value("train.lr") == draft.value("train.lr")


async def test_presets_filter_select_and_override(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        pane = app.screen.query_one(PresetsPane)
        await pilot.press("slash", *"tiny")
        options = app.screen.query_one("#preset-list", OptionList)
        assert options.option_count == 1
        await pilot.press("enter", "enter")  # to the list, then into the settings
        assert pane.selected == "tiny-demo"
        text = screen_text(app)
        assert "Offline demo" in text and "built locally" in text  # a comment from the YAML
        editor = app.screen.query_one(OverridesEditor)
        await wait_for(pilot, lambda: pane.draft is not None and pane.draft.name == "tiny-demo")
        editor.edit("train.lr", "")
        await pilot.press(*"abc")
        await wait_for(pilot, lambda: "✗ train.lr" in screen_text(app), what="the verdict")
        box = app.screen.query_one("#override-input", Input)
        box.value = ""
        await pilot.press(*"lr=1e-4")
        await wait_for(pilot, lambda: "✓ train.lr: 0.0001 (was 0.003)" in screen_text(app), what="the check")
        await pilot.press("enter")
        await overrides_shown(pilot, ["lr=1e-4"])
        assert pane.overrides == ["lr=1e-4"]
        assert pane.config is not None and pane.config.train.lr == 1e-4
        assert "overrides: lr=1e-4" in screen_text(app)
        await pilot.press("escape", "r")  # back to the list; reset the overrides
        await overrides_shown(pilot, [])
        assert pane.overrides == [] and pane.config.train.lr == 3e-3


async def test_overrides_typed_ahead_are_all_applied(app_factory) -> None:
    """Over a slow SSH link a burst (Enter on a setting, Ctrl-U, key=value, Enter) arrives before
    the console has handled its first key: the keys after Enter are the override box's, not the
    settings table's (digits switch panes, r resets, s starts a run), and each Enter applies its
    line against the overrides applied before it."""
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await select_preset(pilot, "tiny-demo")
        pane = app.screen.query_one(PresetsPane)
        table = app.screen.query_one(SettingsTable)
        table.focus()
        table.move_cursor(row=table.get_row_index("train.lr"))
        await pilot.pause()
        type_ahead(pilot, "enter", "ctrl+u", *"lr=4e-4", "enter")
        await overrides_shown(pilot, ["lr=4e-4"])
        assert app.screen.query_one(TabbedContent).active == "presets"
        await wait_for(pilot, lambda: table.has_focus, what="the focus back on the settings")
        table.move_cursor(row=table.get_row_index("lora.r"))
        await pilot.pause()
        type_ahead(pilot, "enter", "ctrl+u", *"lora.r=4", "enter")
        await overrides_shown(pilot, ["lr=4e-4", "lora.r=4"])
        box = app.screen.query_one("#override-input", Input)
        # A line typed ahead and left unfinished stays in the box, and Enter there applies it.
        editor = app.screen.query_one(OverridesEditor)
        editor.edit("train.seq_len", "128")
        type_ahead(pilot, "ctrl+u", *"lora.alpha=", "enter", *"8")
        await wait_for(pilot, lambda: box.value == "lora.alpha=8", what="the typed line")
        await pilot.press("enter")
        await overrides_shown(pilot, ["lr=4e-4", "lora.r=4", "lora.alpha=8"])
        assert pane.config is not None and pane.config.lora.alpha == 8 and pane.config.train.lr == 4e-4
        assert app.history is None or app.history.run_id is None  # no key fell on `s`
        # Keys typed after an Enter that applied are the next line's: they stay in the box (and
        # the box keeps the focus for them), not glued to the line just applied.
        table.focus()
        table.move_cursor(row=table.get_row_index("train.lr"))
        await pilot.pause()
        type_ahead(pilot, "enter", "ctrl+u", *"lr=5e-4", "enter", *"lora.r=")
        await overrides_shown(pilot, ["lora.r=4", "lora.alpha=8", "lr=5e-4"])
        await wait_for(pilot, lambda: box.value == "lora.r=", what="the next line kept")
        assert app.focused is box


async def test_a_box_lets_a_key_its_binding_declines_reach_the_app(app_factory) -> None:
    """Ctrl-C with nothing selected: the box's copy declines, and the App says how to quit (the
    box ran its own bindings in order and had swallowed the key)."""
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await select_preset(pilot, "tiny-demo")
        app.screen.query_one("#override-input", Input).focus()
        await pilot.pause()
        await pilot.press("ctrl+c")
        await wait_for(
            pilot,
            lambda: noted(app, "to quit"),
            what="the App's word on Ctrl-C",
        )


# ---- Memory ------------------------------------------------------------------------------------


async def test_memory_budget_follows_overrides_and_the_gpu(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        pane = app.screen.query_one(PresetsPane)
        await select_preset(pilot, "llama-3.1-8b-rtx4090")
        await pilot.press("2")
        await pilot.pause()
        assert "FITS" in screen_text(app) and "of 23.99 GiB" in screen_text(app)
        # An override typed on the Presets pane changes the budget live.
        # (batch_split fixed: auto would re-split 16 x 4 into micro-batches that fit)
        pane.apply_overrides(["train.micro_batch=16", "train.batch_split=fixed"])
        await overrides_shown(pilot, ["train.micro_batch=16", "train.batch_split=fixed"])
        assert "DOES NOT FIT" in screen_text(app)
        pane.apply_overrides(["train.micro_batch=2"])
        await overrides_shown(pilot, ["train.batch_split=fixed", "train.micro_batch=2"])
        size = app.screen.query_one("#gpu-size", Input)
        size.focus()
        await pilot.press(*"8GB")
        await pilot.pause()
        assert app.screen.query_one(MemoryPane).gpu_spec == "8GB"
        assert "DOES NOT FIT" in screen_text(app) and "of 8.00 GiB" in screen_text(app)
        assert "weights" in screen_text(app) and "activations" in screen_text(app)
        picker = app.screen.query_one("#gpu-select", Select)
        assert picker.has_class("-unused")  # the typed size wins: the picker shows it is not used
        # A card picked after that is what is asked for now, the one the picker showed too: the
        # typed size goes.
        await pilot.press("escape", "g", "enter")
        await wait_for(pilot, lambda: picker.expanded, what="the picker open")
        await pilot.press("enter")
        await wait_for(pilot, lambda: size.value == "", what="the typed size cleared")
        assert not picker.has_class("-unused")
        assert app.screen.query_one(MemoryPane).gpu_spec is None  # the preset's own card
        # A size the calculator refuses (3080 is a card, not GiB) leaves the picker in use.
        size.focus()
        await pilot.press(*"3080")
        await pilot.pause(0.2)
        assert size.has_class("-invalid") and not picker.has_class("-unused")


async def test_the_memory_pane_says_when_nothing_in_reach_fits(app_factory) -> None:
    """Gemma 3 12B on 8 GB: no listed change fits, and the pane says what would (the line `qlc fit`
    and `qlc estimate` print) above the changes; `a` still lands on the first change."""
    from textual.widgets import OptionList

    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await select_preset(pilot, "gemma-3-12b-rtx4090")
        await pilot.press("2")
        await pilot.press("t", *"8GB", "enter")
        await wait_for(
            pilot, lambda: "nothing in reach fits" in screen_text(app), what="the out-of-reach line"
        )
        said = " ".join(screen_text(app).split())
        assert "which needs a GPU of at least 10 GiB" in said
        await pilot.press("a")
        advice = app.screen.query_one("#advice", OptionList)
        assert advice.highlighted == 1 and not advice.get_option_at_index(1).disabled


@pytest.mark.parametrize(
    "preset,gpu", [("llama-3.1-8b-rtx4090", "24GB"), ("llama-3.1-8b-rtx4090", ""), ("tiny-demo", "")]
)
async def test_the_memory_pane_and_qlc_estimate_give_one_answer(app_factory, preset: str, gpu: str) -> None:
    """The same preset and GPU: the same figure and the same checkpointing plan, said by both
    (the pane used to estimate every layer checkpointed while the CLI planned `auto`)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    args = [sys.executable, "-m", "tui.cli", "estimate", preset, "--json", *(["--gpu", gpu] if gpu else [])]
    cli = json.loads(subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120).stdout)
    total, budget, band = cli["device_total_gb"], cli["gpu"]["budget_gb"], cli["error_band_gb"]
    plan = cli["config"]["checkpoint_reason"]
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await select_preset(pilot, preset)
        await pilot.press("2")
        if gpu:
            await pilot.press("t", *gpu, "enter")
        await wait_for(
            pilot,
            lambda: f"{total:.2f} ± {band:.2f} of {budget:.2f} GiB" in screen_text(app),
            what=f"the CLI's {total:.2f} ± {band:.2f} of {budget:.2f} GiB",
        )
        assert plan and plan in " ".join(screen_text(app).split())  # the plan, wrapped or not
        await pilot.press("1")
        await pilot.pause()
        assert f"{total:.2f} GiB of {budget:.2f} GiB" in " ".join(screen_text(app).split())


# ---- Runs and Dashboard ------------------------------------------------------------------------


async def test_runs_list_open_and_compare(app_factory, finished_run: Path, crashed_run: Path) -> None:
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await pilot.press("4")
        pane = app.screen.query_one(RunsPane)
        await wait_for(pilot, lambda: len(pane.summaries) == 2, what="the runs list")
        text = screen_text(app)
        assert "completed" in text and "crashed" in text
        # Newest first: the crashed run, then the finished one. Mark both and compare.
        await pilot.press("space", "down", "space", "c")
        chart = app.screen.query_one("#compare-chart", LineChart)
        await wait_for(pilot, lambda: len(chart.series) == 2, what="the comparison")
        assert chart.display
        # The legend names each line in the line's own colour (it was grey: nothing told which
        # line was which run).
        legend = chart.legend()
        colours = {span.style.color for span in legend.spans if not isinstance(span.style, str)}
        assert len(colours) == 2, legend.spans
        # Open the finished run's dashboard from its events file.
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        assert app.screen.query_one(TabbedContent).active == "dashboard"
        text = screen_text(app)
        assert "completed" in text and FINISHED_RUN in text and "checkpoint-120" in text
        assert any(0x2800 < ord(ch) <= 0x28FF for ch in text)  # the loss chart is drawn
        await pilot.press("l")
        await pilot.pause()
        assert "loss (log)" in screen_text(app)


async def test_resume_a_crashed_run(app_factory, crashed_run: Path) -> None:
    app = app_factory(steps=120, rate=400)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await pilot.press("4")
        pane = app.screen.query_one(RunsPane)
        await wait_for(pilot, lambda: pane.summaries)
        await pilot.press("r")
        await wait_for(
            pilot,
            lambda: app.history is not None and app.history.finished is not None,
            what="the resumed run",
        )
        h = app.history
        assert h.sessions == 2 and h.status == "completed" and h.step == 120
        assert h.hello.resumed_from == "checkpoint-80"
        assert list(h.loss.xs) == [float(s) for s in range(2, 121, 2)]


async def test_attach_on_start_and_stop_through_the_fifo(app_factory, runs_root: Path) -> None:
    run_dir = fake_engine.make_run_dir(runs_root, "20260103-080000-tiny-demo")
    proc = fake_engine.launcher(steps=2000, rate=20)(run_dir, pipe=False)
    deadline = time.monotonic() + 10
    while not runs.is_running(run_dir) and time.monotonic() < deadline:
        time.sleep(0.02)
    app = app_factory(auto_attach=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await wait_for(pilot, lambda: app.client is not None and app.history.step >= 2, what="auto-attach")
        assert app.client.mode == "tail"
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("y")
        await wait_for(pilot, lambda: app.history.finished is not None, what="the stop via FIFO")
        assert app.history.finished.status == "stopped"
    assert proc.wait(5) == 0


FAILED_AT_LOAD_RUN = "20260104-100000-tiny-demo"
GATED = "meta-llama/Llama-3.1-8B is gated: this token has no access to it"
GATED_HINT = "accept its licence on the model's Hugging Face page"


def failed_at_load(run_id: str = FAILED_AT_LOAD_RUN) -> list[protocol.Event]:
    """What the engine writes when the model cannot load: hello, the stage, the error, `failed`."""
    t = fake_engine.T0
    return [
        protocol.Hello(time=t, engine_version="0.1.0", run_id=run_id, pid=4242, backend="hf", device="cpu"),
        protocol.StageEvent(time=t + 0.4, stage="loading_model", message="meta-llama/Llama-3.1-8B"),
        protocol.ErrorEvent(time=t + 0.9, kind="model", message=GATED, hint=GATED_HINT),
        protocol.Finished(time=t + 0.9, status="failed", step=0, elapsed_seconds=0.9),
    ]


async def test_a_run_that_failed_before_its_first_step_says_why(app_factory, runs_root: Path) -> None:
    """It read "waiting for the first step…" over a bar at 0/?, as if it might still start."""
    fake_engine.make_run_dir(runs_root, FAILED_AT_LOAD_RUN, failed_at_load())
    app = app_factory(attach=FAILED_AT_LOAD_RUN)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await wait_for(pilot, lambda: app.client.ended)
        await pilot.pause(0.1)
        text = screen_text(app)
        lines = text.splitlines()
        assert "✗ failed" in lines[2] and FAILED_AT_LOAD_RUN in lines[2]
        assert lines[3].strip().startswith(GATED)  # the reason has the progress line's whole width
        assert "failed before the first step" in text and "while loading model" in text
        assert "waiting" not in text and "0/?" not in text and "learning rate yet" not in text
        progress = app.screen.query_one(RunProgress).render().plain
        assert f"{GATED} · {GATED_HINT}" in progress  # the hint too, where the width allows


def test_a_failure_is_told_by_its_own_sessions_error_on_one_line() -> None:
    from tui.history import RunHistory
    from tui.widgets.progress import Failure, failure, never_trained

    h = RunHistory(run_id=FAILED_AT_LOAD_RUN)
    h.apply_all(failed_at_load())
    assert failure(h, "failed") == Failure(GATED, GATED_HINT)
    assert never_trained(h, "failed") == ("failed before the first step", "while loading model")
    # Resumed, then failed without a word: the first session's error is not this one's reason.
    t = fake_engine.T0 + 60
    h.apply(protocol.Hello(time=t, engine_version="0.1.0", run_id=FAILED_AT_LOAD_RUN, pid=1, mode="resume"))
    assert failure(h, "training") is None and never_trained(h, "training") is None
    h.apply(protocol.Finished(time=t + 1, status="failed"))
    assert failure(h, "failed") is not None and failure(h, "failed").reason == "the engine gave no reason"
    h.apply(
        protocol.ErrorEvent(time=t + 1, kind="data", message="bad row 12:\n  no 'text' field", hint="fix\nit")
    )
    assert failure(h, "failed") == Failure("bad row 12: no 'text' field", "fix it")
    assert failure(h, "stopped") is None and never_trained(h, "stopped") == (
        "stopped before the first step",
        "while loading model",
    )


async def test_engine_error_is_shown_and_the_console_stays_up(app_factory) -> None:
    app = app_factory(steps=100, rate=400, fail_at=20)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await select_preset(pilot, "tiny-demo")
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen), what="the error dialog")
        text = screen_text(app)
        assert "out of memory" in text and "CUDA out of memory" in text
        assert "lower train.micro_batch" in text  # the engine's hint
        assert "train.micro_batch=1 (saves 2.9 GB)" in text  # the calculator's advice
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.client.ended)
        assert not isinstance(app.screen, ErrorScreen)
        assert app.is_running and app.history.status == "failed"
        assert "failed" in screen_text(app)
        # The dashboard says why beside the status, not only with a bar stopped at step 20.
        progress = app.screen.query_one(RunProgress).render().plain.splitlines()
        assert "✗ failed" in progress[0] and "CUDA out of memory" in progress[0]
        assert "20/100" in progress[1]


# ---- Sample ------------------------------------------------------------------------------------


async def test_sample_from_a_checkpoint(app_factory, finished_run: Path) -> None:
    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.press("5")
        await pilot.pause()
        select = app.screen.query_one("#sample-source")
        assert select.value == "adapter"  # a completed run: its final adapter first
        assert select.prompt == "pick what to sample from"  # not "no run: ..." with one open
        select.value = "checkpoint-80"
        app.screen.query_one("#prompt", Input).focus()
        await pilot.press(*"Say hi", "enter")
        await wait_for(pilot, lambda: app.samples and app.samples[-1].done, what="the reply")
        assert app.samples[-1].source == "checkpoint-80"
        text = screen_text(app)
        assert "› Say hi" in text and "The adapter learned to answer briefly." in text


async def test_sample_settings_are_validated(app_factory, finished_run: Path) -> None:
    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.press("5")
        app.screen.query_one("#temperature", Input).value = "hot"
        app.screen.query_one("#prompt", Input).value = "x"
        app.screen.query_one(SamplePane).action_generate()
        await pilot.pause()
        assert not app.samples
        said = notes(app)
        assert "temperature 'hot': must be from 0 (greedy) to 5" in said  # the range, not only "fix"


# ---- Palette, keyboard, colour -----------------------------------------------------------------


async def test_command_palette_reaches_every_action(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        names = {c.title for c in app.get_system_commands(app.screen)}
        for wanted in (
            "Show Presets", "Show Memory budget", "Show Dashboard", "Show Runs", "Show Sample", "Start run",
            "Toggle log scale", "Auto-fit memory",
            "Open selected run", "Attach to selected run", "Resume selected run", "Compare marked runs",
            "Generate sample", "Quit",
        ):  # fmt: skip
            assert wanted in names, wanted
        # A run's own controls only while one trains here (test_run_flow checks them there).
        assert not names & {"Stop run", "Save checkpoint now", "Detach from run"}
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"show runs")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert app.screen.query_one(TabbedContent).active == "runs"


async def test_number_keys_switch_panes_and_focus_them(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        for key, pane, focus in (
            ("2", "memory", "gpu-select"),
            ("3", "dashboard", "event-log"),
            ("4", "runs", "runs-table"),
            ("1", "presets", "preset-list"),
        ):
            await pilot.press(key)
            await pilot.pause()
            assert app.screen.query_one(TabbedContent).active == pane
            assert app.focused is not None and app.focused.id == focus


async def test_no_color_is_honoured(app_factory, monkeypatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await pilot.pause()
        assert app.no_color
        svg = app.export_screenshot()
    # Monochrome: every colour in the screenshot is a grey (r == g == b), apart from the SVG
    # template's own window buttons and default text colour.
    import re

    template = {"ff5f57", "febc2e", "28c840", "c5c8c6"}
    colours = set(re.findall(r"#([0-9a-f]{6})", svg)) - template
    assert colours and not {c for c in colours if not c[0:2] == c[2:4] == c[4:6]}


async def test_stop_without_a_run_says_so(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()  # let the panes mount before typing
        await pilot.press("3", "x")
        await pilot.pause()
        assert not app.screen_stack[1:] if len(app.screen_stack) > 1 else True
        assert app.client is None


def test_sample_request_ids_are_unique_per_console() -> None:
    a = protocol.SampleRequest(prompt="x", request_id="console-1-1")
    assert a.request_id != protocol.SampleRequest(prompt="x", request_id="console-2-1").request_id


_ = CRASHED_RUN


async def test_auto_fit_and_a_ranked_suggestion(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        presets = app.screen.query_one(PresetsPane)
        # (batch_split fixed: auto would itself re-split 16 x 4 into micro-batches that fit)
        await select_preset(
            pilot, "llama-3.1-8b-rtx4090", ["train.micro_batch=16", "train.batch_split=fixed"]
        )
        await pilot.press("2")
        await pilot.pause()
        assert "DOES NOT FIT" in screen_text(app)
        await pilot.press("f")  # auto-fit: the batch and length that fit, as overrides
        await wait_for(pilot, lambda: presets.config is not None and presets.config.train.micro_batch < 16)
        await pilot.pause()
        assert "FITS" in screen_text(app) and "DOES NOT FIT" not in screen_text(app)
        # The 8 GB card: nothing fits by batch alone; a ranked suggestion applies with Enter.
        await select_preset(pilot, "llama-3.1-8b-rtx4060")
        advice = app.screen.query_one("#advice", OptionList)
        assert advice.option_count >= 2
        prompts = [str(advice.get_option_at_index(i).prompt) for i in range(advice.option_count)]
        # (Not an unsloth one: on a machine without Unsloth the estimate falls back to hf.)
        fitting = next(i for i, p in enumerate(prompts) if "), fits" in p and "unsloth" not in p)
        advice.focus()
        advice.highlighted = fitting
        await pilot.press("enter")
        await wait_for(
            pilot, lambda: presets.overrides and "✓ FITS" in screen_text(app), what="the suggestion"
        )


# ---- From a new user's session in tmux (2026-12-05) ---------------------------------------------


async def test_enter_on_a_section_opens_the_box_so_typed_letters_start_nothing(app_factory) -> None:
    """Enter on the `model` section row did nothing, and `data.s` typed after it started a run
    at its `s` (the pane's Start key)."""
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("slash", *"tiny", "enter", "enter")  # the list, then the settings
        pane = app.screen.query_one(PresetsPane)
        await wait_for(pilot, lambda: pane.draft is not None and pane.draft.name == "tiny-demo")
        table = app.screen.query_one(SettingsTable)
        assert table.has_focus
        section = next(
            i
            for i in range(table.row_count)
            if str(table.coordinate_to_cell_key((i, 0)).row_key.value) == "data"
        )
        table.move_cursor(row=section)
        await pilot.press("enter", *"source=x.jsonl")
        box = app.screen.query_one("#override-input", Input)
        await wait_for(pilot, lambda: box.value == "data.source=x.jsonl", what="the typed override")
        assert app.history is None or app.history.run_id is None  # no run was started


async def test_the_source_picker_picks_with_the_keyboard_and_follows_the_run(
    app_factory, finished_run: Path
) -> None:
    """Enter in the open list sent the focus to the prompt without picking; and a run that went on
    training (or ended) kept the source it had before."""
    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.press("5")
        await pilot.pause()
        select = app.screen.query_one("#sample-source", Select)
        assert select.value == "adapter"
        select.focus()
        await pilot.press("enter")  # opens the list
        await pilot.pause(0.2)
        await pilot.press("down", "enter")  # the next entry: the newest checkpoint
        await wait_for(pilot, lambda: select.value != "adapter", what="the pick")
        picked = select.value
        assert str(picked).startswith("checkpoint-")
        pane = app.screen.query_one(SamplePane)
        # A pick is kept while it exists; without one, the first source (live, newest) is taken.
        pane.set_sources(FINISHED_RUN, True, ["checkpoint-40", str(picked)])
        assert select.value == picked
        pane.set_sources("another-run", False, ["checkpoint-8"])
        pane.set_sources("another-run", True, ["checkpoint-8"])
        assert select.value == "live"
        pane.set_sources("another-run", False, ["checkpoint-8", "checkpoint-16"])
        assert select.value == "checkpoint-16"


async def test_a_bad_gpu_size_or_name_is_refused_where_it_is_typed(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await select_preset(pilot, "tiny-demo")
        await pilot.press("2", "t", *"abc")
        await wait_for(pilot, lambda: "'abc' is not a size" in screen_text(app), what="the size error")
        # A bare 3080 is an RTX 3080 the catalog lacks, not 3080 GiB: refused as qlc estimate does.
        await pilot.press("ctrl+u", *"3080")
        await wait_for(pilot, lambda: "'3080': unknown GPU '3080'" in screen_text(app), what="the refusal")
        assert "FITS" not in screen_text(app) and app.screen.query_one(MemoryPane).gpu_spec != "3080GB"
        await pilot.press("ctrl+u", *"24")
        await wait_for(pilot, lambda: "of 24.00 GiB" in screen_text(app), what="24 read as GiB")
        await pilot.press("1")
        editor = app.screen.query_one(OverridesEditor)
        editor.edit("hardware.gpu", "")
        await pilot.press(*"rtx9999")
        await wait_for(
            pilot, lambda: "✗ hardware.gpu: unknown GPU 'rtx9999'" in screen_text(app), what="the refusal"
        )


async def test_a_then_enter_applies_the_first_suggestion(app_factory) -> None:
    """`a` focused the advice with nothing highlighted: Enter did nothing until ↓ was pressed."""
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        presets = app.screen.query_one(PresetsPane)
        await select_preset(pilot, "llama-3.1-8b-rtx4060")
        await pilot.press("2")
        await wait_for(
            pilot, lambda: app.screen.query_one("#advice", OptionList).option_count >= 2, what="advice"
        )
        await pilot.press("a", "enter")
        await wait_for(pilot, lambda: presets.overrides, what="the first suggestion applied")


async def test_a_preset_keeps_its_overrides_while_another_is_looked_at(app_factory) -> None:
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        pane = app.screen.query_one(PresetsPane)
        await select_preset(pilot, "tiny-demo", ["train.max_steps=40"])
        await select_preset(pilot, "llama-3.1-8b-rtx4090")
        assert pane.overrides == []
        pane.select("tiny-demo")
        await overrides_shown(pilot, ["train.max_steps=40"])
        assert pane.config is not None and pane.config.train.max_steps == 40


def test_runs_started_in_the_same_minute_read_apart() -> None:
    from tui.widgets.runs_pane import short_ids

    names = short_ids(["20261205-020211-tiny-demo", "20261205-020259-tiny-demo", "20261205-030000-tiny-demo"])
    assert names == {
        "20261205-020211-tiny-demo": "1205-020211 tiny-demo",
        "20261205-020259-tiny-demo": "1205-020259 tiny-demo",
        "20261205-030000-tiny-demo": "1205-0300 tiny-demo",
    }


async def test_the_runs_footer_offers_resume_and_stop_only_where_they_work(
    app_factory, finished_run: Path, crashed_run: Path
) -> None:
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("4")
        pane = app.screen.query_one(RunsPane)
        await wait_for(pilot, lambda: len(pane.summaries) == 2, what="the runs")
        table = pane.query_one("#runs-table")
        for row, summary in enumerate(pane.summaries):
            table.move_cursor(row=row)
            await pilot.pause()
            footer = screen_text(app).splitlines()[-1]
            assert ("r Resume" in footer) == (summary.status not in ("running", "completed")), (
                summary.status,
                footer,
            )
            assert "x Stop" not in footer  # neither is running


async def test_the_data_line_follows_data_bad_records(app_factory, tmp_path: Path) -> None:
    """Setting only data.bad_records re-checks the data: the line had kept the stop's error."""
    from engine.models.tiny import DATASET

    source = tmp_path / "chat.jsonl"
    lines = DATASET.read_text().splitlines()
    source.write_text("\n".join([*lines[:10], "{broken", *lines[10:100]]) + "\n")
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await select_preset(pilot, "tiny-demo")
        pane = app.screen.query_one(PresetsPane)
        pane.apply_overrides([f"data.source={source}"])
        await wait_for(pilot, lambda: "✗ data:" in screen_text(app), what="the bad line named")
        pane.apply_overrides(["data.bad_records=skip"])
        await wait_for(
            pilot,
            lambda: (
                "data: 100 examples (messages)" in screen_text(app)
                and "1 bad record skipped" in screen_text(app)
            ),
            what="the re-check",
        )


async def test_an_empty_runs_list_offers_no_run_keys(app_factory) -> None:
    """With no runs the footer offered Attach, Mark, Compare and Export (the docs promise only
    keys that work); they come with the first run."""
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("4")
        await wait_for(pilot, lambda: "No runs yet" in screen_text(app), what="the empty list")
        footer = screen_text(app).splitlines()[-1]
        for key in ("Attach", "Mark", "Compare", "Export", "Resume", "Stop"):
            assert key not in footer, footer


def _box_text(screen: str, title: str) -> str:
    """The words inside the box titled `title`, its frame and scrollbar left out."""
    rows = screen.splitlines()
    top = next(i for i, row in enumerate(rows) if title in row)
    inside = []
    for row in rows[top + 1 :]:
        if row.strip().startswith("╰"):
            break
        inside.append("".join(" " if "▁" <= c <= "█" else c for c in row.strip().strip("│")))
    return " ".join(" ".join(inside).split())


@pytest.mark.parametrize("size", [(60, 18), (80, 22), (60, 24), (120, 40)])
async def test_the_advice_box_is_whole_at_every_size(app_factory, size: tuple[int, int]) -> None:
    """At 60x18 the verdict wraps to five lines and the breakdown (half the pane) left the
    advice no row: `a` and Enter applied a suggestion no one could see; at 80x22 its lower edge
    was cut. The advice keeps its title, its first suggestion and its edge, and with the focus it
    takes the breakdown's room where the window is short of both."""
    app = app_factory()
    async with app.run_test(size=size) as pilot:
        await select_preset(pilot, "llama-3.1-8b-rtx4060")
        await pilot.press("2")
        await pilot.pause(0.5)
        rows = screen_text(app).splitlines()
        title = next(i for i, row in enumerate(rows) if "what would make it fit" in row)
        assert any(row.strip().startswith("╰") for row in rows[title + 3 :]), screen_text(app)
        # It does not fit: the first suggestion is in view at every size, its outcome too (under
        # 22 rows the plan line under the verdict gives up its wrapped lines for it).
        first = " ".join(
            str(app.screen.query_one("#advice", OptionList).get_option_at_index(0).prompt).split()
        )
        assert "1. " in rows[title + 1] and first in _box_text(screen_text(app), "what would make it fit")
        if size[1] < 22:
            assert any(row.rstrip().endswith("…") and "torch peak" in row for row in rows), screen_text(app)
        await pilot.press("a")
        await pilot.pause(0.3)
        advice = app.screen.query_one("#advice", OptionList)
        assert app.focused is advice and advice.highlighted is not None
        for _ in range(min(3, advice.option_count)):
            # Each suggestion whole on the screen, its outcome ("... fits") too, before Enter.
            shown = _box_text(screen_text(app), "what would make it fit")
            prompt = " ".join(str(advice.get_option_at_index(advice.highlighted).prompt).split())
            assert prompt in shown, screen_text(app)
            await pilot.press("down")
            await pilot.pause(0.2)


async def test_an_override_of_a_key_the_file_omits_sits_in_its_section(app_factory) -> None:
    """data.max_examples (not in tiny-demo.yaml) was listed after the last section, where it
    read as hardware.max_examples; a key of a section the file lacks shows its full name."""
    from tui.widgets.preset_settings import SettingsTable

    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await select_preset(pilot, "tiny-demo")
        app.screen.query_one(PresetsPane).apply_overrides(["data.max_examples=100"])
        table = app.screen.query_one(SettingsTable)
        await wait_for(pilot, lambda: "data.max_examples" in table.rows, what="the override's row")
        await pilot.pause(0.2)
        keys = [str(k.value) for k in table.rows]
        at = keys.index("data.max_examples")
        assert keys[at - 1].startswith("data.") and not keys[at + 1].startswith("data."), keys
        label = str(table.get_row_at(at)[0])
        assert label.strip() == "max_examples" and label.startswith(" "), label


async def test_a_console_opened_on_a_run_shows_its_preset(app_factory, finished_run: Path) -> None:
    """`qlc attach`-ing console (or one that found a run training) showed the list's first preset
    on the Presets pane, unrelated to the run on the dashboard."""
    from engine.config import load_resolved

    expected = load_resolved(finished_run / runs.CONFIG).name
    app = app_factory(attach=FINISHED_RUN)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.history is not None)
        pane = app.screen.query_one(PresetsPane)
        await wait_for(pilot, lambda: pane.selected == expected, what=f"{expected} selected")
        first = app.screen.query_one("#preset-list", OptionList).get_option_at_index(0).id
        assert first != expected  # the test shows something: the list's first is another one


async def test_under_22_rows_the_advice_never_takes_the_focus_away(app_factory) -> None:
    """At 80x20: applying a suggestion that makes the run fit hid the advice box with the focus
    in it (the pane's keys went with it); `a` on a run that fits focused the hidden box and
    hid the breakdown too, leaving the pane blank under the bar."""
    app = app_factory()
    async with app.run_test(size=(80, 20)) as pilot:
        await select_preset(pilot, "llama-3.1-8b-rtx4060")
        await pilot.press("2")
        await pilot.pause(0.5)
        await pilot.press("a")
        await pilot.pause(0.3)
        await pilot.press("enter")
        pane = app.screen.query_one(MemoryPane)
        await wait_for(
            pilot, lambda: pane.has_class("-nothing-to-say"), what="a suggestion that fits, applied"
        )
        await pilot.pause(0.3)
        assert app.focused is not None and pane in app.focused.ancestors_with_self
        await memory_pane_shows(pilot, "tiny-demo", "FITS", what="tiny-demo's verdict")
        await pilot.press("a")
        await pilot.pause(0.3)
        assert not pane.has_class("-advising")
        assert "weights" in screen_text(app)
        assert noted(app, "nothing to change")


async def test_home_and_end_go_to_the_first_and_last_run(
    app_factory, finished_run: Path, crashed_run: Path
) -> None:
    app = app_factory()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("4")
        table = app.screen.query_one("#runs-table")
        await wait_for(pilot, lambda: table.row_count == 2, what="the runs listed")
        table.focus()
        await pilot.press("end")
        await wait_for(pilot, lambda: table.cursor_row == 1, what="the last run")
        await pilot.press("home")
        await wait_for(pilot, lambda: table.cursor_row == 0, what="the first run")


async def test_the_run_under_the_cursor_stays_under_it_when_a_run_comes_in(
    app_factory, runs_root: Path, finished_run: Path, crashed_run: Path
) -> None:
    """The list is read again each time it is shown: a run that came in at the top moved the
    cursor, kept by row, onto another run."""
    app = app_factory()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("4")
        table = app.screen.query_one("#runs-table")
        pane = app.screen.query_one(RunsPane)
        await wait_for(pilot, lambda: table.row_count == 2, what="the runs listed")
        table.move_cursor(row=1)
        await pilot.pause(0.1)
        chosen = pane.selected().id
        fake_engine.make_run_dir(runs_root, "20990101-000000-tiny-demo", recorded_events())
        await pilot.press("1")
        await pilot.press("4")
        await wait_for(pilot, lambda: table.row_count == 3, what="the new run listed")
        assert pane.selected().id == chosen


async def test_a_long_value_shows_whole_in_a_narrow_settings_table(app_factory) -> None:
    """At 60 columns the table cut a hub id to "google…", and its override mark with it, with
    columns to spare. A value too long beside its key goes whole on the lines under it."""
    from tui.widgets.preset_settings import SettingsTable

    app = app_factory()
    async with app.run_test(size=(60, 18)) as pilot:
        await select_preset(pilot, "gemma-3-12b-rtx4090", ["model.name_or_path=google/gemma-3-12b-pt"])
        table = app.screen.query_one(SettingsTable)
        await wait_for(pilot, lambda: "google/gemma-3-12b-pt*" in screen_text(app), what="the whole value")
        row = str(table.get_row("model.name_or_path")[0])
        assert row.splitlines()[:2] == [" name_or_path", "  google/gemma-3-12b-pt*"]


async def test_with_nothing_to_say_the_advice_leaves_the_breakdown_its_rows(app_factory) -> None:
    """At 80x24 a run that fits hid the breakdown's workspace term while the advice box spent
    five rows on "nothing to change: it fits"; it now holds that one line."""
    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await memory_pane_shows(pilot, "tiny-demo", "nothing to change", what="the advice")
        await pilot.pause(0.3)
        text = screen_text(app)
        for term in MEMORY_TERMS:
            assert f" {term} " in text, text
        assert app.screen.query_one("#advice").outer_size.height == 3


async def test_a_resize_does_not_bring_back_a_verdict_that_no_longer_holds(app_factory) -> None:
    """With no estimate (a target module the model lacks), a resize redrew the last estimate's
    "FITS" over the reason."""
    app = app_factory()
    async with app.run_test(size=(120, 40)) as pilot:
        await memory_pane_shows(pilot, "llama-3.1-8b-rtx4090", "FITS", what="the verdict")
        app.screen.query_one(PresetsPane).apply_overrides(["lora.target_modules=[foo_proj]"])
        await wait_for(pilot, lambda: "FITS" not in screen_text(app), what="the verdict gone")
        await pilot.resize_terminal(110, 38)
        await pilot.pause(0.3)
        assert "FITS" not in screen_text(app)
