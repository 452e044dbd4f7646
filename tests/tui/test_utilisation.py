"""Utilisation next to tokens/s: on a GPU the catalog knows, `qlc train`'s step lines and the
dashboard show the share of the card's dense 16-bit peak the run achieves; elsewhere nothing."""

from __future__ import annotations

import pytest

from engine import protocol
from tui.follow import EventPrinter
from tui.history import RunHistory


def _events(device: str, peak: float, world: int = 1) -> list[protocol.Event]:
    return [
        protocol.Hello(device=device, world_size=world, mode="train"),
        protocol.EstimateEvent(flops_per_token=3.4e10, peak_tflops=peak),
        protocol.Step(step=2, tokens_per_s=10_000.0, step_seconds=0.8),
    ]


@pytest.mark.parametrize(
    "device, peak, world, shown",
    [
        ("cuda:0 (NVIDIA H200)", 989.0, 1, "MFU 34%"),  # 10,000 x 3.4e10 / 989e12
        ("2 x cuda (NCCL, ddp)", 989.0, 2, "MFU 17%"),  # the same rate over two cards
        ("cuda:0 (NVIDIA GeForce RTX 4060)", 0.0, 1, None),  # no peak in the catalog
        ("cpu", 989.0, 1, None),  # a CPU run's estimate is for another card
    ],
)
def test_step_lines_and_the_dashboard_show_the_share_of_the_peak(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    peak: float,
    world: int,
    shown: str | None,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    printer, history = EventPrinter(), RunHistory()
    for ev in _events(device, peak, world):
        printer(ev)
        history.apply(ev)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step"))
    share = history.utilisation()
    if shown is None:
        assert "MFU" not in line and share is None
    else:
        assert f"10,000 tok/s · {shown}" in line
        assert f"MFU {share:.0%}" == shown


def test_the_engines_estimate_carries_the_count_and_the_cards_peak() -> None:
    from engine import memory
    from engine.config import load_preset

    cfg = load_preset("llama-3.1-8b-rtx4090")
    gpu = memory.resolve_gpu("h200")
    event = memory.estimate(cfg, gpu=gpu).to_event(gpu)
    assert event.peak_tflops == 989.0 and 3e10 < event.flops_per_token < 6e10
    assert (
        memory.estimate(cfg, gpu=memory.resolve_gpu("24GB")).to_event(memory.resolve_gpu("24GB")).peak_tflops
        == 0
    )


@pytest.mark.parametrize(
    "event, shown",
    [
        (
            protocol.StageEvent(stage="training", message="training 20 steps", current=0, total=20),
            "training 0/20",
        ),
        (
            protocol.StageEvent(stage="saving", message="saving the final adapter"),
            "saving: the final adapter",
        ),
        (
            protocol.StageEvent(stage="preparing_data", message="preparing databricks/databricks-dolly-15k"),
            "preparing data: preparing databricks/databricks-dolly-15k",
        ),
        (protocol.StageEvent(stage="sampling", message="generating"), "sampling: generating"),
    ],
)
def test_a_stage_line_drops_only_a_message_that_restates_it(
    event: protocol.StageEvent,
    shown: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It dropped every message that began with the stage's words: "saving the final adapter"
    printed "saving", and a hub dataset "databricks/..." printed "preparing data"."""
    monkeypatch.setenv("NO_COLOR", "1")
    EventPrinter()(event)
    assert capsys.readouterr().out.strip() == shown
