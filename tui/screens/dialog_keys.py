"""Keys every dialog binds the same way."""

from __future__ import annotations

from textual.binding import Binding


def answer(keys: str, action: str, description: str, show: bool = True) -> list[Binding]:
    """A dialog's answer key, twice: a priority binding, so the dialog closes as the key is read
    ("n" and "4" in one read: the 4 lands on the pane), and a plain copy for a key read before
    the dialog was up ("x" and "y" in one read: the y comes round to the dialog)."""
    return [Binding(keys, action, description, show=show, priority=True), Binding(keys, action, show=False)]


# Between the buttons, as in most dialogs (Tab does it too).
BUTTON_MOVES = [
    Binding("left", "app.focus_previous", "Previous button", show=False),
    Binding("right", "app.focus_next", "Next button", show=False),
]
