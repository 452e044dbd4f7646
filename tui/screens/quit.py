"""Quitting while a run trains: detach (it keeps training) or stop it (it saves first)."""

from __future__ import annotations

from typing import ClassVar, Literal

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from tui.screens.dialog_keys import BUTTON_MOVES, answer

QuitChoice = Literal["detach", "stop"] | None


class QuitScreen(ModalScreen[QuitChoice]):
    BINDINGS: ClassVar[list[BindingType]] = [
        *answer("d", "choose('detach')", "Detach"),
        *answer("s", "choose('stop')", "Stop run"),
        *answer("escape,n", "choose(None)", "Cancel"),
        *BUTTON_MOVES,
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
