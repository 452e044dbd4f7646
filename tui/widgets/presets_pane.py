"""The Presets pane: pick a preset, read its settings and their comments, override, start."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import yaml
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option, OptionDoesNotExist

from engine.config import PresetDraft, RunConfig, draft_preset, list_presets
from engine.errors import UserError
from tui.views import BudgetState, focus_now
from tui.widgets.in_order_input import InOrderInput
from tui.widgets.overrides import OverridesEditor
from tui.widgets.preset_settings import PresetDoc, SettingsTable, parse_preset_doc

# libyaml when present: the list only needs each file's description, and is read at start-up.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class PresetInfo:
    name: str
    path: Path
    description: str


def discover_presets() -> list[PresetInfo]:
    found = []
    for path in list_presets():
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER) or {}
        except (OSError, yaml.YAMLError) as exc:
            found.append(PresetInfo(path.stem, path, f"(unreadable: {type(exc).__name__})"))
            continue
        if not isinstance(data, dict):
            continue
        if not any(section in data for section in ("model", "train", "lora")):
            continue  # not a run preset (presets/gpus.yaml, the GPU catalog, lives beside them)
        found.append(PresetInfo(path.stem, path, str(data.get("description", "") or "")))
    return found


class FilterInput(InOrderInput):
    """The presets filter: Down or Enter goes on to the list it filters (priority bindings: the
    list has the focus before the next key is read)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("down,enter", "to_list", "To the list", show=False, priority=True)
    ]

    def action_to_list(self) -> None:
        focus_now(self.screen.query_one("#preset-list", OptionList))


# The keys that move the preset list's highlight and the settings table's cursor.
MOVE_KEYS = {
    "up": "Up",
    "down": "Down",
    "pageup": "Page up",
    "pagedown": "Page down",
    "home": "First",
    "end": "Last",
}


