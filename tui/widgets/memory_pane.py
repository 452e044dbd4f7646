"""The Memory budget pane: the selected preset (with its overrides) against a GPU."""

from __future__ import annotations

import re
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option

from tui.budget import BudgetView, Suggestion, gpu_choices
from tui.views import BudgetState
from tui.widgets.stacked_bar import MemoryBar

_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(gb|g|gib)?\s*$", re.IGNORECASE)
PRESET_GPU = "__preset__"  # the picker's "what the preset says" entry

VERDICT_STYLE = {"fits": "bold green", "tight": "bold yellow", "does_not_fit": "bold red"}
VERDICT_WORD = {
    "fits": "✓ FITS",
    "tight": "! TIGHT",
    "does_not_fit": "✗ DOES NOT FIT",
    "unknown": "? UNKNOWN",
}


class MemoryPane(Vertical):
    """GPU picker, stacked bar against the budget, verdict, breakdown, auto-fit and advice."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "app.auto_fit", "Auto-fit"),
        Binding("g", "focus_gpu", "GPU"),
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

    def compose(self) -> ComposeResult:
        with Horizontal(id="gpu-row"):
            yield Label("GPU ", id="gpu-label")
            options = [("as the preset says (hardware.gpu)", PRESET_GPU)]
            yield Select(options, value=PRESET_GPU, allow_blank=False, compact=True, id="gpu-select")
            yield Input(placeholder="or a size: 24GB", compact=True, id="gpu-size")
        yield Static(id="verdict")
        yield MemoryBar(id="memory-bar")
        with Horizontal(id="memory-lower"):
            yield DataTable(id="breakdown", cursor_type="row", show_cursor=False)
            yield OptionList(id="advice")

    def on_mount(self) -> None:
        table = self.query_one("#breakdown", DataTable)
        table.add_columns("term", "GB", "made of")
        table.border_title = "breakdown"
        self.query_one("#advice", OptionList).border_title = "what would make it fit (Enter applies)"
        self.call_after_refresh(
            self._fill_gpus
        )  # the catalog imports the memory model: after the first frame
        self.watch(self.app, "budget_state", self._budget, init=False)

    def _budget(self, state: BudgetState | None) -> None:
        if state is not None:
            self.show(state.view, state.preset)

    def _fill_gpus(self) -> None:
        select = self.query_one("#gpu-select", Select)
        options = [("as the preset says (hardware.gpu)", PRESET_GPU)]
        options += [(c.label, c.spec) for c in gpu_choices()]
        with select.prevent(Select.Changed):
            select.set_options(options)
            select.value = PRESET_GPU

    @property
    def gpu_spec(self) -> str | None:
        size = self.query_one("#gpu-size", Input).value.strip()
        if size and _SIZE.match(size):
            return size.upper().replace("GIB", "GB") if size[-1].isalpha() else f"{size}GB"
        value = self.query_one("#gpu-select", Select).value
        return None if value in (PRESET_GPU, Select.BLANK) else str(value)

    def show(self, view: BudgetView, preset: str | None) -> None:
        verdict = self.query_one("#verdict", Static)
        bar = self.query_one(MemoryBar)
        table = self.query_one("#breakdown", DataTable)
        advice = self.query_one("#advice", OptionList)
        advice.clear_options()
        self._suggestions = list(view.advice)
        table.clear()
        if not view.available:
            verdict.update(Text(view.reason, style="italic"))
            bar.update_terms([], None)
            return
        title = Text(
            VERDICT_WORD.get(view.verdict, view.verdict.upper()),
            style=VERDICT_STYLE.get(view.verdict, "bold"),
        )
        if view.budget_gb is not None:
            headroom = view.headroom_gb or 0.0
            room = f"{headroom:.1f} GB headroom" if headroom >= 0 else f"{-headroom:.1f} GB over"
            title.append(f"  {view.device_total_gb:.1f} of {view.budget_gb:.1f} GB · {room} · {view.gpu}")
        else:
            title.append(f"  needs {view.device_total_gb:.1f} GB · {view.reason or 'no GPU to compare with'}")
        title.append(
            f"\n{preset or ''} · torch peak {view.torch_peak_gb:.2f} GB · whole device {view.device_total_gb:.2f} GB",
            "dim",
        )
        verdict.update(title)
        bar.update_terms(view.terms, view.budget_gb)
        for term in view.terms:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in term.parts.items())
            table.add_row(term.name, f"{term.gb:.2f}", parts)
        if view.advice:
            # The ones that fit first (the calculator's order otherwise): in a short window
            # they are the ones worth the room.
            order = sorted(range(len(view.advice)), key=lambda i: not view.advice[i].text.endswith(", fits"))
            advice.add_options(
                Option(Text(f"{n}. {view.advice[i].text}"), id=str(i)) for n, i in enumerate(order, 1)
            )
        elif view.verdict == "fits":
            advice.add_option(Option(Text("nothing to change: it fits", style="dim"), disabled=True))
        else:
            advice.add_option(Option(Text("no suggestions", style="dim"), disabled=True))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is None:
            return
        suggestion = self._suggestions[int(event.option.id)]
        self.post_message(self.SuggestionChosen(suggestion.overrides, suggestion.text))

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self.post_message(self.GpuChanged(self.gpu_spec))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if not event.value.strip() or _SIZE.match(event.value):
            event.input.remove_class("-invalid")
            self.post_message(self.GpuChanged(self.gpu_spec))
        else:
            event.input.add_class("-invalid")

    def action_focus_gpu(self) -> None:
        self.query_one("#gpu-select", Select).focus()
