"""The overrides editor: `key=value` lines checked as they are typed, with the CLI's own rules.

Validation is engine.config's: `parse_override` for the key, then `load_preset` with every
override so far plus the one being typed, so a value that is fine alone but clashes with another
setting (or a typo'd key, with its "did you mean") shows before it is applied.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.validation import ValidationResult, Validator
from textual.widgets import Input, Static

from engine.config import RunConfig, load_preset, parse_override
from engine.errors import ConfigError, UserError
from tui.widgets.preset_settings import format_setting, lookup


def override_key(text: str) -> str | None:
    try:
        return parse_override(text)[0]
    except UserError:
        return None


def merge_override(overrides: list[str], text: str) -> list[str]:
    """`text` replaces any override of the same (canonical) key; order is kept otherwise."""
    key = override_key(text)
    kept = [o for o in overrides if override_key(o) != key]
    return [*kept, text.strip()]


def check_override(preset: str, overrides: list[str], text: str) -> tuple[bool, str]:
    """(valid, what to show): the new value and the old one, or the problems."""
    text = text.strip()
    if not text:
        return False, ""
    try:
        key, _ = parse_override(text)
    except ConfigError as exc:
        return False, "; ".join(p.removeprefix("--set ") for p in exc.problems)
    try:
        before = load_preset(preset, overrides)
    except UserError:
        before = None
    try:
        after = load_preset(preset, merge_override(overrides, text))
    except ConfigError as exc:
        relevant = [p for p in exc.problems if p.startswith(key)] or exc.problems
        return False, "; ".join(relevant)
    except UserError as exc:
        return False, str(exc)
    new = format_setting(lookup(after.to_dict(), key))
    old = format_setting(lookup(before.to_dict(), key)) if before is not None else "?"
    return True, f"{key}: {old} → {new}" if old != new else f"{key}: {new} (unchanged)"


class _OverrideValidator(Validator):
    def __init__(self, check: Callable[[str], tuple[bool, str]]) -> None:
        super().__init__()
        self._check = check

    def validate(self, value: str) -> ValidationResult:
        ok, message = self._check(value)
        return self.success() if ok or not value.strip() else self.failure(message)


class OverridesEditor(Vertical):
    """One input line, its verdict, and the overrides applied so far."""

    class Changed(Message):
        """The applied overrides changed (added, replaced, removed or cleared)."""

        def __init__(self, overrides: list[str], config: RunConfig | None) -> None:
            super().__init__()
            self.overrides = overrides
            self.config = config

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.preset: str | None = None
        self.overrides: list[str] = []

    def compose(self) -> ComposeResult:
        yield Input(
            placeholder="override key=value (e.g. lr=1e-4), Enter applies",
            compact=True,
            id="override-input",
            validators=[_OverrideValidator(self._check)],
            validate_on=["changed", "submitted"],
            select_on_focus=False,  # edit() prefills key=value; typing must extend it, not replace it
        )
        yield Static(id="override-status")
        yield Static(id="override-list")

    def _check(self, text: str) -> tuple[bool, str]:
        if self.preset is None:
            return False, "pick a preset first"
        return check_override(self.preset, self.overrides, text)

    def set_preset(self, preset: str | None, overrides: list[str] | None = None) -> None:
        self.preset = preset
        self.overrides = list(overrides or [])
        self.query_one("#override-input", Input).value = ""
        self._show_list()
        self.query_one("#override-status", Static).update("")

    def edit(self, path: str, value: str) -> None:
        """Start editing one setting: its current value prefilled, the cursor at the end."""
        box = self.query_one("#override-input", Input)
        box.value = f"{path}={value}"
        box.cursor_position = len(box.value)
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        ok, message = self._check(event.value) if event.value.strip() else (True, "")
        status = self.query_one("#override-status", Static)
        if not event.value.strip():
            status.update("")
        elif ok:
            status.update(Text("✓ " + message, style="green"))
        else:
            status.update(Text("✗ " + message, style="bold red"))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        ok, message = self._check(event.value)
        if not ok:
            return  # the status line already says why
        self.overrides = merge_override(self.overrides, event.value)
        event.input.value = ""
        self.query_one("#override-status", Static).update(Text("applied " + message, style="green"))
        self._changed()

    def remove(self, path: str) -> bool:
        kept = [o for o in self.overrides if override_key(o) != path]
        if len(kept) == len(self.overrides):
            return False
        self.overrides = kept
        self._changed()
        return True

    def clear(self) -> None:
        if self.overrides:
            self.overrides = []
            self._changed()

    def _changed(self) -> None:
        self._show_list()
        cfg = None
        if self.preset is not None:
            try:
                cfg = load_preset(self.preset, self.overrides)
            except UserError:
                cfg = None
        self.post_message(self.Changed(list(self.overrides), cfg))

    def _show_list(self) -> None:
        text = "overrides: " + (" · ".join(self.overrides) if self.overrides else "none")
        self.query_one("#override-list", Static).update(Text(text, style="dim" if not self.overrides else ""))
