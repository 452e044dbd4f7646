"""A DataTable of rows (a cursor on whole rows): Home and End go to the first and last row."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.widgets import DataTable


class RowsTable(DataTable):
    # DataTable's Home and End scroll sideways, which a table of rows never needs: they did
    # nothing on the settings and the runs.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("home", "scroll_top", "First", show=False),
        Binding("end", "scroll_bottom", "Last", show=False),
    ]
