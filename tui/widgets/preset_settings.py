"""A preset's settings with the comment its author wrote beside each key.

PyYAML drops comments, so they are read from the text here: a trailing `# ...` on a key's line,
or the comment lines right above it. Values come from the resolved `RunConfig` instead (so that
overrides and defaults show), and the YAML text supplies only the order, the sections and the
comments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from engine.config import RunConfig
from tui.widgets.rows_table import RowsTable

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.-]*)\s*:(?P<rest>.*)$")


@dataclass(frozen=True)
class Setting:
    path: str  # dotted: train.lr
    depth: int
    comment: str
    is_section: bool


def with_extra_settings(settings: list[Setting], extra: list[str]) -> list[Setting]:
    """`settings` with rows for overrides of keys the file omits, each at the end of its section
    (appended after the last section, data.max_examples read as hardware's); a key whose section
    the file lacks goes last, under its full dotted name."""
    out = list(settings)
    for path in extra:
        section = path.rpartition(".")[0]
        inside = [
            i
            for i, s in enumerate(out)
            if section and (s.path == section or s.path.startswith(section + "."))
        ]
        if inside:
            out.insert(inside[-1] + 1, Setting(path, path.count("."), "(set by an override)", False))
        else:
            out.append(Setting(path, 0, "(set by an override)", False))
    return out


@dataclass(frozen=True)
class PresetDoc:
    header: str  # the comment block at the top of the file
    settings: list[Setting]

    def comment(self, path: str) -> str:
        return next((s.comment for s in self.settings if s.path == path), "")


def _split_comment(rest: str) -> tuple[str, str]:
    """`value  # comment` -> (value, comment), ignoring # inside quotes."""
    quote = ""
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def parse_preset_doc(text: str) -> PresetDoc:
    header: list[str] = []
    pending: list[str] = []
    settings: list[Setting] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open sections
    seen_key = False
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped:
            if not seen_key:
                header.extend(pending)
            pending = []  # a blank line ends the comment block that belongs to the next key
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(raw)
        if not match:
            pending = []  # a list item or a continuation line
            continue
        if not seen_key:  # the comment block above the first key describes the whole preset
            header.extend(pending)
            pending = []
        seen_key = True
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value, comment = _split_comment(match["rest"])
        path = ".".join([k for _, k in stack] + [match["key"]])
        settings.append(Setting(path, len(stack), comment or " ".join(pending), is_section=value == ""))
        pending = []
        if value == "":
            stack.append((indent, match["key"]))
    return PresetDoc(" ".join(header).strip(), settings)


def lookup(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def format_setting(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(format_setting(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_setting(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and value.startswith("/"):
        return _relative_to_cwd(value)
    return str(value)


def _relative_to_cwd(path: str) -> str:
    """Resolved paths are absolute; under the folder qlc was started in, show them relative to it,
    which is shorter and the same on every checkout."""
    import os

    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


WIDE = 70  # table width from which the comments get a column of their own


def _hanging(text: str, width: int, indent: str, style: str = "dim") -> Text:
    """`text` wrapped to `width`, each line after `indent`. Long words (a hub id, a path) are
    broken to fit, not cut."""
    import textwrap

    lines = textwrap.wrap(text, max(10, width - len(indent)), break_on_hyphens=False) or [""]
    return Text("\n".join(indent + line for line in lines), style=style)


class SettingsTable(RowsTable):
    """setting | value | comment. Overridden values are marked `*`; Enter asks to edit one."""

    class EditRequested(Message):
        """Edit `path`: its value prefilled, or (None) a section's key to type."""

        def __init__(self, path: str, value: str | None) -> None:
            super().__init__()
            self.path = path
            self.value = value

    class Highlighted(Message):
        """The row under the cursor changed: its full comment, for the help line."""

        def __init__(self, path: str, value: str | None, comment: str) -> None:
            super().__init__()
            self.path = path
            self.value = value  # None for a section
            self.comment = comment

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self._doc = PresetDoc("", [])
        self._values: dict[str, str] = {}

    def on_mount(self) -> None:
        self._args: tuple[PresetDoc, RunConfig | None, set[str]] | None = None

    def on_resize(self) -> None:
        if self._args is not None:
            self.show(*self._args)

    def show(self, doc: PresetDoc, cfg: RunConfig | None, overridden: set[str]) -> None:
        self._args = (doc, cfg, overridden)
        data = cfg.to_dict() if cfg is not None else {}
        row = self.cursor_row
        self._doc = doc
        self._values = {}
        paths = [s.path for s in doc.settings]
        extra = [p for p in sorted(overridden) if p not in paths]  # overrides of keys the file omits
        settings = with_extra_settings(doc.settings, extra)
        rows: list[tuple[Setting, str, str]] = []
        for s in settings:
            if s.path in ("name", "description"):
                continue
            label = " " * s.depth + (s.path.rsplit(".", 1)[-1] if s.depth else s.path)
            value = "" if s.is_section or cfg is None else format_setting(lookup(data, s.path))
            if not s.is_section:
                self._values[s.path] = value
            rows.append((s, label, value + ("*" if s.path in overridden else "")))
        # Every comment is shown whole: wrapped in its own column where the pane is wide enough,
        # else on the lines under its setting (one column), so none waits for the cursor.
        # Cell padding (one either side of each column) and the scrollbar: three columns in a
        # wide table, one in a narrow one.
        room = max(30, self.size.width - 7)
        setting_w = min(22, max((len(label) for _, label, _ in rows), default=8))
        self.clear(columns=True)
        if room >= WIDE:
            value_w = max(10, min(max((len(value) for *_, value in rows), default=5), room // 3))
            comment_w = max(8, room - setting_w - value_w)
            self.add_column("setting", key="setting", width=setting_w)
            self.add_column("value", key="value", width=value_w)
            self.add_column("comment", key="comment", width=comment_w)
            for s, label, value in rows:
                self.add_row(
                    Text(label, style="bold" if s.is_section else "", no_wrap=True, overflow="ellipsis"),
                    Text(
                        value, style="bold" if value.endswith("*") else "", no_wrap=True, overflow="ellipsis"
                    ),
                    Text(s.comment, style="dim"),
                    key=s.path,
                    height=None,
                )
        else:
            room = max(20, self.size.width - 3)
            self.add_column("setting = value  # comment", key="setting", width=room)
            for s, label, value in rows:
                label_style = "bold" if s.is_section else ""
                value_style = "bold" if value.endswith("*") else ""
                if max(setting_w, len(label)) + 1 + len(value) <= room:
                    line = Text(f"{label:<{setting_w}} ", style=label_style, no_wrap=True)
                    line.append(value, style=value_style)
                else:
                    # Too long beside its key (at 60 columns a hub id read "google…", its "*"
                    # cut with it): whole, on the lines under the key.
                    line = Text(label, style=label_style)
                    line.append("\n")
                    line.append_text(_hanging(value, room, " " * (s.depth + 1), value_style))
                if s.comment:
                    indent = " " * (s.depth + 2)
                    line.append("\n")
                    line.append_text(_hanging(s.comment, room, indent))
                self.add_row(line, key=s.path, height=None)
        if self.row_count:
            self.move_cursor(row=min(max(row, 0), self.row_count - 1))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        path = str(event.row_key.value)
        comment = self._doc.comment(path) or ("(set by an override)" if path in self._values else "")
        self.post_message(self.Highlighted(path, self._values.get(path), comment))

    def setting_at_cursor(self) -> tuple[str, str | None] | None:
        """(path, value) of the row under the cursor; the value is None for a section."""
        if not self.row_count:
            return None
        path = str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)
        return path, self._values.get(path)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        # A click on the row under the cursor (Enter is the Presets pane's priority binding).
        # For a section the box opens with `section.` typed, for the key to follow.
        event.stop()
        path = str(event.row_key.value)
        self.post_message(self.EditRequested(path, self._values.get(path)))
