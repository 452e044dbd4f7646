"""The Sample pane: a prompt, the live model or a saved checkpoint, settings, the streamed reply."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.validation import Number
from textual.widgets import Input, Label, Select, Static

from engine import protocol
from tui.history import SampleText
from tui.output import plural
from tui.views import SampleSources, focus_now
from tui.widgets.in_order_input import InOrderInput

LIVE = "live"
_ids = itertools.count(1)


NO_SOURCE = "no run: start or open one"


class SamplePane(Vertical):
    BINDINGS: ClassVar[list[BindingType]] = [
        # Priority: the prompt has the focus before the next key is read ("iHello" typed fast).
        Binding("i", "focus_prompt", "Type a prompt", priority=True),
        # Enter says it is Enter (check_action): on the source picker Enter opens the list, `i` not.
        Binding("enter", "focus_prompt('enter')", "Type a prompt", show=False, priority=True),
        Binding("ctrl+g", "generate", "Generate"),
    ]

    class Requested(Message):
        """Generate a reply: from the live model (`source == "live"`) or a checkpoint's name."""

        def __init__(self, source: str, request: protocol.SampleRequest) -> None:
            super().__init__()
            self.source = source
            self.request = request

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._samples: list[SampleText] = []
        self._run_id: str | None = None
        self._picked: str | None = None  # the source the person chose, kept while it exists

    def compose(self) -> ComposeResult:
        with Horizontal(id="sample-source-row"):
            yield Label("from ")
            yield Select([], prompt=NO_SOURCE, compact=True, id="sample-source")
        with Horizontal(id="sample-settings"):
            yield Label("max tokens ")
            yield InOrderInput(
                "128",
                compact=True,
                id="max-tokens",
                type="integer",
                validators=[Number(1, protocol.MAX_NEW_TOKENS_LIMIT)],
            )
            yield Label(" temperature ")
            yield InOrderInput(
                "0.7",
                compact=True,
                id="temperature",
                type="number",
                validators=[Number(0, protocol.TEMPERATURE_LIMIT)],
            )
            yield Label(" top_p ")
            yield InOrderInput("0.9", compact=True, id="top-p", type="number", validators=[Number(0.01, 1)])
        yield InOrderInput(placeholder="prompt: i to type, Enter to generate", compact=True, id="prompt")
        with VerticalScroll(id="replies"):
            yield Static(id="reply-view")

    def on_mount(self) -> None:
        self.query_one("#replies").border_title = "replies"
        self.show([])
        self.watch(self.app, "sample_replies", self.show, init=False)
        self.watch(self.app, "sample_sources", self._sources, init=False)

    def _sources(self, sources: SampleSources) -> None:
        self.set_sources(sources.run_id, sources.live, sources.checkpoints)

    # ---- drawing ----------------------------------------------------------------------

    def set_sources(self, run_id: str | None, live: bool, checkpoints: Sequence[str]) -> None:
        """The run's sources, newest first: the live model while it trains, then its checkpoints
        and final adapter. The first is chosen unless the person picked another, which is kept
        while it exists: a run that resumes goes to `live`, one that ends to its newest save."""
        select = self.query_one("#sample-source", Select)
        options: list[tuple[str, str]] = []
        if run_id is not None:
            if live:
                options.append((f"live model ({run_id})", LIVE))
            options += [(f"{name} ({run_id})", name) for name in reversed(checkpoints)]
        if run_id != self._run_id:
            self._run_id, self._picked = run_id, None
            self._draw()  # another run: its own replies
        values = [v for _, v in options]
        with select.prevent(Select.Changed):
            # The blank choice stays in the list: with a run open it offered "no run: start or
            # open one".
            select.prompt = "pick what to sample from" if values else NO_SOURCE
            select.set_options(options)
            if self._picked in values:
                select.value = self._picked
            elif values:
                select.value = values[0]
        if self._picked not in (None, LIVE, *values) and values:
            # Gone: a newer save rotated it out (train.save_total_limit), or the run resumed.
            # Said, where the switch was silent and the next Enter sampled another model.
            self.notify(
                f"{self._picked} is gone (rotated out by newer saves): sampling from {options[0][0]} now",
                severity="warning",
            )
            self._picked = None

    def on_select_changed(self, event: Select.Changed) -> None:
        # Only a person's pick arrives here: set_sources sets the value with Changed prevented.
        if event.select.id == "sample-source" and event.value is not Select.NULL:
            self._picked = str(event.value)

    @property
    def shown(self) -> list[SampleText]:
        """The replies of the run the pane samples (the App keeps every run's, in one list)."""
        return [s for s in self._samples if s.run_id == self._run_id]

    def show(self, samples: Sequence[SampleText]) -> None:
        self._samples = list(samples)
        self._draw()

    def _draw(self) -> None:
        view = self.query_one("#reply-view", Static)
        shown = self.shown
        if not shown:
            view.update(Text("Replies appear here as the engine streams them.", style="dim italic"))
            return
        blocks = []
        for s in shown:
            where = "live" if s.source == LIVE else s.source
            if s.step is not None:
                where += f" @ step {s.step}"
            block = Text.assemble(("› ", "bold"), (s.prompt, "bold"), (f"   [{where}]", "dim"), "\n")
            if not s.text and not s.done:
                # The live model answers between two training steps; a checkpoint or the final
                # adapter is loaded onto the base model by a sampler first.
                waiting = (
                    "waiting for the next step boundary…"
                    if s.source == LIVE
                    else f"loading the base model and {s.source}…"
                )
                block.append(waiting, "dim italic")
            block.append(s.text)
            if s.done:
                block.append(
                    f"\n  ({plural(s.new_tokens, 'tokens')}, {s.seconds:.1f} s, stopped by {s.stopped_by or '?'})",
                    "dim",
                )
            else:
                block.append("▌", "blink")
            blocks.append(block)
        view.update(Text("\n\n").join(blocks))
        self.query_one("#replies", VerticalScroll).scroll_end(animate=False)

    # ---- events ------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_generate()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action != "focus_prompt" or self.app.focused is None:
            return True
        around = self.app.focused.ancestors_with_self
        # In a text box Enter is that box's own and `i` a letter: only Escape leaves it.
        if any(isinstance(w, Input) for w in around):
            return False
        picker = next((w for w in around if isinstance(w, Select)), None)
        if picker is None:
            return True
        # In the picker's open list (an overlay inside the Select, with the focus) Enter picks the
        # entry under the cursor and a letter searches the entries. On the closed picker only
        # Enter is its own (it opens the list): `i` must still reach the prompt, or the focus
        # stays on the picker, whose keys are not the pane's.
        return not (picker.expanded or parameters == ("enter",))

    def action_focus_prompt(self, key: str = "i") -> None:
        # `key` is only for check_action, which lets `i` but not Enter leave the source picker.
        focus_now(self.query_one("#prompt", Input))

    def action_generate(self) -> None:
        prompt = self.query_one("#prompt", Input).value.strip()
        if not prompt:
            self.notify("type a prompt first", timeout=2)
            self.action_focus_prompt()
            return
        source = self.query_one("#sample-source", Select).value
        if source is Select.NULL:
            self.notify(
                "no model to sample from: start a run, or open one with checkpoints", severity="warning"
            )
            return
        settings = [self.query_one(f"#{name}", Input) for name in ("max-tokens", "temperature", "top-p")]
        bad = [box for box in settings if not box.is_valid]
        if bad:
            box = bad[0]
            allowed = {
                "max-tokens": f"a whole number from 1 to {protocol.MAX_NEW_TOKENS_LIMIT}",
                "temperature": f"from 0 (greedy) to {protocol.TEMPERATURE_LIMIT:g}",
            }
            want = allowed.get(box.id or "", "above 0, up to 1")
            self.notify(f"{box.id} {box.value!r}: must be {want}", severity="warning")
            return
        request = protocol.SampleRequest(
            prompt=prompt,
            request_id=f"console-{os.getpid()}-{next(_ids)}",
            max_new_tokens=int(settings[0].value),
            temperature=float(settings[1].value),
            top_p=float(settings[2].value),
        )
        self.post_message(self.Requested(str(source), request))
        self.query_one("#prompt", Input).value = ""  # the reply box shows it above the answer
