"""The overrides editor: `key=value` lines checked as they are typed, with the CLI's own rules.

Validation is engine.config's: `parse_override` for the key, then the preset's `PresetDraft` with
every override so far plus the one being typed, so a value that is fine alone but clashes with
another setting (or a typo'd key, with its "did you mean") shows before it is applied. The draft
is re-validated in a worker thread, once per keystroke and never re-read from disk; Enter checks
the line once more, at once (about 5 ms), against the overrides applied so far, and applies it.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Static

from engine.config import PresetDraft, merge_override, override_key, parse_override
from engine.errors import ConfigError, UserError
from tui.views import focus_now
from tui.widgets.in_order_input import InOrderInput
from tui.widgets.preset_settings import format_setting

__all__ = ["OverridesEditor", "check_override", "merge_override", "override_key"]


def check_override(draft: PresetDraft, text: str) -> tuple[bool, str, PresetDraft | None]:
    """(valid, what to show, the draft with `text` applied): the new value and the old one, or
    the problems."""
    text = text.strip()
    if not text:
        return False, "", None
    try:
        key, _ = parse_override(text)
    except ConfigError as exc:
        return False, "; ".join(p.removeprefix("--set ") for p in exc.problems), None
    after = draft.with_overrides(merge_override(draft.overrides, text))
    if not after.valid:
        # Problems of this line name it (`--set lr=abc: ...`, as the CLI would); others follow.
        mine = [p.removeprefix(f"--set {text}: ") for p in after.problems if p.startswith(f"--set {text}: ")]
        relevant = [f"{key}: {p}" for p in mine] or [p.removeprefix("--set ") for p in after.problems]
        return False, "; ".join(relevant), None
    if key == "hardware.gpu" and after.config is not None:
        from engine import preflight  # `qlc train`'s own check of the name (loaded on first use)

        try:
            preflight.check_gpu_name(after.config)
        except UserError as exc:
            return False, str(exc), None
    new = format_setting(after.value(key))
    old = format_setting(draft.value(key)) if draft.valid else "?"
    # The preset's own value (and the other overrides'): no override to keep, where one counted
    # and marked the setting changed (`hardware.strategy=ddp` on a ddp preset showed `ddp*`).
    others = [o for o in after.overrides if parse_override(o)[0] != key]
    without = draft.with_overrides(others)
    if without.valid and without.value(key) == after.value(key):  # (the values: 6 digits shown)
        return True, f"{key}: {new} (the preset's own value: no override)", without
    # The new value first: the line is cut at the box's width, and a long old value (a path)
    # hid the one being typed.
    return True, f"{key}: {new} (was {old})" if old != new else f"{key}: {new} (unchanged)", after


class OverridesEditor(Vertical):
    """One input line, its verdict, and the overrides applied so far."""

    class Changed(Message):
        """The applied overrides changed (added, replaced, removed or cleared): `draft` holds them,
        validated."""

        def __init__(self, draft: PresetDraft) -> None:
            super().__init__()
            self.draft = draft

        @property
        def overrides(self) -> list[str]:
            return list(self.draft.overrides)

    class Checked(Message):
        """A line's check, done in a worker thread."""

        def __init__(self, text: str, ok: bool, message: str, draft: PresetDraft | None) -> None:
            super().__init__()
            self.text = text
            self.ok = ok
            self.message = message
            self.draft = draft

    class Revalidated(Message):
        """Other overrides, validated in a worker thread."""

        def __init__(self, draft: PresetDraft) -> None:
            super().__init__()
            self.draft = draft

    def __init__(self, *, return_to: str | None = None, id: str | None = None) -> None:
        """`return_to`: the widget (a selector) that gets the focus once Enter applied a line."""
        super().__init__(id=id)
        self._return_to = return_to
        self.draft: PresetDraft | None = None

    @property
    def overrides(self) -> list[str]:
        return list(self.draft.overrides) if self.draft is not None else []

    def compose(self) -> ComposeResult:
        yield InOrderInput(
            placeholder="override key=value (e.g. lr=1e-4), Enter applies",
            compact=True,
            id="override-input",
            select_on_focus=False,  # edit() prefills key=value; typing must extend it, not replace it
        )
        yield Static(id="override-status")
        yield Static(id="override-list")

    def set_draft(self, draft: PresetDraft | None) -> None:
        """A newly selected preset (or the same one, read again): the line and its verdict clear."""
        self.draft = draft
        self.query_one("#override-input", Input).value = ""
        self._show_list()
        self.query_one("#override-status", Static).update("")

    def edit(self, path: str, value: str | None) -> None:
        """Start editing one setting: its current value prefilled, the cursor at the end; for a
        section (value None), `section.` and the key to type. The focus moves at once (the
        settings table's Enter is a priority binding), so keys typed right after Enter, Ctrl-U
        and a new value in one burst over SSH, are typed here, after the prefill."""
        box = self.query_one("#override-input", Input)
        box.value = f"{path}." if value is None else f"{path}={value}"
        box.cursor_position = len(box.value)
        focus_now(box)

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        text = event.value
        if not text.strip():
            self._show_verdict(True, "")
            return
        if self.draft is None:
            self._show_verdict(False, "pick a preset first")
            return
        draft = self.draft
        self.run_worker(
            lambda: self.post_message(self.Checked(text, *check_override(draft, text))),
            thread=True,
            exclusive=True,
            group="override-check",
            exit_on_error=False,
        )

    def on_overrides_editor_checked(self, message: Checked) -> None:
        message.stop()
        if message.text != self.query_one("#override-input", Input).value:
            return  # typed on since: a newer check follows
        self._show_verdict(message.ok, message.message)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter: apply the line, checked again here (about 5 ms) against the overrides applied so
        far, not in a worker: over SSH a burst (Ctrl-U, a value, Enter, the next one) arrives at
        once, and a deferred check was overtaken by the next line's keys, which dropped it. On
        success the focus goes back (`return_to`) at once. (Enter stays the box's own binding, not
        a priority one: that would run before the box has typed the keys queued ahead of it.)"""
        event.stop()
        box = self.query_one("#override-input", Input)
        text = event.value
        if self.draft is None or not text.strip():
            return
        ok, message, after = check_override(self.draft, text)
        self._show_verdict(ok, message)
        if not ok or after is None:
            return  # the status line says why; the line stays to be fixed
        # Keys typed after Enter may be in the box already (the box types them before this message
        # reaches the editor): they are the next line's, and the box keeps the focus for them.
        typed_on = box.value[len(text) :] if box.value.startswith(text) else box.value
        box.value = typed_on
        self.query_one("#override-status", Static).update(Text("applied " + message, style="green"))
        if self._return_to is not None and not typed_on:  # back to the settings: s starts, Enter edits
            focus_now(self.screen.query_one(self._return_to))
        self._changed(after)

    def add(self, extra: list[str]) -> None:
        """Apply overrides from elsewhere (the Memory pane's auto-fit) as if typed here."""
        overrides = self.overrides
        for text in extra:
            overrides = merge_override(overrides, text)
        self._revalidate(overrides)

    def remove(self, path: str) -> bool:
        kept = [o for o in self.overrides if override_key(o) != path]
        if len(kept) == len(self.overrides):
            return False
        self._revalidate(kept)
        return True

    def clear(self) -> None:
        if self.overrides:
            self._revalidate([])

    def _revalidate(self, overrides: list[str]) -> None:
        """The preset with other overrides, validated in a worker thread, then applied."""
        if self.draft is None:
            return
        draft = self.draft
        self.run_worker(
            lambda: self.post_message(self.Revalidated(draft.with_overrides(overrides))),
            thread=True,
            group="override-apply",
            exit_on_error=False,
        )

    def on_overrides_editor_revalidated(self, message: Revalidated) -> None:
        message.stop()
        if self.draft is not None and message.draft.path == self.draft.path:
            self._changed(message.draft)

    def _changed(self, draft: PresetDraft) -> None:
        self.draft = draft
        self._show_list()
        self.post_message(self.Changed(draft))

    def _show_verdict(self, ok: bool, message: str) -> None:
        status = self.query_one("#override-status", Static)
        box = self.query_one("#override-input", Input)
        box.set_class(not ok and bool(message), "-invalid")
        if not message:
            status.update("")
        elif ok:
            status.update(Text("✓ " + message, style="green"))
        else:
            status.update(Text("✗ " + message, style="bold red"))

    def _show_list(self) -> None:
        overrides = self.overrides
        # One line, cut at the box's width: the count says how many a cut line holds.
        head = f"overrides ({len(overrides)}): " if len(overrides) > 1 else "overrides: "
        text = head + (" · ".join(overrides) if overrides else "none")
        self.query_one("#override-list", Static).update(Text(text, style="dim" if not overrides else ""))
