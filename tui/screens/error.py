"""An error the user can act on: what happened, the engine's hint, and the calculator's advice.

The console stays up behind it; Enter or Escape closes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from tui.screens.dialog_keys import answer


class ErrorScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        *answer("escape,enter,q", "close", "Close"),
    ]

    def __init__(self, title: str, message: str, hint: str = "", advice: Sequence[str] = ()) -> None:
        super().__init__()
        self._title, self._message, self._hint, self._advice = title, message, hint, list(advice)

    def compose(self) -> ComposeResult:
        body = Text(self._message)
        if self._hint:
            body.append("\n\nWhat to do: ", "bold")
            body.append(self._hint)
        if self._advice:
            body.append("\n\nWhat would make it fit:", "bold")
            for i, item in enumerate(self._advice, 1):
                body.append(f"\n  {i}. {item}")
        with Vertical(classes="dialog error-dialog"):
            yield Static(Text("✗ " + self._title, style="bold"), classes="dialog-title")
            with VerticalScroll(classes="dialog-scroll"):
                yield Static(body, classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Close (Enter)", variant="primary", id="close")

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
