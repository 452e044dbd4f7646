"""The small words: counts that agree with their nouns, log lines a person can read, memory in GiB
labelled GiB, figures that fit their panel instead of being cut."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import fake_engine
import pytest
from pilot_helpers import screen_text, wait_for

from engine import protocol
from engine.run import runs
from engine.run.control import CommandQueue
from engine.run.events import Emitter, FileSink
from tui.follow import EventPrinter
from tui.history import RunHistory
from tui.output import plural
from tui.widgets.stats import memory_figures


def test_one_token_is_one_token(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert [plural(1, "tokens"), plural(2, "tokens"), plural(1, "batches"), plural(0, "batches")] == [
        "1 token",
        "2 tokens",
        "1 batch",
        "0 batches",
    ]
    reply = protocol.Sample(request_id="r", prompt="hi", text="a", source="live", new_tokens=1, seconds=0.1)
    EventPrinter()(reply)
    assert "(1 token in 0.1 s" in capsys.readouterr().out
    history = RunHistory()
    history.apply(reply)
    assert "(live, 1 token)" in history.log[-1].text


def test_a_command_is_logged_in_words(tmp_path: Path) -> None:
    """It read `received samplerequest from console`."""
    emitter = Emitter([FileSink(tmp_path / "events.jsonl")])
    queue = CommandQueue(emitter)
    queue._handle_line(
        protocol.encode(protocol.SampleRequest(prompt="x", request_id="1")), "the control FIFO"
    )
    queue._handle_line(protocol.encode(protocol.Stop()), "the console that started the run")
    emitter.close()
    logged = [e.message for e in runs.read_events(tmp_path)[0] if isinstance(e, protocol.Log)]
    assert logged == [
        "received a sample request from the control FIFO",
        "received a stop (save first) from the console that started the run",
    ]


def test_gpu_memory_is_read_in_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML reports bytes; an H200's 143,771 MiB is 140.4 GiB (what the estimates use), not the
    150.8 "GB" it showed. There is no GPU here: a stand-in for pynvml answers with an H200's figures."""
    from tui.widgets.gpu import NvmlProbe

    total = 143_771 * 2**20
    info = types.SimpleNamespace(used=20 * 2**30, total=total)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: info,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97),
        nvmlDeviceGetTemperature=lambda h, kind: 60,
        nvmlDeviceGetPowerUsage=lambda h: 500_000,
        NVML_TEMPERATURE_GPU=0,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    (reading,) = NvmlProbe()()
    assert round(reading.mem_total_gb, 1) == 140.4 and reading.mem_used_gb == 20.0


def test_the_memory_figures_fit_their_room() -> None:
    for room, shown in ((30, "est 20.60 · peak 20.81"), (19, "est 20.6 · pk 20.8"), (16, "21 est · 21 pk")):
        assert memory_figures(20.60, 20.81, room) == (shown, ""), room
    assert memory_figures(20.60, 20.81, 40)[0] == "est 20.60 · peak 20.81"
    assert memory_figures(19.0, 21.5, 19) == ("19 est · 22 pk", " +13%")


async def test_the_dashboard_memory_line_is_whole_at_80_columns(app_factory, runs_root: Path) -> None:
    """It read `memory GB  est 20.60 · peak 2…` on an 80-column terminal."""
    events = []
    for ev in fake_engine.synthetic_run(40):
        if isinstance(ev, protocol.EstimateEvent):
            ev = protocol.EstimateEvent(torch_peak_gb=20.60, device_total_gb=22.1, budget_gb=23.99)
        elif isinstance(ev, protocol.Step):
            ev = protocol.Step(step=ev.step, total_steps=40, loss=ev.loss, memory_peak_reserved_gb=20.81)
        events.append(ev)
    fake_engine.make_run_dir(runs_root, "20260104-100000-tiny-demo", events)
    app = app_factory(attach="20260104-100000-tiny-demo")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.history is not None and app.history.finished is not None)
        await pilot.pause(0.6)  # the coalesced redraw
        line = next(x for x in screen_text(app).splitlines() if "torch GiB" in x)
        assert "est 20.6 · pk 20.8" in line and "…" not in line, line


async def test_a_reply_awaited_from_a_checkpoint_says_it_is_loading(app_factory) -> None:
    """Only the live model answers at a step boundary; a checkpoint or the final adapter is
    loaded first (it said "waiting for the next step boundary" for every source)."""
    from tui.history import SampleText

    app = app_factory()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("5")
        app.sample_replies = (SampleText("a", "hi", source="adapter"), SampleText("b", "yo", source="live"))
        await pilot.pause()
        text = screen_text(app)
        assert "loading the base model and adapter…" in text
        assert text.count("waiting for the next step boundary") == 1  # the live one's


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
async def test_setting_comments_are_whole_without_the_cursor_on_them(app_factory, size) -> None:
    """Every visible setting shows its author's comment in full (it was cut to the column's width,
    whole only for the highlighted row)."""
    from pilot_helpers import select_preset

    from tui.widgets.preset_settings import parse_preset_doc

    app = app_factory()
    async with app.run_test(size=size) as pilot:
        await select_preset(pilot, "tiny-demo")
        await pilot.pause(0.3)
        pane_text = " ".join(
            line.split("││", 1)[1].rstrip("│ ▁▂▃▄▅▆▇█")
            for line in screen_text(app).splitlines()
            if "││" in line
        )
        shown = " ".join(pane_text.split())
        doc = parse_preset_doc(
            (Path(__file__).resolve().parents[2] / "presets" / "tiny-demo.yaml").read_text()
        )
        for path in ("model.trust_remote_code", "model.attn_implementation"):  # below the cursor's row
            comment = doc.comment(path)
            assert comment and comment in shown, (path, comment, shown)
