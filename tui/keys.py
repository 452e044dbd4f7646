"""The App's part in the keyboard: what the footer offers where the focus is, and the way out of
a text box. A mixin of QlcApp.

A text box types printable keys, so while one has focus the footer offers none of them, only
Escape (`leave_input`, a priority binding: the focus has moved before the next key is read).
Stop, Save now and Detach are offered only while the watched run trains here.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from textual import events
from textual.widgets import HelpPanel, Input, TabbedContent
from textual.widgets._select import SelectOverlay

from tui.palette import LEAVE_TO
from tui.views import focus_now

# Printable keys closer than this are typing, not a key pressed on its own (a person's separate
# presses are further apart; a burst pasted or typed ahead over SSH arrives at once).
TYPING_GAP_S = 0.3
# Keys closer than this came in one read: typed ahead over a slow link, or pasted. A person's
# quickest command keys ("3", "x", "y" for a stop) are several times further apart.
TYPE_AHEAD_GAP_S = 0.05
# The keys remembered for those judgements; a key handled after this many others were read came
# in a burst.
READ_KEYS_KEPT = 32


@dataclass
class ReadKey:
    """A key as the App read it: the event, when it arrived (the event's own time, not when it was
    handled, which a slow pane switch delays), and whether a command took it (a pane's digit: not
    typing, for the key after it)."""

    event: events.Key
    time: float
    command: bool = False

    @property
    def printable(self) -> bool:
        return self.event.is_printable


class KeyActions:
    # The keys the App read last, in order. A non-printable key between two letters (Down
    # between two spaces on the Runs pane) ends a burst.
    _read: deque[ReadKey]
    _handling: events.Key | None = None  # the key whose bindings run now
    _burst_noted_at = -1.0  # when the last "ignored" note was shown: one note a burst
    focused: Any
    screen_stack: Any
    live: Any
    _focus_pane: Any
    action_quit: Any
    screen: Any
    action_show_help_panel: Any
    action_hide_help_panel: Any
    notify: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read = deque(maxlen=READ_KEYS_KEPT)

    async def on_event(self, event: events.Event) -> None:
        if not isinstance(event, events.Key):
            await super().on_event(event)  # type: ignore[misc]
            return
        if not event.is_forwarded:
            self._read.append(ReadKey(event, event.time))
            if self._typed_ahead() and not self._takes_text():
                # Text typed ahead where no box has the focus ("lr=2e-4" landing on the preset
                # list in one read): its digits would switch panes, its letters export or stop.
                # From the third key of such a burst on, keys are dropped; the actions that cost
                # most (s, r, f) also refuse a key that came within TYPING_GAP_S of another.
                now = time.monotonic()
                if now - self._burst_noted_at > 1.0:
                    self.notify(
                        "typing outside a text box is ignored: Enter on a setting or / opens one",
                        severity="warning",
                        timeout=4,
                    )
                self._burst_noted_at = now
                return
        # A priority binding runs as the key is read; any other when the key has bubbled back
        # from the focused widget, after the keys read since: either way within this call.
        outer, self._handling = self._handling, event
        try:
            await super().on_event(event)  # type: ignore[misc]
        finally:
            self._handling = outer

    def _typed_ahead(self) -> bool:
        """The last three keys were printable and came in one read (TYPE_AHEAD_GAP_S apart)."""
        last = list(self._read)[-3:]
        times = [k.time for k in last if k.printable]
        return len(times) == 3 and all(b - a < TYPE_AHEAD_GAP_S for a, b in itertools.pairwise(times))

    def _takes_text(self) -> bool:
        """The focused widget types printable keys: a text box, or a picker's type-to-search."""
        return isinstance(self.focused, Input | SelectOverlay)

    def _handled_at(self) -> int | None:
        """Where the key being handled stands among the keys read, or None for no key (a click,
        the palette's Enter ran it... ) or one read too long ago to be kept."""
        return next((i for i, k in enumerate(self._read) if k.event is self._handling), None)

    def mark_command(self) -> None:
        """The key being handled was a command (a pane's digit), not typing: a key pressed
        right after it ("2" then "f") is pressed on its own."""
        if (i := self._handled_at()) is not None:
            self._read[i].command = True

    def in_a_burst(self) -> bool:
        """The key being handled is printable and came right after another printable one that
        no command took, or right before one: text typed into no box (the focus was elsewhere),
        not a single key meant as a command. The key is the one whose binding runs, not the last
        one read: a non-priority binding runs after the keys read since ("ls" then Enter). An
        action the command palette runs comes on its Enter, however fast its name was typed, and
        a click is no key."""
        if self._handling is None:
            return False
        i = self._handled_at()
        if i is None:  # READ_KEYS_KEPT keys were read after it before it was handled: a burst
            return True
        key = self._read[i]
        if not key.printable:
            return False
        if i == 0 and len(self._read) == self._read.maxlen:
            return True  # the key before it left the record: READ_KEYS_KEPT came at once
        before = self._read[i - 1] if i else None
        if before and before.printable and not before.command and key.time - before.time < TYPING_GAP_S:
            return True
        # The first key of a burst ("seq_len=1024" typed ahead) is judged by the key after it,
        # read before its binding ran.
        after = self._read[i + 1] if i + 1 < len(self._read) else None
        return after is not None and after.printable and after.time - key.time < TYPING_GAP_S

    def refused_in_a_burst(self, key: str, what: str) -> bool:
        """True, with a note, when `key` came in the middle of typing: text typed where no box had
        the focus ("data.max_examples=1000" landing on the preset list) must not start a run
        with its "s" (GPU hours), reset the overrides with its "r" or auto-fit with its "f"."""
        if not self.in_a_burst():
            return False
        self._burst_noted_at = time.monotonic()
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
