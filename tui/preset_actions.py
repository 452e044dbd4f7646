"""The App's part in the Presets and Memory panes: the selected preset's budget, auto-fit, and
starting a run (tui.start). A mixin of QlcApp: its handlers receive the panes' messages."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work

from engine.config import PresetDraft
from tui import budget
from tui.start import start_run
from tui.views import BudgetState, while_panes_exist
from tui.widgets.memory_pane import MemoryPane
from tui.widgets.presets_pane import PresetsPane


class PresetActions:
    _preset: PresetsPane.ConfigChanged | None
    budget_state: BudgetState | None
    pane: Any
    notify: Any
    refused_in_a_burst: Any

    @while_panes_exist
    def on_presets_pane_config_changed(self, message: PresetsPane.ConfigChanged) -> None:
        self._preset = message
        self._refresh_budget()

    def on_memory_pane_gpu_changed(self, message: MemoryPane.GpuChanged) -> None:
        self._refresh_budget()

    def _refresh_budget(self) -> None:
        msg = self._preset
        if msg is None:
            return
        if msg.config is None:
            view = budget.BudgetView(False, reason="the preset does not validate: " + "; ".join(msg.problems))
            self.budget_state = BudgetState(view, msg.preset)
            return
        view = budget.compute(msg.config, self.pane(MemoryPane).gpu_spec)
        style = {"fits": "green", "tight": "yellow", "does_not_fit": "bold red"}.get(view.verdict, "dim")
        self.budget_state = BudgetState(view, msg.preset, Text("memory " + view.summary(), style=style))

    def on_memory_pane_suggestion_chosen(self, message: MemoryPane.SuggestionChosen) -> None:
        self.pane(PresetsPane).apply_overrides(message.overrides)
        self.notify(f"applied: {' '.join(message.overrides)}", timeout=5)

    def action_auto_fit(self) -> None:
        if self.refused_in_a_burst("f", "auto-fit"):
            return
        msg = self._preset
        if msg is None or msg.config is None:
            self.notify("pick a preset that validates first", severity="warning")
            return
        overrides, text = budget.fit(msg.config, self.pane(MemoryPane).gpu_spec)
        if not overrides:
            nothing = text.startswith("nothing to change")
            hint = "" if nothing else "; the ranked list (Enter) changes more than batch and length"
            self.notify(text + hint, severity="information" if nothing else "warning", timeout=6)
            return
        self.pane(PresetsPane).apply_overrides(overrides)
        self.notify(f"auto-fit: {text}", timeout=6)

    def action_reset_overrides(self) -> None:
        self.pane(PresetsPane).action_reset_overrides()

    def action_start_run(self) -> None:
        if self._preset is None:
            self.notify("pick a preset first", severity="warning")
            return
        if self.refused_in_a_burst("s", "start a run"):
            return
        presets = self.pane(PresetsPane)
        if presets.hidden_by_the_filter():
            self.notify(
                f"the filter hides {presets.selected}: clear it (/ then ctrl+u) or pick a listed preset",
                severity="warning",
            )
            return
        if self._preset.draft.name != presets.selected:
            # The list moved on (a filter typed ahead picked another preset) and its settings are
            # still being read: starting now would start the one before.
            self.notify(f"still reading {presets.selected}: press s again", severity="warning")
            return
        self._start_flow(self._preset.draft)

    @work(exclusive=True, group="start", exit_on_error=False)
    async def _start_flow(self, draft: PresetDraft) -> None:
        await start_run(self, draft, self.pane(MemoryPane).gpu_spec)
