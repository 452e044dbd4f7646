"""A horizontal stacked bar of memory terms against a budget.

Each term has its own fill glyph as well as its own colour, so the bar still reads under NO_COLOR
or on a monochrome terminal: the legend pairs each glyph with its term.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.widget import Widget

if TYPE_CHECKING:  # no memory model at start-up: the bar only reads a term's name and size
    from engine.memory import Term

GLYPHS = ("█", "▓", "▒", "░", "▞", "▚", "■")


class MemoryBar(Widget):
    """Terms (GiB) stacked left to right; a `┃` marks the budget. Rows: bar, scale, legend (unless
    the caller draws the legend itself)."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        *(f"memory-bar--term-{i}" for i in range(len(GLYPHS))),
        "memory-bar--budget",
        "memory-bar--over",
        "memory-bar--scale",
    }

    DEFAULT_CSS = """
    MemoryBar { height: auto; min-height: 2; }
    MemoryBar > .memory-bar--term-0 { color: $primary; }
    MemoryBar > .memory-bar--term-1 { color: $secondary; }
    MemoryBar > .memory-bar--term-2 { color: $accent; }
    MemoryBar > .memory-bar--term-3 { color: $warning; }
    MemoryBar > .memory-bar--term-4 { color: $success; }
    MemoryBar > .memory-bar--term-5 { color: $foreground-muted; }
    MemoryBar > .memory-bar--term-6 { color: $foreground-muted; }
    MemoryBar > .memory-bar--budget { color: $foreground; text-style: bold; }
    MemoryBar > .memory-bar--over { color: $error; text-style: bold; }
    MemoryBar > .memory-bar--scale { color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None, legend: bool = True) -> None:
        super().__init__(id=id, classes=classes)
        self._terms: list[Term] = []
        self._budget: float | None = None
        self._legend = legend  # False: the caller shows each term's glyph itself

    @staticmethod
    def term_class(index: int) -> str:
        """The component class whose style the `index`-th term is drawn in."""
        return f"memory-bar--term-{index % len(GLYPHS)}"

    def update_terms(self, terms: Sequence[Term], budget_gb: float | None) -> None:
        self._terms = list(terms)
        self._budget = budget_gb
        self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:  # type: ignore[override]
        return 2 + len(self._legend_lines(width))

    def _legend_lines(self, width: int) -> list[Text]:
        if not self._legend:
            return []
        lines: list[Text] = []
        line = Text()
        for i, term in enumerate(self._terms):
            item = Text.assemble(
                (
                    GLYPHS[i % len(GLYPHS)],
                    self.get_component_rich_style(f"memory-bar--term-{i % len(GLYPHS)}"),
                ),
                f" {term.name} {term.gb:.1f}",
            )
            if line.cell_len and line.cell_len + 2 + item.cell_len > width:
                lines.append(line)
                line = Text()
            if line.cell_len:
                line.append("  ")
            line.append_text(item)
        if line.cell_len:
            lines.append(line)
        return lines

    def render(self) -> Text:
        width = max(10, self.content_size.width)
        total = sum(t.gb for t in self._terms)
        if not self._terms:
            return Text("no estimate", style=self.get_component_rich_style("memory-bar--scale"))
        scale = max(total, self._budget or 0.0) or 1.0
        budget_col = round(self._budget / scale * (width - 1)) if self._budget else None
        bar = Text(no_wrap=True, overflow="crop")
        used = 0.0
        filled = 0
        for i, term in enumerate(self._terms):
            used += term.gb
            end = round(used / scale * width)
            cells = max(end - filled, 1 if term.gb > 0 and end >= filled else 0)
            glyph = GLYPHS[i % len(GLYPHS)]
            style = self.get_component_rich_style(f"memory-bar--term-{i % len(GLYPHS)}")
            for c in range(filled, min(width, filled + cells)):
                over = budget_col is not None and c > budget_col
                bar.append(glyph, self.get_component_rich_style("memory-bar--over") if over else style)
            filled = min(width, filled + cells)
        if filled < width:
            bar.append(" " * (width - filled))
        if budget_col is not None:
            # The budget line drawn into the bar, so being past it is visible in any colour scheme.
            bar = (
                bar[:budget_col]
                + Text("┃", self.get_component_rich_style("memory-bar--budget"))
                + bar[budget_col + 1 :]
            )
        scale_line = Text(
            no_wrap=True, overflow="crop", style=self.get_component_rich_style("memory-bar--scale")
        )
        label = f"{total:.2f} GiB needed"
        if budget_col is not None:
            budget_label = f"budget {self._budget:.2f} GiB ┘"
            start = max(0, budget_col - len(budget_label) + 1)
            row = [" "] * width
            row[: len(label)] = label
            if start < len(label) + 2:  # the labels would collide: put the budget after the total
                budget_label = f"budget {self._budget:.2f} GiB"
                start = min(width - len(budget_label), len(label) + 3)
            row[start : start + len(budget_label)] = budget_label
            scale_line.append("".join(row)[:width])
        else:
            scale_line.append(label)
        out = Text("\n").join([bar, scale_line, *self._legend_lines(width)])
        return out
