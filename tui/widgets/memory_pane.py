"""The Memory budget pane: the selected preset (with its overrides) against a GPU."""

from __future__ import annotations

import re
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Label, OptionList, Select, Static
from textual.widgets._select import SelectOverlay  # its UpdateSelection: a pick, the same one too
from textual.widgets.option_list import Option

from tui.budget import BudgetView, Suggestion, gpu_choices, gpu_problem
from tui.views import BudgetState, focus_now
from tui.widgets.in_order_input import InOrderInput
from tui.widgets.stacked_bar import GLYPHS, MemoryBar

_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(gb|g|gib)?\s*$", re.IGNORECASE)
PRESET_GPU = "__preset__"  # the picker's "what the preset says" entry

VERDICT_STYLE = {"fits": "bold green", "tight": "bold yellow", "does_not_fit": "bold red"}
VERDICT_WORD = {
    "fits": "✓ FITS",
    "tight": "! TIGHT",
    "does_not_fit": "✗ DOES NOT FIT",
    "unknown": "? UNKNOWN",
}


class SizeInput(InOrderInput):
    """A GPU size typed in; Enter (like Escape) hands the keys back to the pane."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "done", "Done", show=False, priority=True)]

    def action_done(self) -> None:
        self.app.action_leave_input()  # type: ignore[attr-defined]


class GpuPicker(Select[str]):
    """The card picker. It says when a card is picked, even the one it already showed (Select
    posts Changed only for another value)."""

    class Picked(Message):
        pass

    @on(SelectOverlay.UpdateSelection)
    def _picked(self) -> None:
        self.post_message(self.Picked())


# Rows of the advice box the breakdown leaves it (its title, two lines, its bottom edge), and the
# fewest the breakdown keeps (its edges and one line).
ADVICE_MIN_ROWS = 4
ADVICE_TINY_ROWS = 2
BREAKDOWN_MIN_ROWS = 3


class MemoryPane(Vertical):
    """GPU picker, stacked bar against the budget, verdict, breakdown, auto-fit and advice."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "app.auto_fit", "Auto-fit"),
        Binding("g", "focus_gpu", "GPU"),
        Binding("t", "focus_size", "Type a size", priority=True),  # "t24" typed fast keeps its 2
        Binding("a", "focus_advice", "Advice"),
    ]

    class GpuChanged(Message):
        """The budget should be checked against another GPU (`None`: the preset's hardware.gpu)."""

        def __init__(self, spec: str | None) -> None:
            super().__init__()
            self.spec = spec

    class SuggestionChosen(Message):
        """Apply one of the ranked suggestions: its overrides go to the Presets pane."""

        def __init__(self, overrides: list[str], text: str) -> None:
            super().__init__()
            self.overrides = overrides
            self.text = text

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._suggestions: list[Suggestion] = []
        self._shown_view: BudgetView | None = None
        self._compact = False
        self._headline: list[Text] | None = None  # the verdict's first line, in " · " parts
        self._plan: Text | None = None  # the plan its figures are for (cut to a line under 22 rows)

    def compose(self) -> ComposeResult:
        with Horizontal(id="gpu-row"):
            yield Label("GPU ", id="gpu-label")
            options = [("as the preset says (hardware.gpu)", PRESET_GPU)]
            yield GpuPicker(options, value=PRESET_GPU, allow_blank=False, compact=True, id="gpu-select")
            yield SizeInput(placeholder="or a size: 24GB (t)", compact=True, id="gpu-size")
        yield Static(id="verdict")
        yield MemoryBar(id="memory-bar", legend=False)  # the breakdown below is the legend
        with VerticalScroll(id="breakdown"):
            yield Static(id="breakdown-table")
        yield OptionList(id="advice")

    def on_mount(self) -> None:
        self.query_one("#breakdown").border_title = "breakdown (GiB)"
        self.query_one("#advice", OptionList).border_title = "what would make it fit (a, Enter applies)"
        # The catalog imports the memory model: in a worker thread, after the first frame.
        self.run_worker(self._read_gpus, thread=True, group="gpu-catalog", exit_on_error=False)
        self.watch(self.app, "budget_state", self._budget, init=False)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # A text box types these letters; Escape (the App's) leaves it.
        return not isinstance(self.app.focused, Input)

    def _budget(self, state: BudgetState | None) -> None:
        if state is not None:
            self.show(state.view, state.preset)

    def _read_gpus(self) -> None:
        choices = gpu_choices()
        self.app.call_from_thread(self._fill_gpus, [(c.label, c.spec) for c in choices])

    def _fill_gpus(self, choices: list[tuple[str, str]]) -> None:
        select = self.query_one("#gpu-select", Select)
        options = [("as the preset says (hardware.gpu)", PRESET_GPU), *choices]
        with select.prevent(Select.Changed):
            select.set_options(options)
            select.value = PRESET_GPU

    @property
    def gpu_spec(self) -> str | None:
        if size := self._typed_size():
            # A bare number goes as typed: the calculator reads 24 as 24 GB, and refuses 3080.
            return size.upper().replace("GIB", "GB") if size[-1].isalpha() else size
        value = self.query_one("#gpu-select", Select).value
        return None if value in (PRESET_GPU, Select.NULL) else str(value)

    def show(self, view: BudgetView, preset: str | None) -> None:
        verdict = self.query_one("#verdict", Static)
        bar = self.query_one(MemoryBar)
        advice = self.query_one("#advice", OptionList)
        advice.clear_options()
        self._suggestions = view.advice_fitting_first()
        # It fits, nothing to say: under 22 rows the advice box gives its rows to the breakdown.
        quiet = view.available and view.verdict == "fits" and not self._suggestions and not view.out_of_reach
        self.set_class(quiet, "-nothing-to-say")
        if self._advice_hidden() and self.app.focused is advice:
            # A suggestion applied, the run fits: the advice hides, and with it went the focus
            # (and the pane's keys, g and f, with it).
            focus_now(self.query_one("#gpu-select"))
        self.call_after_refresh(self._share_the_height)
        if not view.available:
            # No estimate: nothing of the last one may come back (a resize redrew its verdict).
            self._headline = self._plan = self._shown_view = None
            verdict.update(Text(view.reason, style="italic"))
            bar.update_terms([], None)
            self.query_one("#breakdown-table", Static).update("")
            return
        title = Text(
            VERDICT_WORD.get(view.verdict, view.verdict.upper()),
            style=VERDICT_STYLE.get(view.verdict, "bold"),
        )
        if view.budget_gb is not None:
            headroom = view.headroom_gb or 0.0
            room = f"{headroom:.2f} GiB headroom" if headroom >= 0 else f"{-headroom:.2f} GiB over"
            title.append(
                f"  {view.device_total_gb:.2f} ± {view.error_band_gb:.2f} of {view.budget_gb:.2f} GiB"
            )
            parts = [title, Text(room), Text(view.gpu or "")]
        else:
            title.append(f"  needs {view.device_total_gb:.2f} GiB")
            parts = [title, Text(view.reason or "no GPU to compare with")]
        # The plan the figures are for: `qlc estimate` prints the same words.
        self._headline = parts
        self._plan = Text(
            f"{preset or ''} · torch peak {view.torch_peak_gb:.2f} GiB · checkpointing {view.checkpointing}"
            + (f" · batch split {view.split}" if view.split else ""),
            "dim",
        )
        self._draw_verdict()
        bar.update_terms(view.terms, view.budget_gb)
        self._shown_view = view
        self._draw_breakdown()
        if view.out_of_reach:  # none of them fits this card: say what would, above them
            advice.add_option(Option(Text(view.out_of_reach, style="bold"), disabled=True))
        if self._suggestions:
            # The ones that fit first: in a short window they are the ones worth the room.
            advice.add_options(
                Option(Text(f"{i}. {a.text}"), id=str(i - 1)) for i, a in enumerate(self._suggestions, 1)
            )
        elif view.verdict == "fits":
            advice.add_option(Option(Text("nothing to change: it fits", style="dim"), disabled=True))
        else:
            advice.add_option(Option(Text("no suggestions", style="dim"), disabled=True))

    def _draw_verdict(self) -> None:
        """The verdict, and the plan its figures are for. Under 22 rows the plan keeps one line:
        at 60 columns its checkpointing reason wrapped to three, the rows the advice needed to
        show its first suggestion."""
        if self._headline is None or self._plan is None:
            return
        plan = self._plan
        width = self.query_one("#verdict", Static).content_size.width or self.content_size.width
        if self.screen.has_class("-tiny") and width > 1 and plan.cell_len > width:
            plan = plan.copy()
            plan.truncate(width, overflow="ellipsis")
        self.query_one("#verdict", Static).update(
            Text("\n").join([*_keep_parts_whole(self._headline, width), plan])
        )
        self.call_after_refresh(self._share_the_height)  # measured once the verdict has its lines

    def on_resize(self) -> None:
        # Compact or not follows the screen's height class, set before this pane is laid out.
        if self._shown_view is not None and self._compact != self.screen.has_class("-tiny"):
            self._draw_breakdown()
        self._draw_verdict()
        self.call_after_refresh(self._share_the_height)

    def _share_the_height(self) -> None:
        """The breakdown takes what the advice leaves (its title, two lines and its bottom edge),
        up to a share of the pane. The share alone (max-height 50% in CSS) cut the advice's lower
        edge at 80x22, and the whole box at 60x18, where the verdict wraps to five lines."""
        breakdown = self.query_one("#breakdown")
        above = sum(
            w.outer_size.height + w.styles.margin.bottom
            for w in (self.query_one("#gpu-row"), self.query_one("#verdict"), self.query_one(MemoryBar))
        )
        # Under 22 rows the advice keeps only its title and edge (a hint: `a` gives it the
        # breakdown's room), and the breakdown its five terms.
        tiny = self.screen.has_class("-tiny")
        advice = max(ADVICE_MIN_ROWS, 2 + self._longest_suggestion_rows())
        if tiny and self.has_class("-nothing-to-say"):
            advice = 0
        elif tiny and self._shown_view is not None and self._shown_view.verdict != "fits":
            # It does not fit: the way out matters more than the terms, so the advice keeps its
            # first option (what would fit, or the first change) in view.
            advice = ADVICE_TINY_ROWS + min(4, self._option_rows(0))
        elif tiny:
            advice = ADVICE_TINY_ROWS
        elif self.has_class("-nothing-to-say"):
            advice = 3  # its one line, "nothing to change: it fits", and its edges
        room = self.content_size.height - above - advice
        # And no more than a share of the pane, so a tall window gives the advice room to list
        # (with nothing to list, the breakdown may take the rest: at 80x24 its workspace term was
        # hidden while the advice box spent five rows on "nothing to change").
        short = tiny or self.screen.has_class("-short")
        share = int(self.content_size.height * (0.5 if short else 0.6))
        limit = max(BREAKDOWN_MIN_ROWS, room if self.has_class("-nothing-to-say") else min(room, share))
        if breakdown.styles.max_height is None or breakdown.styles.max_height.value != limit:
            breakdown.styles.max_height = limit

    def _longest_suggestion_rows(self) -> int:
        """Rows the longest suggestion wraps to in the advice box (up to four): at 60 columns
        some take three, and a box of two lines cut their outcome ("7.5 GiB ..., fits") off."""
        advice = self.query_one("#advice", OptionList)
        return min(4, max((self._option_rows(i) for i in range(advice.option_count)), default=2))

    def _option_rows(self, index: int) -> int:
        """Rows the advice's option `index` wraps to (0 when there is none)."""
        advice = self.query_one("#advice", OptionList)
        if index >= advice.option_count:
            return 0
        width = advice.scrollable_content_region.width or self.content_size.width - 4
        if width <= 0:
            return 2
        return len(Text(str(advice.get_option_at_index(index).prompt)).wrap(self.app.console, width))

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        # Where the breakdown leaves the advice too little room, the advice takes the breakdown's
        # while it has the focus: Enter applies the suggestion a person can see.
        self.set_class(event.widget.id == "advice" and not self._advice_hidden(), "-advising")

    def _advice_hidden(self) -> bool:
        return self.has_class("-nothing-to-say") and self.screen.has_class("-tiny")

    def on_descendant_blur(self, event: events.DescendantBlur) -> None:
        if event.widget.id == "advice":
            self.remove_class("-advising")

    def _draw_breakdown(self) -> None:
        assert self._shown_view is not None
        self._compact = self.screen.has_class("-tiny")
        table = self._breakdown(self._shown_view, self.query_one(MemoryBar), self._compact)
        self.query_one("#breakdown-table", Static).update(table)

    @staticmethod
    def _breakdown(view: BudgetView, bar: MemoryBar, compact: bool = False) -> Table:
        """Each term with its glyph in the bar (the bar's legend), its size, and what it is made
        of, wrapped to the pane's width: never cut. Compact (under 22 rows, where the box has
        about five): one row a term and no header, every term in sight, what each is made of cut
        to the row (`qlc estimate` and a taller window show it whole)."""
        table = Table(box=None, show_header=not compact, header_style="bold", pad_edge=False, expand=True)
        table.add_column("term", no_wrap=True)
        table.add_column("GiB", justify="right", no_wrap=True)
        table.add_column("made of", ratio=1, overflow="ellipsis" if compact else "fold", no_wrap=compact)
        for i, term in enumerate(view.terms):
            glyph = Text(GLYPHS[i % len(GLYPHS)], style=bar.get_component_rich_style(bar.term_class(i)))
            parts = ", ".join(f"{k} {v:.2f}" for k, v in term.parts.items())
            table.add_row(Text.assemble(glyph, " ", term.name), f"{term.gb:.2f}", Text(parts, style="dim"))
        return table

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is None:
            return
        suggestion = self._suggestions[int(event.option.id)]
        self.post_message(self.SuggestionChosen(suggestion.overrides, suggestion.text))

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self.post_message(self.GpuChanged(self.gpu_spec))

    def on_gpu_picker_picked(self, event: GpuPicker.Picked) -> None:
        """A card picked after a size was typed is what the person asks for now (the typed size
        went on winning, under a picker that named another card), the one it showed included."""
        event.stop()
        size = self.query_one("#gpu-size", Input)
        if size.value.strip():
            with size.prevent(Input.Changed):
                size.value = ""
            size.remove_class("-invalid")
            self._mark_unused_picker()
            self.post_message(self.GpuChanged(self.gpu_spec))

    def _mark_unused_picker(self) -> None:
        """A typed size that gpu_spec takes wins over the picker: the picker shows it is not in
        use (a refused size, 3080, leaves the picker in use)."""
        self.query_one("#gpu-select", Select).set_class(bool(self._typed_size()), "-unused")

    def _typed_size(self) -> str:
        """The size typed in the box, where the calculator takes it ("" where none is, or it is
        refused: 3080 is a card, not GiB)."""
        size = self.query_one("#gpu-size", Input).value.strip()
        return size if size and _SIZE.match(size) and not gpu_problem(size) else ""

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        typed = event.value.strip()
        if not typed:
            problem = ""
        elif _SIZE.match(typed):
            problem = gpu_problem(typed)  # what `qlc estimate --gpu` refuses: 3080 is a card, not GiB
            problem = f"{typed!r}: {problem}" if problem else ""
        else:
            problem = f"{typed!r} is not a size: type GiB as 24, 24GB or 80GiB"
        self._mark_unused_picker()
        if not problem:
            event.input.remove_class("-invalid")
            self.post_message(self.GpuChanged(self.gpu_spec))
        else:
            event.input.add_class("-invalid")
            # The verdict above was for another card: say what is wrong instead of keeping it.
            self.query_one("#verdict", Static).update(Text(problem, style="bold red"))

    def action_focus_gpu(self) -> None:
        focus_now(self.query_one("#gpu-select", Select))

    def action_focus_size(self) -> None:
        focus_now(self.query_one("#gpu-size", Input))

    def action_focus_advice(self) -> None:
        if self._advice_hidden():  # under 22 rows, a run that fits shows no advice box
            self.notify("nothing to change: it fits", timeout=3)
            return
        advice = self.query_one("#advice", OptionList)
        if advice.highlighted is None:
            # Enter applies the first suggestion (it did nothing, unhighlighted); a line above the
            # suggestions (nothing in reach fits) is not one.
            first = next(
                (i for i in range(advice.option_count) if not advice.get_option_at_index(i).disabled), None
            )
            if first is not None:
                advice.highlighted = first
        focus_now(advice)


def _keep_parts_whole(parts: list[Text], width: int) -> list[Text]:
    """Lines of `parts` joined by " · ", a part that does not fit beside the last starting a new
    line: word wrapping broke a card's name ("RTX" at the end of one line, "4060" on the next),
    and Textual 8 breaks at a no-break space too. A part wider than the pane still wraps."""
    lines = [parts[0].copy()]
    for part in parts[1:]:
        if width > 1 and lines[-1].cell_len + 3 + part.cell_len > width:
            lines.append(Text(style=parts[0].style))  # the verdict's colour, as on its first line
        else:
            lines[-1].append(" · ")
        lines[-1].append_text(part)
    return lines
