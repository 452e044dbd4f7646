"""An Input whose editing keys act in the order they were typed.

Textual types a printable key in the Input itself, but runs the Input's key bindings (Ctrl-U,
Backspace, Enter, the arrows) only once the key has bubbled up to the App, through each parent's
message queue. Typed one at a time the difference never shows; over SSH a burst arrives at once
and Ctrl-U then `lr=2e-4` cleared the value typed after it, and Enter submitted before the last
characters were in. Here the Input's own bindings run as the key reaches it.
"""

from __future__ import annotations

from textual import events
from textual.widgets import Input


class InOrderInput(Input):
    async def _on_key(self, event: events.Key) -> None:
        for binding in self._bindings.key_to_bindings.get(event.key, ()):
            # App.run_action parses the action's arguments, asks check_action, and says whether it
            # ran: one that declines (Ctrl-C with nothing selected) lets the key go on to the App.
            if not binding.priority and await self.app.run_action(binding.action, self):
                event.stop()
                event.prevent_default()
                return
        await super()._on_key(event)
