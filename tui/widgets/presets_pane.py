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

from engine.config import RunConfig, list_presets, load_preset
from engine.errors import ConfigError, UserError
from tui.widgets.overrides import OverridesEditor, override_key
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


class PresetsPane(Horizontal):
    """A filterable list of presets; the selected one's settings; the overrides editor."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "app.start_run", "Start run"),
        Binding("slash", "focus_filter", "Filter"),
        Binding("r", "reset_overrides", "Reset overrides"),
        Binding("delete,backspace", "remove_override", "Drop override", show=False),
        Binding("escape", "focus_list", "List", show=False),
    ]

    class ConfigChanged(Message):
        """The selected preset or its overrides changed. `config` is None when they do not validate."""

        def __init__(
            self, preset: str, overrides: list[str], config: RunConfig | None, problems: list[str]
        ) -> None:
            super().__init__()
            self.preset = preset
            self.overrides = overrides
            self.config = config
            self.problems = problems

    class DataChecked(Message):
        """The data pipeline's pre-flight check of the selected preset's source, done off-thread."""

        def __init__(self, key: tuple, text: Text) -> None:
            super().__init__()
            self.key = key
            self.text = text

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._budget_line = Text("")
        self._data_line = Text("")
        self._data_key: tuple | None = None
        self._presets: list[PresetInfo] = []
        self.selected: str | None = None
        self.config: RunConfig | None = None
        self.problems: list[str] = []
        self._doc = PresetDoc("", [])

    def compose(self) -> ComposeResult:
        with Vertical(id="preset-side"):
            yield Input(placeholder="filter (/)", compact=True, id="preset-filter")
            yield OptionList(id="preset-list")
        with Vertical(id="preset-main"):
            yield Static(id="preset-about")
            yield SettingsTable(id="settings")
            yield Static(id="setting-help")
            yield OverridesEditor(id="overrides")
            yield Static(id="preset-summary")

    def on_mount(self) -> None:
        self.query_one("#preset-side").border_title = "presets"
        self.query_one("#preset-main").border_title = "settings"
        # After the first frame: reading every preset (and, through the budget, importing the
        # memory model) would otherwise delay the console's first paint.
        self.call_after_refresh(self._discover)

    def _discover(self) -> None:
        self._presets = discover_presets()
        self._fill_list(self.query_one("#preset-filter", Input).value)

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

    def select(self, name: str, overrides: list[str] | None = None) -> None:
        """Show preset `name` (with `overrides` applied, if given)."""
        info = next((p for p in self._presets if p.name == name), None)
        if info is None:
            return
        self.selected = name
        options = self.query_one("#preset-list", OptionList)
        with contextlib.suppress(OptionDoesNotExist):
            index = options.get_option_index(name)
            if options.highlighted != index:
                options.highlighted = index
        try:
            self._doc = parse_preset_doc(info.path.read_text(encoding="utf-8"))
        except OSError:
            self._doc = PresetDoc("", [])
        self.query_one(OverridesEditor).set_preset(name, overrides)
        self._reload(self.overrides)

    def _reload(self, overrides: list[str]) -> None:
        assert self.selected is not None
        try:
            self.config, self.problems = load_preset(self.selected, overrides), []
        except ConfigError as exc:
            self.config, self.problems = None, list(exc.problems)
        except UserError as exc:
            self.config, self.problems = None, [str(exc)]
        overridden = {k for k in (override_key(o) for o in overrides) if k}
        self._show_about()
        self.query_one(SettingsTable).show(self._doc, self.config, overridden)
        if self.problems:
            self.show_summary(Text("✗ " + "; ".join(self.problems), style="bold red"))
        elif self.config is not None:
            self._check_data(self.config)
        self.post_message(self.ConfigChanged(self.selected, overrides, self.config, self.problems))

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
        d = cfg.data
        key = (
            d.source,
            d.format,
            tuple(sorted(d.columns.items())),
            d.template,
            d.system_prompt,
            d.val_source,
            d.max_examples,
        )
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

    def _data_worker(self, cfg: RunConfig, key: tuple) -> None:
        from engine.data import check_source

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
        editor = self.query_one(OverridesEditor)
        for text in extra:
            editor.overrides = [o for o in editor.overrides if override_key(o) != override_key(text)] + [text]
        editor._changed()

    def show_summary(self, text: Text | str) -> None:
        """The memory budget's one-line verdict (or why the preset does not validate)."""
        self._budget_line = text if isinstance(text, Text) else Text(text)
        self._show_lines()

    def _show_lines(self) -> None:
        lines = [line for line in (self._budget_line, self._data_line) if line.plain]
        out = Text("\n").join(lines)
        out.no_wrap, out.overflow = True, "ellipsis"
        self.query_one("#preset-summary", Static).update(out)

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
        if event.option.id and event.option.id != self.selected:
            self.select(event.option.id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.query_one(SettingsTable).focus()

    def on_settings_table_highlighted(self, event: SettingsTable.Highlighted) -> None:
        event.stop()
        # Two lines: the full value, then the author's comment (the table has room for neither).
        first = Text(event.path, style="bold")
        if event.value is not None:
            first.append(f" = {event.value}")
            first.append("  (Enter edits)", style="dim")
        second = Text(f"# {event.comment}" if event.comment else "", style="italic")
        lines = Text("\n").join([first, second])
        lines.no_wrap, lines.overflow = True, "ellipsis"
        self.query_one("#setting-help", Static).update(lines)

    def on_settings_table_edit_requested(self, event: SettingsTable.EditRequested) -> None:
        event.stop()
        self.query_one(OverridesEditor).edit(event.path, event.value)

    def on_overrides_editor_changed(self, event: OverridesEditor.Changed) -> None:
        event.stop()
        self._reload(event.overrides)
        if self.query_one("#override-input", Input).has_focus:
            # Typed and applied: back to the settings (s starts, Enter edits another). Not when
            # the Memory pane applied them: focusing here would switch panes under the user.
            self.query_one(SettingsTable).focus()

    # ---- actions -----------------------------------------------------------------------------

    def action_focus_filter(self) -> None:
        self.query_one("#preset-filter", Input).focus()

    def action_focus_list(self) -> None:
        self.query_one("#preset-list", OptionList).focus()

    def action_reset_overrides(self) -> None:
        self.query_one(OverridesEditor).clear()

    def action_remove_override(self) -> None:
        table = self.query_one(SettingsTable)
        if not table.has_focus or not table.row_count:
            return
        path = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        if not self.query_one(OverridesEditor).remove(path):
            self.notify(f"{path} is not overridden", timeout=2)
