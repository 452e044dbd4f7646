"""Stopping a run: ask first, then show the save happening until the engine says it finished."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, LoadingIndicator, Static

from engine import protocol
from tui.screens.dialog_keys import BUTTON_MOVES, answer
from tui.views import RunView


class StopScreen(ModalScreen[bool]):
    """Dismissed with True once the run finished, False when cancelled or closed before that."""

    BINDINGS: ClassVar[list[BindingType]] = [
        *answer("y", "confirm", "Stop and save", show=False),
        *answer("n,escape", "close", "Close"),
        *BUTTON_MOVES,
    ]

    def __init__(self, run_id: str, step: int, send_stop: Callable[[], str | None]) -> None:
        super().__init__()
        self._run_id, self._step, self._send_stop = run_id, step, send_stop
        self._sent = False
        self._done = False
        self._lines: list[Text] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(f"Stop run {self._run_id}?", style="bold"), classes="dialog-title")
            yield Static(self._body(), classes="dialog-body", id="stop-body")
            yield LoadingIndicator(id="stop-spinner")
            yield Static(id="stop-progress")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Stop and save (y)", variant="error", id="confirm")
                yield Button("Cancel (n)", id="close")

    def _body(self) -> str:
        return (
            f"It finishes the current optimizer step (now at step {self._step}), saves a checkpoint "
            "and exits. `qlc resume` (or r on the Runs pane) continues it from there."
        )

    def on_mount(self) -> None:
        self.query_one("#stop-spinner").display = False
        self.query_one("#close", Button).focus()
        # The step goes on while the dialog is open: it read "now at step 92" at 94.
        self.watch(self.app, "run_view", self._follow_step, init=False)

    def _follow_step(self, view: RunView) -> None:
        h = view.history
        if h is not None and h.run_id == self._run_id and h.step != self._step:
            self._step = h.step
            self.query_one("#stop-body", Static).update(self._body())

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "confirm":
            self.action_confirm()
        else:
            self.action_close()

    def action_confirm(self) -> None:
        if self._sent:
            return
        problem = self._send_stop()
        if problem:
            self._line(Text("✗ " + problem, style="bold red"))
            return
        self._sent = True
        self.query_one("#confirm", Button).display = False
        self.query_one("#close", Button).label = "Hide (n)"
        self.query_one("#stop-spinner").display = True
        self._line(Text("stop sent: finishing the current step…"))

    def action_close(self) -> None:
        self.dismiss(self._done)

    def note(self, event: protocol.Event) -> None:
        """An event of the stopping run: show the save progressing."""
        if not self._sent:
            return
        if isinstance(event, protocol.StageEvent) and event.stage in ("saving", "finishing"):
            self._line(Text(f"{event.stage}… {event.message}".strip()))
        elif isinstance(event, protocol.CheckpointSaved):
            self._line(
                Text(
                    f"✓ saved {Path(event.path).name} ({event.size_mb:.1f} MB in {event.seconds:.1f} s)",
                    style="green",
                )
            )
        elif isinstance(event, protocol.ErrorEvent):
            self._line(Text(f"✗ {event.message}", style="bold red"))
        elif isinstance(event, protocol.Finished):
            self._done = True
            self.query_one("#stop-spinner").display = False
            where = f", checkpoint {Path(event.last_checkpoint).name}" if event.last_checkpoint else ""
            self._line(Text(f"✓ {event.status} at step {event.step}{where}", style="bold green"))
            self.query_one("#close", Button).label = "Close (n)"

    def ended(self) -> None:
        """The engine process is gone (with or without a `finished` event)."""
        if not self._done:
            self._done = True
            self.query_one("#stop-spinner").display = False
            self._line(Text("engine exited", style="dim"))

    def _line(self, text: Text) -> None:
        self._lines.append(text)
        self.query_one("#stop-progress", Static).update(Text("\n").join(self._lines[-6:]))
