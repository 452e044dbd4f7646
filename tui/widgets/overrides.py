"""The overrides editor: `key=value` lines checked as they are typed, with the CLI's own rules.

Validation is engine.config's: `parse_override` for the key, then the preset's `PresetDraft` with
every override so far plus the one being typed, so a value that is fine alone but clashes with
another setting (or a typo'd key, with its "did you mean") shows before it is applied. The draft
is re-validated in a worker thread, once per keystroke and never re-read from disk; Enter applies
the draft that check already built.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Static

from engine.config import PresetDraft, merge_override, override_key, parse_override
from engine.errors import ConfigError, UserError
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
    return True, f"{key}: {old} → {new}" if old != new else f"{key}: {new} (unchanged)", after


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

        def __init__(
            self, text: str, ok: bool, message: str, draft: PresetDraft | None, apply: bool = False
        ) -> None:
            super().__init__()
            self.text = text
            self.ok = ok
            self.message = message
            self.draft = draft
            self.apply = apply  # Enter came first: apply it once checked

    class Revalidated(Message):
        """Other overrides, validated in a worker thread."""

        def __init__(self, draft: PresetDraft) -> None:
            super().__init__()
            self.draft = draft

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.draft: PresetDraft | None = None
        self._checked: OverridesEditor.Checked | None = None  # the last line checked

    @property
    def overrides(self) -> list[str]:
        return list(self.draft.overrides) if self.draft is not None else []

    def compose(self) -> ComposeResult:
        yield Input(
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
        self._checked = None
        self.query_one("#override-input", Input).value = ""
        self._show_list()
        self.query_one("#override-status", Static).update("")

    def edit(self, path: str, value: str | None) -> None:
        """Start editing one setting: its current value prefilled, the cursor at the end; for a
        section (value None), `section.` and the key to type."""
        box = self.query_one("#override-input", Input)
        box.value = f"{path}." if value is None else f"{path}={value}"
        box.cursor_position = len(box.value)
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        text = event.value
        if not text.strip():
            self._checked = None
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
        self._checked = message
        self._show_verdict(message.ok, message.message)
        if message.apply:
            self._apply(message)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        checked = self._checked
        if checked is not None and checked.text == event.value:
            self._apply(checked)
        elif self.draft is not None and event.value.strip():
            # Enter before the keystroke's check came back: check once more, applying when it does.
            draft, text = self.draft, event.value

            def check_and_apply() -> None:
                self.post_message(self.Checked(text, *check_override(draft, text), apply=True))

            self.run_worker(
                check_and_apply, thread=True, exclusive=True, group="override-check", exit_on_error=False
            )

    def _apply(self, checked: Checked) -> None:
        if not checked.ok or checked.draft is None:
            return  # the status line already says why
        self.query_one("#override-input", Input).value = ""
        self.query_one("#override-status", Static).update(Text("applied " + checked.message, style="green"))
        self._checked = None
        self._changed(checked.draft)

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
        text = "overrides: " + (" · ".join(overrides) if overrides else "none")
        self.query_one("#override-list", Static).update(Text(text, style="dim" if not overrides else ""))
