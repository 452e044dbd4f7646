"""The App's part in sampling: a reply from the live model (through the watched run) or from a
saved checkpoint (a one-off sampler, tui.jobs). A mixin of QlcApp."""

from __future__ import annotations

from typing import Any

from tui import watched
from tui.history import SampleText
from tui.jobs import Samplers
from tui.widgets.sample_pane import LIVE, SamplePane


class SampleActions:
    samplers: Samplers
    sample_replies: tuple[SampleText, ...]
    client: Any
    history: Any
    pane: Any
    notify: Any
    show_error: Any
    live: Any
    run_worker: Any
    post_message: Any
    action_show_pane: Any
    samples: Any

    def action_generate_sample(self) -> None:
        self.action_show_pane("sample")
        self.pane(SamplePane).action_generate()

    def on_sample_pane_requested(self, message: SamplePane.Requested) -> None:
        request, source = message.request, message.source
        # Tagged with the run it samples: its reply streams in place, under that run, even after
        # the console has moved on to another run (the pane shows the current run's replies).
        run_id = self.history.run_id if self.history is not None else None
        placeholder = SampleText(request.request_id, request.prompt, source, run_id=run_id)
        if source == LIVE:
            if not self.live() or self.history is None:
                self.notify("the run is not training: pick a checkpoint", severity="warning")
                return
            problem = watched.send(self.client, request)
            if problem:
                self.show_error("Cannot sample", problem)
                return
            self.history.samples[request.request_id] = placeholder
        else:
            run_dir = self.history.run_dir if self.history is not None else None
            if run_dir is None:
                return
            try:
                client = self.samplers.start(
                    run_dir, None if source == "adapter" else source, request, placeholder
                )
            except OSError as exc:
                self.show_error("Cannot start the sampler", str(exc))
                return
            self.run_worker(
                lambda: client.read_loop(self.post_message),
                name=f"sample {request.request_id}",
                group="samplers",
                thread=True,
                exit_on_error=False,
            )
        self.samplers.add(placeholder)
        self.sample_replies = tuple(self.samples)
