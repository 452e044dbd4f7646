"""The App's part in the keyboard: what the footer offers where the focus is, and the way out of
a text box. A mixin of QlcApp.

A text box types printable keys, so while one has focus the footer offers none of them, only
Escape (`leave_input`, a priority binding: the focus has moved before the next key is read).
Stop, Save now and Detach are offered only while the watched run trains here.
"""

from __future__ import annotations

import time
from typing import Any

from textual import events
from textual.widgets import HelpPanel, Input, TabbedContent

from tui.palette import LEAVE_TO
from tui.views import focus_now

# Printable keys closer than this are typing, not a key pressed on its own (a person's separate
# presses are further apart; a burst pasted or typed ahead over SSH arrives at once).
TYPING_GAP_S = 0.3


class KeyActions:
    _printable_at: tuple[float, float] = (-1.0, -TYPING_GAP_S)  # when the last two printable keys came
    focused: Any
    screen_stack: Any
    live: Any
    _focus_pane: Any
    action_quit: Any
    screen: Any
    action_show_help_panel: Any
    action_hide_help_panel: Any
    notify: Any

    _last_key_printable = False  # the key being handled, for an action a key binding runs

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key) and not event.is_forwarded:
            self._last_key_printable = event.is_printable
            if event.is_printable:
                self._printable_at = (self._printable_at[1], time.monotonic())
        await super().on_event(event)  # type: ignore[misc]

    def in_a_burst(self) -> bool:
        """The key being handled is printable and came right after another: text typed into no
        box (the focus was elsewhere), not a single key meant as a command. An action the command
        palette runs comes on its Enter, however fast its name was typed."""
        before, last = self._printable_at
        return self._last_key_printable and last - before < TYPING_GAP_S

    def refused_in_a_burst(self, key: str, what: str) -> bool:
        """True, with a note, when `key` came in the middle of typing: text typed where no box had
        the focus ("data.max_examples=1000" landing on the preset list) must not start a run
        with its "s" (GPU hours), reset the overrides with its "r" or auto-fit with its "f"."""
        if not self.in_a_burst():
            return False
        self.notify(
            f"{key} came in the middle of typing: press {key} on its own to {what}", severity="warning"
        )
        return True

    def typing(self) -> bool:
        """A text box has focus: it takes printable keys, so the footer offers none of them."""
        return isinstance(self.focused, Input)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """What the footer offers (and the keys do): nothing typed into a box, and no run
        actions on a run that is not training here (a completed run has nothing to stop)."""
        if action == "leave_input":  # in the main screen: a dialog's Escape is the dialog's
            return self.typing() and len(self.screen_stack) == 1
        if action == "hide_keys":
            return self.keys_shown()
        if action == "toggle_keys":  # `?` typed in a box is a question mark
            return not self.typing()
        if action == "show_pane":  # the digits of a text box, or a dialog's keys, are theirs
            return not self.typing() and len(self.screen_stack) == 1
        if action in ("request_quit", "start_run", "auto_fit") and self.typing():
            return False
        if action in ("stop_run", "save_checkpoint", "detach_run"):
            return self.live()
        return True

    def keys_shown(self) -> bool:
        return bool(self.screen.query(HelpPanel))

    def action_toggle_keys(self) -> None:
        if self.keys_shown():
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def action_hide_keys(self) -> None:
        self.action_hide_help_panel()

    def action_leave_input(self) -> None:
        focused = self.focused
        target = LEAVE_TO.get(focused.id or "") if focused is not None else None
        if target is not None:
            focus_now(self.screen_stack[0].query_one(target))
        else:
            self._focus_pane(self.screen_stack[0].query_one(TabbedContent).active)

    async def action_request_quit(self) -> None:
        await self.action_quit()
