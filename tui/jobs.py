"""The console's one-off engine processes: samplers (a reply from a saved checkpoint) and exports.

Replies from every source (the watched run's live samples, and the samplers') are kept in one list
in the order they were asked for; the App hands it to the Sample pane.
"""

from __future__ import annotations

from pathlib import Path

from engine import protocol
from tui.client import Launcher, RunClient, start_sample
from tui.history import RunHistory, SampleText
from tui.widgets.sample_pane import LIVE


class Samplers:
    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.clients: list[RunClient] = []
        self.history = RunHistory(run_id="samples")
        self.replies: list[SampleText] = []

    def add(self, sample: SampleText) -> None:
        if sample not in self.replies:
            self.replies.append(sample)

    def merge(self, history: RunHistory) -> None:
        """The replies a run's history holds that are not listed yet (live samples)."""
        for sample in history.samples.values():
            self.add(sample)

    def start(
        self, run_dir: Path, checkpoint: str | None, request: protocol.SampleRequest, placeholder: SampleText
    ) -> RunClient:
        """A sampler for `request`; raises OSError when the engine cannot start."""
        client = start_sample(run_dir, checkpoint, request, self.launcher)
        self.history.samples[request.request_id] = placeholder
        self.clients.append(client)
        return client

    def events(self, events: list[protocol.Event]) -> list[protocol.ErrorEvent]:
        """Apply a sampler's events; returns its errors, for the App to show."""
        self.history.apply_all(events)
        self.merge(self.history)
        return [ev for ev in events if isinstance(ev, protocol.ErrorEvent)]

    def ended(self, client: RunClient) -> None:
        if client in self.clients:
            self.clients.remove(client)
        for sample in self.replies:
            if not sample.done and sample.source != LIVE:
                sample.done = True  # the process is gone; whatever streamed is the reply


def end_clients(clients: list[RunClient]) -> None:
    """Stop listening to one-off processes of ours and end them: a sampler has no state to save,
    and an export removes its unfinished folder."""
    for client in clients:
        client.detach()
        if client.proc is not None and client.proc.poll() is None:
            client.proc.terminate()
