"""Quitting while a run trains: detach (it keeps training) or stop it (it saves first)."""

from __future__ import annotations

from typing import ClassVar, Literal

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

QuitChoice = Literal["detach", "stop"] | None


class QuitScreen(ModalScreen[QuitChoice]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("d", "choose('detach')", "Detach", priority=True),
        Binding("s", "choose('stop')", "Stop run", priority=True),
        Binding("escape,n", "choose(None)", "Cancel", priority=True),
        # The same keys, for one read before the dialog was up ("q" "d" in one read).
        Binding("d", "choose('detach')", show=False),
        Binding("s", "choose('stop')", show=False),
        Binding("escape,n", "choose(None)", show=False),
        # Between the buttons, as in most dialogs (Tab does it too).
        Binding("left", "app.focus_previous", "Previous button", show=False),
        Binding("right", "app.focus_next", "Next button", show=False),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self._run_id = run_id

    def compose(self) -> ComposeResult:
        body = Text.assemble(
            ("Run ", ""),
            (self._run_id, "bold"),
            " is still training.\n\n",
            ("Detach", "bold"),
            f": quit; the run keeps training. `qlc` (Runs pane) or `qlc attach {self._run_id}` "
            "brings it back with its full history.\n",
            ("Stop", "bold"),
            ": finish the current step, save a checkpoint, then quit.",
        )
        with Vertical(classes="dialog"):
            yield Static(Text("Quit the console?", style="bold"), classes="dialog-title")
            yield Static(body, classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Detach (d)", variant="primary", id="detach")
                yield Button("Stop run (s)", variant="error", id="stop")
                yield Button("Cancel (Esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#detach", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "cancel" else event.button.id)  # type: ignore[arg-type]

    def action_choose(self, choice: str | None) -> None:
        self.dismiss(choice)  # type: ignore[arg-type]