class PresetsPane(Horizontal):
    """A filterable list of presets; the selected one's settings; the overrides editor."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "app.start_run", "Start run"),
        Binding("slash", "focus_filter", "Filter", priority=True),  # "/tiny" typed fast keeps its t
        Binding("r", "reset_overrides", "Reset overrides"),
        Binding("delete,backspace", "remove_override", "Drop override", show=False),
        Binding("escape", "focus_list", "List", show=False),
        # On the settings: a priority binding, so the override box has the focus before the next
        # key is read. Over SSH a burst (Enter, Ctrl-U, a value, Enter) arrives at once; as the
        # table's own Enter, the keys after it reached the table and the App (digits switch
        # panes, `s` starts a run) while the edit waited in a queue.
        Binding("enter", "edit_setting", "Edit", show=False, priority=True),
        # On the preset list, the same for the way into its settings: the Downs and the Enter
        # that follow in the burst are the table's.
        Binding("enter", "open_settings", "Settings", show=False, priority=True),
        # And so the list's and the table's moves are priority bindings too: a priority Enter runs
        # as the App reads it, the widget's own Down only when it has bubbled back, after every
        # key of the burst was read. As their own bindings, "Down Down Enter" opened the preset
        # the Downs had not reached yet, and "Enter Down Down Enter" edited row 0.
        *(Binding(key, f"move('{key}')", what, show=False, priority=True) for key, what in MOVE_KEYS.items()),
    ]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "edit_setting":  # (has_focus follows the Focus event: a key or two late)
            return self.app.focused is self.query_one(SettingsTable)
        if action == "open_settings":
            preset_list = self.query_one("#preset-list", OptionList)
            return self.app.focused is preset_list and preset_list.highlighted is not None
        if action == "move":
            return self.app.focused in (self.query_one("#preset-list"), self.query_one(SettingsTable))
        # A text box types these keys, and Escape is the App's "leave the box" (in the footer).
        typing = isinstance(self.app.focused, Input)
        return not (typing and action in ("focus_filter", "reset_overrides", "focus_list"))

    class ConfigChanged(Message):
        """The selected preset or its overrides changed: `draft` holds them, validated (its
        `config` is None when they do not validate, and `problems` says why)."""

        def __init__(self, draft: PresetDraft) -> None:
            super().__init__()
            self.draft = draft

        @property
        def preset(self) -> str:
            return self.draft.name

        @property
        def overrides(self) -> list[str]:
            return list(self.draft.overrides)

        @property
        def config(self) -> RunConfig | None:
            return self.draft.config

        @property
        def problems(self) -> list[str]:
            return list(self.draft.problems)

    class DraftRead(Message):
        """A preset read and validated in a worker thread, with its comments."""

        def __init__(self, draft: PresetDraft, doc: PresetDoc) -> None:
            super().__init__()
            self.draft = draft
            self.doc = doc

    class DataChecked(Message):
        """The data pipeline's pre-flight check of the selected preset's source, done off-thread."""

        def __init__(self, key: str, text: Text) -> None:
            super().__init__()
            self.key = key
            self.text = text

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._budget_line = Text("")
        self._data_line = Text("")
        self._data_key: str | None = None
        self._presets: list[PresetInfo] = []
        self.selected: str | None = None
        self.draft: PresetDraft | None = None  # the selected preset, as shown
        self._kept: dict[str, list[str]] = {}  # each preset's overrides, this session
        self._doc = PresetDoc("", [])

    @property
    def config(self) -> RunConfig | None:
        return self.draft.config if self.draft is not None else None

    @property
    def problems(self) -> list[str]:
        return list(self.draft.problems) if self.draft is not None else []

    def compose(self) -> ComposeResult:
        with Vertical(id="preset-side"):
            yield FilterInput(placeholder="filter (/)", compact=True, id="preset-filter")
            yield OptionList(id="preset-list")
        with Vertical(id="preset-main"):
            yield Static(id="preset-about")
            yield SettingsTable(id="settings")
            yield Static(id="setting-help")
            yield OverridesEditor(return_to="#settings", id="overrides")
            yield Static(id="preset-summary")

    def on_mount(self) -> None:
        self.query_one("#preset-side").border_title = "presets"
        self.query_one("#preset-main").border_title = "settings"
        # The list is the first useful screen: read in the first frame (a few YAML files, ~10 ms).
        # What a preset's selection brings (its settings, the budget through the memory model,
        # the data check) comes after, from a worker thread and the selection's messages.
        self._discover()
        self.watch(self.app, "budget_state", self._budget, init=False)

    def _budget(self, state: BudgetState | None) -> None:
        if state is not None and state.summary is not None and state.preset == self.selected:
            self.show_summary(state.summary)

    def _discover(self) -> None:
        self._presets = discover_presets()
        self._fill_list(self.query_one("#preset-filter", Input).value)

    def hidden_by_the_filter(self) -> bool:
        """The selected preset is not in the filtered list (a filter that matches nothing keeps
        the last selection's settings on screen)."""
        return self.selected is not None and self.selected not in self._listed()

    def showing_the_first(self) -> bool:
        """The selection is the list's first preset, as the console opens."""
        listed = self._listed()
        return bool(listed) and self.selected == listed[0]

    def _listed(self) -> list[str | None]:
        """The presets the (filtered) list shows, in order."""
        options = self.query_one("#preset-list", OptionList)
        return [options.get_option_at_index(i).id for i in range(options.option_count)]

    @property
    def overrides(self) -> list[str]:
        return list(self.query_one(OverridesEditor).overrides)

    def _fill_list(self, needle: str) -> None:
        needle = needle.lower().strip()
        options = self.query_one("#preset-list", OptionList)
        options.clear_options()
        shown = [p for p in self._presets if needle in p.name.lower() or needle in p.description.lower()]
        options.add_options([Option(p.name, id=p.name) for p in shown])
        if not shown:
            return
        names = [p.name for p in shown]
        index = names.index(self.selected) if self.selected in names else 0
        options.highlighted = index
        if self.selected not in names:
            self.select(names[index])

    def select(self, name: str, overrides: list[str] | None = None, *, highlight: bool = True) -> None:
        """Show preset `name` (with `overrides` applied, if given), read in a worker thread.
        `highlight` moves the list's cursor onto it: not when the cursor is where the choice came
        from (a stale highlight message would move it back, and the next one forth, for good)."""
        info = next((p for p in self._presets if p.name == name), None)
        if info is None:
            return
        if overrides is None:
            # Each preset keeps its overrides for the session: looking at another one and coming
            # back used to drop them without a word.
            overrides = self._kept.get(name)
        self.selected = name
        if highlight:
            options = self.query_one("#preset-list", OptionList)
            with contextlib.suppress(OptionDoesNotExist):
                index = options.get_option_index(name)
                if options.highlighted != index:
                    options.highlighted = index
        self.run_worker(
            lambda: self._read(name, list(overrides or [])),
            thread=True,
            exclusive=True,
            group="preset-read",
            exit_on_error=False,
        )

    def _read(self, name: str, overrides: list[str]) -> None:
        draft = draft_preset(name, overrides)
        self.post_message(self.DraftRead(draft, parse_preset_doc(draft.text)))

    def on_presets_pane_draft_read(self, message: DraftRead) -> None:
        message.stop()
        if message.draft.name != self.selected:
            return  # another preset was picked since
        self._doc = message.doc
        self.query_one(OverridesEditor).set_draft(message.draft)
        self._show(message.draft)

    def _show(self, draft: PresetDraft) -> None:
        self.draft = draft
        self._kept[draft.name] = list(draft.overrides)
        self._show_about()
        self.query_one(SettingsTable).show(self._doc, draft.config, set(draft.overridden))
        if draft.problems:
            # "--set " is the CLI's word for what this pane calls an override.
            problems = (p.removeprefix("--set ") for p in draft.problems)
            self.show_summary(Text("✗ " + "; ".join(problems), style="bold red"))
        elif draft.config is not None:
            self._check_data(draft.config)
        self.post_message(self.ConfigChanged(draft))

    def _show_about(self) -> None:
        info = next((p for p in self._presets if p.name == self.selected), None)
        if info is None:
            return
        about = Text.assemble((info.name, "bold"), "  ")
        if self.config is not None and self.config.model.trust_remote_code:
            # Before the description, so no narrow terminal ever cuts it off.
            about.append("⚠ trust_remote_code: runs the model's own code", "bold red")
            about.append("  ")
        about.append(info.description, "dim")
        about.no_wrap, about.overflow = True, "ellipsis"
        self.query_one("#preset-about", Static).update(about)

    def _check_data(self, cfg: RunConfig) -> None:
        # The whole data section, not a hand-kept list of the fields the check reads (one that
        # missed data.bad_records kept a stop's error on the line after skip was set).
        key = repr(cfg.data)
        if key == self._data_key:
            return
        self._data_key = key
        self._data_line = Text("data: checking…", style="dim")
        self._show_lines()
        self.run_worker(
            lambda: self._data_worker(cfg, key),
            thread=True,
            exclusive=True,
            group="data-check",
            exit_on_error=False,
        )

    def _data_worker(self, cfg: RunConfig, key: str) -> None:
        from engine.data import bad_records, check_source

        try:
            summary = check_source(cfg)
        except UserError as exc:
            self.post_message(self.DataChecked(key, Text(f"✗ data: {exc}", style="bold red")))
            return
        if summary.location == "hub":
            text = Text(f"data: {summary.note}", style="dim")
        else:
            text = Text(
                f"data: {summary.examples} examples ({summary.format or '?'}), {summary.assistant_turns} assistant turns"
                + (f", {summary.eval_source_examples} eval" if summary.eval_source_examples else "")
                + (f", {bad_records(summary.skipped)} skipped" if summary.skipped else "")
                + (f"; {summary.note}" if summary.note else ""),
                style="dim",
            )
        self.post_message(self.DataChecked(key, text))

    def on_presets_pane_data_checked(self, message: DataChecked) -> None:
        message.stop()
        if message.key == self._data_key:
            self._data_line = message.text
            self._show_lines()

    def apply_overrides(self, extra: list[str]) -> None:
        """Add overrides from elsewhere (the Memory pane's auto-fit) as if typed here."""
        self.query_one(OverridesEditor).add(extra)

    def show_summary(self, text: Text | str) -> None:
        """The memory budget's one-line verdict (or why the preset does not validate)."""
        self._budget_line = text if isinstance(text, Text) else Text(text)
        self._show_lines()

    def _show_lines(self) -> None:
        lines = [line for line in (self._budget_line, self._data_line) if line.plain]
        # Wrapped, not cut: the budget line ends with the checkpointing plan its figure is for.
        self.query_one("#preset-summary", Static).update(Text("\n").join(lines))

    # ---- events ------------------------------------------------------------------------------

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "preset-filter":
            event.stop()
            self._fill_list(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "preset-filter":
            event.stop()
            self.query_one("#preset-list", OptionList).focus()

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        if event.option_list.id != "preset-list" or event.option_index != event.option_list.highlighted:
            return  # the cursor moved on since (keys faster than this handler): a newer event follows
        if event.option.id and event.option.id != self.selected:
            self.select(event.option.id, highlight=False)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()  # a click; Enter is open_settings
        focus_now(self.query_one(SettingsTable))

    def on_settings_table_highlighted(self, event: SettingsTable.Highlighted) -> None:
        event.stop()
        # The full value (the table may have cut it); the comment is in the table, whole.
        line = Text(event.path, style="bold")
        if event.value is not None:
            line.append(f" = {event.value}")
            line.append("  (Enter edits)", style="dim")
        line.no_wrap, line.overflow = True, "ellipsis"
        self.query_one("#setting-help", Static).update(line)

    def on_settings_table_edit_requested(self, event: SettingsTable.EditRequested) -> None:
        event.stop()
        self.query_one(OverridesEditor).edit(event.path, event.value)

    def on_overrides_editor_changed(self, event: OverridesEditor.Changed) -> None:
        event.stop()
        self._show(event.draft)  # (Enter in the box has given the focus back to the settings)

    # ---- actions -----------------------------------------------------------------------------

    def action_edit_setting(self) -> None:
        if (setting := self.query_one(SettingsTable).setting_at_cursor()) is not None:
            self.query_one(OverridesEditor).edit(*setting)

    def action_open_settings(self) -> None:
        focus_now(self.query_one(SettingsTable))

    async def action_move(self, key: str) -> None:
        """The focused list's or table's own binding for `key`, run now (MOVE_KEYS)."""
        focused = self.app.focused
        for binding in focused._bindings.key_to_bindings.get(key, ()) if focused else ():
            if await self.app.run_action(binding.action, focused):
                return

    def action_focus_filter(self) -> None:
        focus_now(self.query_one("#preset-filter", Input))

    def action_focus_list(self) -> None:
        focus_now(self.query_one("#preset-list", OptionList))

    def action_reset_overrides(self) -> None:
        if self.app.refused_in_a_burst("r", "reset the overrides"):  # type: ignore[attr-defined]
            return
        self.query_one(OverridesEditor).clear()

    def action_remove_override(self) -> None:
        table = self.query_one(SettingsTable)
        if not table.has_focus or not table.row_count:
            return
        path = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        if not self.query_one(OverridesEditor).remove(path):
            self.notify(f"{path} is not overridden", timeout=2)
